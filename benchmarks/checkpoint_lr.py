"""Learning rates from a trained reference (issue 27): the lr each method's `--recipe checkpoint` uses, chosen on the
hold-out.

Run from the repository root after `bash scripts/setup.sh` and `benchmarks/references.py --only resnet20` (or with
the kept reference `benchmarks/references/resnet20-cifar10.safetensors`); a few CPU hours on 2 cores. Runs that
finished are read back, so an interrupted sweep continues where it stopped:

    nice .venv/bin/python benchmarks/checkpoint_lr.py            # benchmarks/results/checkpoint_lr.md

Every run: `mpq search` of one method at 2 bits + sign (BMPQ, which counts the sign: 3; ALQ: 2 binary
bases per weight) from the trained resnet20 reference on the shared CIFAR-10 JPEGs, one epoch (352 steps of
batch 128), `--val-split 5000` (the reference's own hold-out: it never trained on it), 2 probe batches for the
budget step, seed 0, each learning rate of the grid with the rest of the method's paper's settings (optimizer,
weight decay, cosine schedule). The lr is chosen on the hold-out top-1; the test top-1 is shown once per row
and chooses nothing. One seed: a screen for a default that neither diverges nor leaves accuracy on the table,
not a comparison of methods.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import ROOT, run, write_results

REFERENCE = "benchmarks/references/resnet20-cifar10.safetensors"
GRID = {  # each method's paper's lr first; 0.03 only where a search is cheap enough to afford it
    "uniform": ["0.01", "0.1", "0.003", "0.03"],
    "csq": ["0.1", "0.01", "0.003", "0.03"],
    "bsq": ["0.1", "0.01", "0.003"],
    "bmpq": ["0.1", "0.01", "0.003"],
    "alq": ["1e-3", "1e-4", "3e-4"],
}
TARGETS = {"uniform": 2, "csq": 2, "bsq": 2, "bmpq": 3, "alq": 2}  # BMPQ counts the sign: 3 = 2 bits + sign


def command(method: str, lr: str, out: Path, data_dir: str) -> list[str]:
    return [
        "search", "--method", method, "--target-bits", str(TARGETS[method]), "--model", "resnet20",
        "--checkpoint", REFERENCE, "--data", "cifar10", "--data-dir", data_dir, "--val-split", "5000",
        "--epochs", "1", "--probe-batches", "2", "--seed", "0", "--lr", lr, "--out", str(out / f"{method}-{lr}"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(GRID))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data"))
    parser.add_argument("--out", default="runs/checkpoint_lr")
    parser.add_argument("--only-report", action="store_true", help="summarise the finished runs, run nothing")
    args = parser.parse_args()
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    log: list[str] = []
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        for lr in GRID[method]:
            args_ = command(method, lr, out, args.data_dir)
            summary_path = out / f"{method}-{lr}" / "summary.json"
            failed = out / f"{method}-{lr}.failed.json"  # a run that failed (diverged, collapsed) keeps its error
            if summary_path.is_file() or failed.is_file():
                log.append("mpq " + " ".join(args_))
                summary = json.loads((summary_path if summary_path.is_file() else failed).read_text())
            elif args.only_report:
                continue
            else:
                summary = run(args_, log, check=False)
                if "error" in summary:
                    failed.write_text(json.dumps(summary))
            rows.append((method, lr, summary))
    lines = ["# Learning rate from a trained reference (resnet20, CIFAR-10)", "", __doc__.split("\n\n", 2)[2].strip()]
    lines += [
        "",
        "| method | lr | hold-out top-1 % | test top-1 % | avg bits | stored bits | bits before budget step |",
    ]  # noqa: E501
    lines += ["|---|---|---|---|---|---|---|"]
    best = {}
    for method, lr, s in rows:
        if "error" in s:
            lines.append(f"| {method} | {lr} | failed: {s['error'][:160]} | | | | |")
            continue
        before = s.get("avg_bits_before_budget_step")
        lines.append(
            f"| {method} | {lr} | {s['val_top1']:.2f} | {s['top1']:.2f} | {s['avg_bits']:.3f} | "
            f"{s['avg_stored_bits']:.3f} | {'' if before is None else f'{before:.3f}'} |"
        )
        if method not in best or s["val_top1"] > best[method][1]:
            best[method] = (lr, s["val_top1"])
    lines += ["", "Best on the hold-out: " + ", ".join(f"{m} lr {lr} ({v:.2f} %)" for m, (lr, v) in best.items())]
    sys.path.insert(0, str(ROOT))
    from mpq_cli.methods import get_method

    chosen = {m: get_method(m).recipe_defaults("checkpoint")["lr"] for m in best}
    lines += [
        "",
        "`--recipe checkpoint` learning rates in the code now: " + ", ".join(f"{m} {v:g}" for m, v in chosen.items()),
        "",
        "Rule: the best hold-out top-1; where another lr is within 0.1 point of it (one seed cannot tell them apart)",
        "the method's existing default is kept (uniform: 0.01 against 0.003), and between two new ones the search",
        "that lands nearer its budget by itself (CSQ: 0.003, 2.10 bits before the budget step, against 0.01's",
        "2.21). BMPQ's best is the grid's lowest lr: lower ones are untried.",
    ]
    lines += ["", "Commands:", "", "```", *log, "```"]
    write_results("benchmarks/results/checkpoint_lr.md", lines)


if __name__ == "__main__":
    main()
