"""BSQ on the real Fashion-MNIST: open-loop alpha sweep and budget mode at 2 bits.

Run from the repository root after `bash scripts/setup.sh` (and after
`benchmarks/fashion_mnist.py`, whose FP32 lenet5 it starts from; pass --fp32 otherwise):

    .venv/bin/python benchmarks/bsq_fashion_mnist.py     # writes benchmarks/results/bsq_fashion_mnist.md

Every number comes from the summaries of the runs this script writes; the commands are
printed above the tables.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fp32_reference, fresh_output, run, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", default="runs/bench-fmnist/fp32", help="an `mpq train` run of lenet5")
    parser.add_argument("--out", default="runs/bench-bsq", help="folder for the run directories")
    parser.add_argument("--alphas", default="0.5,2,8", help="open-loop alpha values")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--target-bits", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/results/bsq_fashion_mnist.md")
    args = parser.parse_args()
    out = fresh_output(args.out)
    fp_top1 = fp32_reference(args.fp32)["top1"]
    common = [
        "--method",
        "bsq",
        "--checkpoint",
        args.fp32,
        "--data",
        "fashion-mnist",
        "--seed",
        str(args.seed),
        "--batch-size",
        "256",
        "--epochs",
        str(args.epochs),
    ]
    log: list[str] = []
    sweep = []
    for alpha in args.alphas.split(","):
        s = run(["search", *common, "--set", f"alpha={alpha}", "--out", str(out / f"alpha-{alpha}")], log)
        sweep.append((alpha, s))
    bits = f"{args.target_bits:g}"
    budget = run(["search", *common, "--target-bits", bits, "--out", str(out / f"budget-{bits}")], log)
    finetuned = run(
        [
            "finetune",
            str(out / f"budget-{bits}"),
            "--epochs",
            str(args.finetune_epochs),
            "--out",
            str(out / f"budget-{bits}-ft"),
        ],
        log,
    )
    packed = ROOT / out / f"budget-{bits}-ft.safetensors"
    exported = run(["export", str(out / f"budget-{bits}-ft"), "-o", str(packed.relative_to(ROOT))], log)
    from_file = run(["eval", str(packed.relative_to(ROOT))], log)

    def row(name, s, epochs):
        return (
            f"| {name} | {epochs} | {s['avg_bits']:.3f} | {s['avg_stored_bits']:.3f} | {s['top1']:.2f} | "
            f"{fp_top1 - s['top1']:.2f} | {s['wall_seconds']} |"
        )

    header = [
        "| run | epochs | avg bits (nominal) | avg stored bits | top-1 % | drop vs FP32 | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines = [
        "# BSQ on Fashion-MNIST (lenet5)",
        "",
        f"Machine: {platform.machine()}; FP32 start: `{args.fp32}` ({fp_top1:.2f} % top-1). Commands:",
        "",
        "```",
        *log,
        "```",
        "",
        "## Open loop (the paper's mode): alpha fixed",
        "",
        *header,
    ]
    lines += [row(f"alpha {alpha}", s, args.epochs) for alpha, s in sweep]
    lines += [
        "",
        f"## Budget mode, target {bits} bits",
        "",
        *header,
        row("search", budget, args.epochs),
        row("+ finetune", finetuned, args.finetune_epochs),
        "",
        f"Budget met: {budget.get('budget_met')}; alpha at the end of the search: "
        f"{budget.get('alpha_final'):.4g}. Packed file: {exported['file_bytes']:,} bytes "
        f"({exported['compression_vs_checkpoint']:.2f}x smaller than the FP32 checkpoint), "
        f"top-1 measured from the file: {from_file['top1']:.2f} %.",
    ]
    write_results(args.results, lines)


if __name__ == "__main__":
    main()
