"""Steps per output channel against one step per layer (issue 30): uniform, CSQ and BMPQ on the trained resnet20
reference, `--granularity tensor` and `channel`, paired by seed.

Run from the repository root after `bash scripts/setup.sh`, in the background (about 24 one-epoch searches: five or
six CPU hours on 2 cores). Every finished row is kept in `benchmarks/results/granularity/resnet20/`: commit them, and
a later run, on another machine too, runs only the rows still missing:

    nice .venv/bin/python benchmarks/granularity.py                 # benchmarks/results/granularity.md
    nice .venv/bin/python benchmarks/granularity.py --only-report   # the page from the kept rows alone

Protocol: the evidence page's (benchmarks/evidence.py: the trained reference, `--val-split 5000`, 8-bit edges, each
method's `--recipe checkpoint` defaults, `--epochs` (1) epochs, 2 probe batches), at 2 and 3 magnitude bits + sign,
seeds 0, 1, 2. Per-channel steps cost stored bits (a float32 per output channel: about 0.06 bits per weight in
resnet20's widest layers, 0.2 in its narrowest), so the comparison is at equal stored bits where a method can aim
at them: CSQ and BMPQ run with `--budget-on stored` at the same ceiling per level for both granularities (the
stored bits of a uniform per-tensor layer at that level, plus 0.05), and the search spends the steps' cost where
it hurts least. Uniform has one width, so it is shown at the level's width for both granularities, each row with
the stored bits it has. The difference is the per-channel run's test top-1 minus the per-tensor run's of the same
seed; 95 % t interval, exact sign-flip p. Test top-1 from each exported file; nothing is chosen on it. BMPQ's rows
need its config version 2 (version 1 counted only the codes against `--budget-on stored`, and its per-channel rows
went over the ceiling). MobileNetV2, whose depthwise layers are where per-tensor steps should hurt most, is not on
this page: its searches need a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, in_repository, keep_record, partial_note, sweep_row, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
from mpq_cli.stats import paired_difference, spread  # noqa: E402

REFERENCE = "benchmarks/references/resnet20-cifar10.safetensors"
SEEDS = [0, 1, 2]
LEVELS = [2, 3]
GRANULARITIES = ("tensor", "channel")
# per method: target of a level, extra arguments
METHODS = {
    "uniform": (lambda level: f"{level}", []),
    "csq": (lambda level: f"{level + 1.05:g}", ["--budget-on", "stored"]),
    "bmpq": (lambda level: f"{level + 1.05:g}", ["--budget-on", "stored", "--set", "act_follow_weights=false"]),
}


def record_path(records: Path, level: int, method: str, granularity: str, seed: int) -> Path:
    return records / f"L{level}" / f"{method}-{granularity}-seed{seed}.json"


KEPT = ("method", "target_bits", "seed", "avg_bits", "avg_stored_bits", "file_bytes", "top1", "samples",
        "split_samples", "val_top1", "seconds")  # fmt: skip


def run_rows(args, out: Path, records: Path, log: list[str]) -> None:
    """Seed by seed (each finished seed is a complete pairing), one-row sweeps; each finished row is kept."""
    for seed in SEEDS:
        for level in LEVELS:
            for method, (target, extra) in METHODS.items():
                for granularity in GRANULARITIES:
                    path = record_path(records, level, method, granularity, seed)
                    if path.is_file():
                        continue
                    sweep = out / f"L{level}" / f"{method}-{granularity}-seed{seed}"
                    command = [
                        "sweep", "--method", method, "--target-bits", target(level), *extra, "--edge-bits", "8",
                        "--granularity", granularity, "--model", "resnet20", "--checkpoint", REFERENCE,
                        "--data", "cifar10", "--data-dir", args.data_dir, "--val-split", "5000",
                        "--epochs", str(args.epochs), "--probe-batches", "2", "--seeds", str(seed),
                        "--out", str(sweep),
                    ]  # fmt: skip
                    row, why = sweep_row(command, sweep, log)
                    if row is None:
                        print(f"L{level} {method} {granularity} seed {seed}: {why}", file=sys.stderr)
                        continue
                    keep_record(path, {**{k: row.get(k) for k in KEPT}, "command": log[-1]})


def kept_rows(records: Path, level: int, method: str, granularity: str) -> dict[int, dict]:
    found = (
        json.loads(p.read_text()) for p in sorted((records / f"L{level}").glob(f"{method}-{granularity}-seed*.json"))
    )
    return {r["seed"]: r for r in found}


def table(records: Path) -> list[str]:
    lines = [
        "| level | method | granularity | seeds | test top-1 % (mean ± std) | hold-out % | stored bits | "
        "channel − tensor | 95 % interval | p (floor) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in LEVELS:
        for method in METHODS:
            found = {g: kept_rows(records, level, method, g) for g in GRANULARITIES}
            for granularity in GRANULARITIES:
                rows = found[granularity]
                if not rows:
                    continue
                top1 = spread([r["top1"] for r in rows.values()])
                val = spread([r["val_top1"] for r in rows.values()]).mean
                stored = spread([r["avg_stored_bits"] for r in rows.values()]).mean
                cell = f"{top1.mean:.2f}" + (f" ± {top1.std:.2f}" if top1.std is not None else "")
                cell += partial_note(list(rows.values()))
                diff = interval = p = verdict = ""
                shared = sorted(set(found["channel"]) & set(found["tensor"]))
                if granularity == "channel" and shared:
                    d = paired_difference(
                        [found["channel"][s]["top1"] for s in shared], [found["tensor"][s]["top1"] for s in shared]
                    )
                    diff = f"{d.mean:+.2f}"
                    if d.low is not None:
                        interval, p = f"[{d.low:+.2f}, {d.high:+.2f}]", f"{d.p:.3f} ({d.p_min:.3f})"
                        ahead = "channel ahead" if d.low > 0 else "tensor ahead" if d.high < 0 else None
                        verdict = ahead or "no difference shown"
                lines.append(
                    f"| {level} | {method} | {granularity} | {len(rows)} | {cell} | {val:.2f} | {stored:.3f} | "
                    f"{diff} | {interval} | {p} | {verdict} |"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default="runs/granularity/resnet20", help="run directories (scratch)")
    parser.add_argument("--records", default="benchmarks/results/granularity/resnet20", help="kept rows (commit them)")
    parser.add_argument("--only-report", action="store_true", help="write the page from the kept rows only")
    args = parser.parse_args()
    out, records = (Path(p) if Path(p).is_absolute() else ROOT / p for p in (args.out, args.records))
    log: list[str] = []
    if not args.only_report:
        run_rows(args, out, records, log)
    lines = ["# Steps per output channel against one per layer (resnet20, CIFAR-10)", ""]
    lines += [__doc__[__doc__.index("Protocol:") :].strip(), "", *table(records), ""]
    commands = sorted(in_repository(json.loads(p.read_text())["command"]) for p in records.glob("L*/*-seed*.json"))
    lines += ["Commands (one per kept row; each sweep also exports and evaluates its file):", "", "```", *commands]
    write_results("benchmarks/results/granularity.md", [*lines, "```"])


if __name__ == "__main__":
    main()
