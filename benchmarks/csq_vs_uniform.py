"""CSQ against uniform QAT at 2 bits on lenet5, and what CSQ's own choices are worth.

Run from the repository root after `bash scripts/setup.sh` and `benchmarks/fashion_mnist.py`
(whose FP32 lenet5 is the reference; pass --fp32 otherwise):

    .venv/bin/python benchmarks/csq_vs_uniform.py     # writes benchmarks/results/csq_vs_uniform.md

The same on resnet20 (BatchNorm), at 3 bits, after training its FP32 reference:

    .venv/bin/mpq train --model resnet20 --data fashion-mnist --epochs 3 --batch-size 128 --out runs/r20/fp32
    .venv/bin/python benchmarks/csq_vs_uniform.py --fp32 runs/r20/fp32 --model resnet20 --target-bits 3 \
        --seeds 0 --variants 0,3,4 --out runs/bench-csq-vs-uniform-r20 \
        --results benchmarks/results/csq_vs_uniform_resnet20.md

Searches of the same length from the same checkpoint, per seed: CSQ as it is (residuals
carried across restarts, bit logits preconditioned once a layer's scheme is fixed), CSQ
preconditioned during the search too, CSQ without preconditioning, CSQ with neither
(the default before both: the paper's plain gradient), and uniform QAT.
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
    parser.add_argument("--fp32", default="runs/bench-fmnist/fp32", help="an `mpq train` run of the model (reference)")
    parser.add_argument("--model", default=None, help="the reference's model when it is not lenet5 (e.g. resnet20)")
    parser.add_argument("--target-bits", default="2")
    parser.add_argument(
        "--variants", default=None, help="comma-separated 0-based numbers of the variants to run (default: all)"
    )
    parser.add_argument("--out", default="runs/bench-csq-vs-uniform", help="folder for the run directories")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", default="benchmarks/results/csq_vs_uniform.md")
    args = parser.parse_args()
    out = fresh_output(args.out)
    fp_top1 = fp32_reference(args.fp32)["top1"]
    common = [
        *(["--model", args.model] if args.model else []),
        "--target-bits",
        args.target_bits,
        "--checkpoint",
        args.fp32,
        "--data",
        "fashion-mnist",
        "--batch-size",
        "256",
        "--epochs",
        str(args.epochs),
    ]
    variants = [
        ("csq", ["--method", "csq"]),
        ("csq, preconditioned in the search too", ["--method", "csq", "--precondition", "always"]),
        ("csq, not preconditioned", ["--method", "csq", "--precondition", "none"]),
        (
            "csq, neither preconditioned nor residuals",
            ["--method", "csq", "--precondition", "none", "--carry-residual", "false"],
        ),
        ("uniform", ["--method", "uniform"]),
    ]
    if args.variants is not None:
        variants = [variants[int(i)] for i in args.variants.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    log: list[str] = []
    rows, means = [], []
    for i, (label, extra) in enumerate(variants):
        top1s = []
        for seed in seeds:
            summary = run(
                ["search", *extra, *common, "--seed", str(seed), "--out", str(out / f"run{i}-seed{seed}")], log
            )
            scheme = (ROOT / summary["out"] / "scheme.json").read_text()
            bits = {e["name"]: e["bits"] for e in json.loads(scheme)["layers"]}
            top1s.append(summary["top1"])
            rows.append(
                f"| {label} | {seed} | {summary['avg_bits']:.3f} | "
                f"{', '.join(f'{n} {b}' for n, b in bits.items())} | {summary['top1']:.2f} | "
                f"{fp_top1 - summary['top1']:.2f} | {summary['wall_seconds']} |"
            )
        mean = sum(top1s) / len(top1s)
        means.append(f"| {label} | {mean:.2f} | {fp_top1 - mean:.2f} | {min(top1s):.2f} | {max(top1s):.2f} |")
    write_results(
        args.results,
        [
            f"# CSQ against uniform QAT at {args.target_bits} bits ({args.model or 'lenet5'}, Fashion-MNIST)",
            "",
            f"Machine: {platform.machine()}, 2-core CPU. Reference: `{args.fp32}` ({fp_top1:.2f} % top-1). Commands:",
            "",
            "```",
            *log,
            "```",
            "",
            f"Every search: {args.epochs} epochs, target {args.target_bits} bits, batch 256.",
            "",
            f"| run | mean top-1 % over seeds {args.seeds} | mean drop vs FP32 | lowest | highest |",
            "|---|---|---|---|---|",
            *means,
            "",
            "| run | seed | avg bits | bits per layer | top-1 % | drop vs FP32 | wall s |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
