#!/usr/bin/env bash
# Set up everything mpq needs on a fresh Debian/Ubuntu machine: the real Fashion-MNIST
# (Debian package), a virtual environment in .venv, torch/torchvision and mpq itself.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get install -y -q dataset-fashion-mnist >/dev/null
  else
    echo "note: install the Debian package dataset-fashion-mnist as root for the real-data runs" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision, mpq_cli, pytest, xdist, hypothesis, scipy, matplotlib, onnx, onnxruntime, onnxscript, timm, efficientnet_pytorch" 2>/dev/null; then
  # torch first and pinned: this pair lies on the build machines' disk (see README)
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q -e ".[test,onnx]"
fi
