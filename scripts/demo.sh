#!/usr/bin/env bash
# The default pipeline, offline, on a 2-core CPU in under 10 minutes (a short schedule;
# benchmarks/fashion_mnist.py trains longer for the numbers in README):
# FP32 lenet5 on the real Fashion-MNIST, then CSQ at 2 bits from it, then its report,
# then the bit-packed file, its layer table, and its accuracy measured from the file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${MPQ_DEMO_OUT:-runs/demo}
rm -rf "$OUT"
.venv/bin/mpq train --model lenet5 --data fashion-mnist --epochs 6 --batch-size 256 --out "$OUT/fp32"
.venv/bin/mpq search --method csq --target-bits 2 --checkpoint "$OUT/fp32" --data fashion-mnist \
  --epochs 3 --batch-size 256 --out "$OUT/csq-2bit"
echo
cat "$OUT/csq-2bit/report.md"
echo
.venv/bin/mpq export "$OUT/csq-2bit" -o "$OUT/csq-2bit.safetensors"
.venv/bin/mpq inspect "$OUT/csq-2bit.safetensors"
.venv/bin/mpq eval "$OUT/csq-2bit.safetensors"
