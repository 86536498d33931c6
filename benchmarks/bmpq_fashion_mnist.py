"""BMPQ on the real Fashion-MNIST: lenet5 from scratch with support widths {2, 4} at a 3-bit budget.

Run from the repository root after `bash scripts/setup.sh` (and after
`benchmarks/fashion_mnist.py`, whose FP32 lenet5 is the reference; pass --fp32 otherwise):

    .venv/bin/python benchmarks/bmpq_fashion_mnist.py     # writes benchmarks/results/bmpq_fashion_mnist.md

Every number comes from the summaries and reports of the runs this script writes; the
commands are printed above the tables.
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
    parser.add_argument("--fp32", default="runs/bench-fmnist/fp32", help="an `mpq train` run of lenet5 (reference)")
    parser.add_argument("--out", default="runs/bench-bmpq", help="folder for the run directories")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--target-bits", type=float, default=3.0)
    parser.add_argument("--bits", default="2,4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/results/bmpq_fashion_mnist.md")
    args = parser.parse_args()
    out = fresh_output(args.out)
    reference = fp32_reference(args.fp32)
    fp_top1, fp_bytes, fp_epochs = reference["top1"], reference["bytes"], reference["epochs"]
    bits = f"{args.target_bits:g}"
    name = f"scratch-{bits}"
    log: list[str] = []
    search = run(
        [
            "search",
            "--method",
            "bmpq",
            "--model",
            "lenet5",
            "--data",
            "fashion-mnist",
            "--seed",
            str(args.seed),
            "--epochs",
            str(args.epochs),
            "--bits",
            args.bits,
            "--target-bits",
            bits,
            "--out",
            str(out / name),
        ],
        log,
    )
    packed = out / f"{name}.safetensors"
    exported = run(["export", str(out / name), "-o", str(packed)], log)
    from_file = run(["eval", str(packed)], log)
    inspected = run(["inspect", str(packed)], log, quiet=False)  # inspect prints no progress

    report = (ROOT / out / name / "report.md").read_text()
    assignments = report[report.index("## BMPQ assignments") :].split("\nTrained ")[0].strip()
    assignments = assignments.replace("## BMPQ assignments", "## Assignments (from the run's report.md)")
    layer_rows = [
        f"| {r['name']} | {r['params']:,} | {r['bits']} | {r['encoding']} | {r['stored_bits']:.3f} | "
        f"{r['bytes']:,} | {r.get('act_bits') or 'FP'} |"
        for r in inspected["layers"]
    ]
    lines = [
        "# BMPQ on Fashion-MNIST (lenet5, from scratch)",
        "",
        f"Machine: {platform.machine()}, 2-core CPU. Reference: the FP32 lenet5 `{args.fp32}` "
        f"({fp_top1:.2f} % top-1 after {fp_epochs} epochs of Adam). Commands:",
        "",
        "```",
        *log,
        "```",
        "",
        "| run | epochs | target | avg bits (two's complement, nominal) | avg stored bits (file) | top-1 % | "
        "drop vs FP32 | within budget | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| bmpq from scratch, bits {{{args.bits}}} | {args.epochs} | {bits} | {search['avg_bits']:.3f} | "
        f"{exported['avg_stored_bits']:.3f} | {search['top1']:.2f} | {fp_top1 - search['top1']:.2f} | "
        f"{'yes' if search['budget_met'] else 'NO'} | {search['wall_seconds']} |",
        "",
        f"Packed file: {exported['file_bytes']:,} bytes, {fp_bytes / exported['file_bytes']:.2f}x smaller than "
        f"the reference FP32 checkpoint file ({fp_bytes:,} bytes); top-1 measured from the file by "
        f"`mpq eval`: {from_file['top1']:.2f} %.",
        "",
        "## Layers in the file",
        "",
        "| layer | params | bits | encoding | stored bits/weight | bytes | input bits |",
        "|---|---|---|---|---|---|---|",
        *layer_rows,
        "",
        assignments,
    ]
    write_results(args.results, lines)


if __name__ == "__main__":
    main()
