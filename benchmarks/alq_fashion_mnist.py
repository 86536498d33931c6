"""ALQ on the real Fashion-MNIST: lenet5 from the FP32 reference at 1 and 0.7 bits, and 1 bit with 2-bit inputs.

Run from the repository root after `bash scripts/setup.sh` (and after
`benchmarks/fashion_mnist.py`, whose FP32 lenet5 is the reference; pass --fp32 otherwise):

    .venv/bin/python benchmarks/alq_fashion_mnist.py     # writes benchmarks/results/alq_fashion_mnist.md

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
    parser.add_argument("--out", default="runs/bench-alq", help="folder for the run directories")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--targets", default="1,0.7", help="comma list of --target-bits")
    parser.add_argument(
        "--act-runs",
        default="1:2",
        help="comma list of TARGET:ACT_BITS runs with ALQ's activation quantization ('' for none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/results/alq_fashion_mnist.md")
    args = parser.parse_args()
    out = fresh_output(args.out)
    reference = fp32_reference(args.fp32)
    fp_top1, fp_bytes = reference["top1"], reference["bytes"]
    log: list[str] = []
    rows, details = [], []
    runs = [(float(t), None) for t in args.targets.split(",")]
    runs += [(float(t), int(a)) for t, a in (item.split(":") for item in args.act_runs.split(",") if item)]
    for target, act_bits in runs:
        bits = f"{target:g}"
        name = f"target-{bits}" + (f"-act{act_bits}" if act_bits else "")
        label = f"alq, target {bits}" + (f", activations {act_bits} bits" if act_bits else "")
        act = ["--act-bits", str(act_bits)] if act_bits else []
        search = run(
            [
                "search",
                "--method",
                "alq",
                "--model",
                "lenet5",
                "--data",
                "fashion-mnist",
                "--checkpoint",
                args.fp32,
                "--seed",
                str(args.seed),
                "--epochs",
                str(args.epochs),
                "--target-bits",
                bits,
                *act,
                "--out",
                str(out / name),
            ],
            log,
        )
        packed = out / f"{name}.safetensors"
        exported = run(["export", str(out / name), "-o", str(packed)], log)
        from_file = run(["eval", str(packed)], log)
        inspected = run(["inspect", str(packed)], log, quiet=False)  # inspect prints no progress
        rows.append(
            f"| {label} | {args.epochs} | {search['rounds']} | {search['avg_bits']:.4f} | "
            f"{exported['avg_stored_bits']:.4f} | {search['top1']:.2f} | {from_file['top1']:.2f} | "
            f"{fp_top1 - search['top1']:.2f} | {'yes' if search['budget_met'] else 'NO'} | "
            f"{search['pruned_channels']} of {search['output_channels']} | {exported['file_bytes']:,} "
            f"({fp_bytes / exported['file_bytes']:.1f}x) | {search['wall_seconds']} |"
        )
        report = (ROOT / out / name / "report.md").read_text()
        sections = report[report.index("## ALQ groups") :].split("\nTrained ")[0].strip()
        layer_rows = [
            f"| {r['name']} | {r['params']:,} | {r['bits']:.3f} | {r['encoding']} | "
            f"{r['stored_bits']:.3f} | {r['bytes']:,} |"
            for r in inspected["layers"]
        ]
        details += [
            f"## {label}: layers in the file",
            "",
            "| layer | params | bases per weight | encoding | stored bits/weight | bytes |",
            "|---|---|---|---|---|---|",
            *layer_rows,
            "",
            sections.replace("## ALQ", f"### {label}: ALQ"),
            "",
        ]
    lines = [
        "# ALQ on Fashion-MNIST (lenet5, from the FP32 reference)",
        "",
        f"Machine: {platform.machine()}, 2-core CPU. Reference: the FP32 lenet5 `{args.fp32}` "
        f"({fp_top1:.2f} % top-1; its file {fp_bytes:,} bytes). Commands:",
        "",
        "```",
        *log,
        "```",
        "",
        "| run | epochs | pruning rounds | avg bits (bases per weight, nominal) | avg stored bits (file: signs, "
        "coordinates, widths) | top-1 % (run) | top-1 % (file) | drop vs FP32 | within target | pruned output "
        "channels | file bytes (vs FP32 file) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *details,
    ]
    write_results(args.results, lines)


if __name__ == "__main__":
    main()
