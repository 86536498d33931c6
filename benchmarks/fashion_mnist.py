"""Real Fashion-MNIST benchmark: FP32 lenet5, CSQ at 2 bits, uniform at 2 bits, same epochs.

Run from the repository root after `bash scripts/setup.sh`:

    .venv/bin/python benchmarks/fashion_mnist.py            # writes benchmarks/results/fashion_mnist.md

Every number in the table comes from the run directories this script writes (their
summary.json); the commands it ran are printed above the table.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-fmnist", help="folder for the run directories")
    parser.add_argument("--fp-epochs", type=int, default=12)
    parser.add_argument("--search-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--target-bits", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/results/fashion_mnist.md")
    args = parser.parse_args()
    out = Path(args.out)
    if (ROOT / out).exists():
        sys.exit(f"{out} exists; remove it or pass --out")
    common = ["--data", "fashion-mnist", "--seed", str(args.seed)]
    log: list[str] = []
    fp = run(
        [
            "train",
            "--model",
            "lenet5",
            *common,
            "--batch-size",
            "128",
            "--epochs",
            str(args.fp_epochs),
            "--out",
            str(out / "fp32"),
        ],
        log,
    )
    common += ["--batch-size", "256"]
    bits = f"{args.target_bits:g}"
    rows = [("FP32", None, fp)]
    for method in ("csq", "uniform"):
        summary = run(
            [
                "search",
                "--method",
                method,
                "--target-bits",
                bits,
                "--checkpoint",
                str(out / "fp32"),
                *common,
                "--epochs",
                str(args.search_epochs),
                "--out",
                str(out / f"{method}-{bits}"),
            ],
            log,
        )
        rows.append((f"{method} search", args.search_epochs, summary))
    if args.finetune_epochs:
        for method in ("csq", "uniform"):
            summary = run(
                [
                    "finetune",
                    str(out / f"{method}-{bits}"),
                    "--epochs",
                    str(args.finetune_epochs),
                    "--out",
                    str(out / f"{method}-{bits}-ft"),
                ],
                log,
            )
            rows.append((f"{method} + finetune", args.finetune_epochs, summary))
    packed = {}
    fp32_file = ROOT / out / "fp32" / "model.safetensors"
    for name, _, s in rows[1:]:
        run_dir = Path(s["out"])
        file = run_dir.with_name(run_dir.name + ".safetensors")
        exported = run(["export", str(run_dir), "-o", str(file)], log)
        evaluated = run(["eval", str(file)], log)
        packed[name] = (
            exported["file_bytes"],
            fp32_file.stat().st_size / exported["file_bytes"],
            exported["avg_stored_bits"],
            evaluated["top1"],
        )
    invocation = " ".join([".venv/bin/python", "benchmarks/fashion_mnist.py", *sys.argv[1:]])
    lines = (
        [
            f"# lenet5 on Fashion-MNIST, target {bits} bits",
            "",
            f"Produced by `{invocation}`.",
            "",
            f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
            f"torch threads as default. Commands (in order):",
            "",
            "```",
        ]
        + log
        + [
            "```",
            "",
            "| run | epochs | avg bits (nominal) | avg stored bits (codes + sign) | top-1 % | drop vs FP32 | wall s |",
            "|---|---|---|---|---|---|---|",
        ]
    )
    for name, epochs, s in rows:
        nominal = "32" if name == "FP32" else f"{s['avg_bits']:.3f}"
        stored = "32" if name == "FP32" else f"{s['avg_stored_bits']:.3f}"
        drop = "" if name == "FP32" else f"{fp['top1'] - s['top1']:.2f}"
        lines.append(
            f"| {name} | {epochs or args.fp_epochs} | {nominal} | {stored} | {s['top1']:.2f} | {drop} | "
            f"{s['wall_seconds']} |"
        )
    lines += [
        "",
        "Packed files (`mpq export`), measured on disk against the FP32 checkpoint "
        f"({fp32_file.stat().st_size:,} bytes); top-1 re-measured from the file by `mpq eval FILE`:",
        "",
        "| run | file bytes | x smaller than FP32 checkpoint | stored bits/weight (file) | top-1 % from file |",
        "|---|---|---|---|---|",
    ]
    for name, (nbytes, ratio, stored, top1) in packed.items():
        lines.append(f"| {name} | {nbytes:,} | {ratio:.2f} | {stored:.3f} | {top1:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
