"""CSQ against uniform QAT at 2 bits on lenet5: is the gap the scheme or the training?

Run from the repository root after `bash scripts/setup.sh` and `benchmarks/fashion_mnist.py`
(whose FP32 lenet5 is the reference; pass --fp32 otherwise):

    .venv/bin/python benchmarks/csq_vs_uniform.py     # writes benchmarks/results/csq_vs_uniform.md

Three searches of the same length from the same checkpoint: CSQ as it is, CSQ with
the last layer fixed at 2 bits (which leaves it uniform's scheme: every layer at 2
bits), and uniform QAT.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fp32_reference, fresh_output, run, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", default="runs/bench-fmnist/fp32", help="an `mpq train` run of lenet5 (reference)")
    parser.add_argument("--out", default="runs/bench-csq-vs-uniform", help="folder for the run directories")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/results/csq_vs_uniform.md")
    args = parser.parse_args()
    out = fresh_output(args.out)
    fp_top1 = fp32_reference(args.fp32)["top1"]
    common = ["--target-bits", "2", "--checkpoint", args.fp32, "--data", "fashion-mnist", "--seed", str(args.seed),
              "--batch-size", "256", "--epochs", str(args.epochs)]
    variants = [("csq", ["--method", "csq"]),
                ("csq, classifier.3 fixed at 2 bits", ["--method", "csq", "--fix-bits", "classifier.3=2"]),
                ("uniform", ["--method", "uniform"])]
    log: list[str] = []
    rows = []
    for i, (label, extra) in enumerate(variants):
        summary = run(["search", *extra, *common, "--out", str(out / f"run{i}")], log)
        scheme = (ROOT / summary["out"] / "scheme.json").read_text()
        bits = {e["name"]: e["bits"] for e in json.loads(scheme)["layers"]}
        rows.append(f"| {label} | {args.epochs} | {summary['avg_bits']:.3f} | "
                    f"{', '.join(f'{n} {b}' for n, b in bits.items())} | {summary['top1']:.2f} | "
                    f"{fp_top1 - summary['top1']:.2f} | {summary['wall_seconds']} |")
    write_results(args.results, [
        "# CSQ against uniform QAT at 2 bits (lenet5, Fashion-MNIST)", "",
        f"Machine: {platform.machine()}, 2-core CPU. Reference: `{args.fp32}` ({fp_top1:.2f} % top-1). Commands:", "",
        "```", *log, "```", "",
        "| run | epochs | avg bits | bits per layer | top-1 % | drop vs FP32 | wall s |",
        "|---|---|---|---|---|---|---|", *rows,
    ])


if __name__ == "__main__":
    main()
