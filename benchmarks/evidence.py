"""The evidence page (issue 28): every method against the strong uniform at equal stored bits, from a trained
reference, over seeds, with intervals; and uniform trained on each bit method's scheme (the transplant).

Run from the repository root after `bash scripts/setup.sh`, in the background (many CPU hours on 2 cores; run it
again to continue: every finished run is read back, an interrupted one restarts):

    nice .venv/bin/python benchmarks/evidence.py                 # benchmarks/results/evidence.md
    nice .venv/bin/python benchmarks/evidence.py --only-report   # the page from the runs finished so far

Protocol (resnet20 on the shared CIFAR-10 JPEGs; MobileNetV2 joins once its reference is trained):

- Start: the trained FP32 reference `benchmarks/references/resnet20-cifar10.safetensors` (benchmarks/references.py:
  40 epochs, 87.21 % test top-1), `--val-split 5000`, its own hold-out (it never trained on those images).
- Levels: 2 and 3 magnitude bits + sign. CSQ, BSQ and uniform at `--target-bits L` (they count magnitude bits);
  BMPQ at `L + 1` (its count includes the sign) with FP activations (`act_follow_weights=false`: weights only, as
  every other row); ALQ at `(L + 1) / 1.86` binary bases per weight (1.61 and 2.15): it stores no sign bit but a
  float32 coordinate per group and basis, 1.86 stored bits per basis on resnet20 (2 bases stored 3.72 bits in
  benchmarks/results/checkpoint_lr.md), so this is about the stored bits of the others; the table gives each
  row's stored bits. Every method with
  `--edge-bits 8` (first and last layer at 8 bits); uniform also without edges, and each method is compared with
  the better uniform of the two, chosen on the hold-out.
- Training: each method's `--recipe checkpoint` defaults (the lr measured from this reference,
  benchmarks/checkpoint_lr.py), `--epochs` (2) epochs of 352 steps of batch 128, 2 probe batches for the budget
  step (of the hold-out), the same for every row.
- Seeds: 0, 1, 2 at both levels, then 3 and 4 at 2 bits (the closest cells). Each (method, seed) is paired with
  uniform's run of the same seed: the mean difference of test top-1, its 95 % Student t interval and the exact
  sign-flip p (floor 2/2^n). A method is marked **better** only where the interval lies above zero and its mean
  stored bits are at most uniform's.
- Transplant: uniform trained under the scheme of each CSQ and BSQ run (`--scheme RUN`, same seed, same edges):
  if it matches the method, the method's gain (or loss) is its scheme's; if not, its training's.
- Test top-1 of every row is measured once, on the whole test split, from its exported file (`mpq sweep` exports
  and evaluates each run); nothing is chosen on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, run, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
from mpq_cli.stats import paired_difference, spread  # noqa: E402

REFERENCE = "benchmarks/references/resnet20-cifar10.safetensors"
# (level, seeds) in the order they run: every cell at 3 seeds first, then the 2-bit cells to 5 (a sweep's seeds are
# all its rows: the later 2-bit sweeps read seeds 0-2 back and run 3 and 4)
SCHEDULE = [(2, [0, 1, 2]), (3, [0, 1, 2]), (2, [0, 1, 2, 3, 4])]
EDGES = ["--edge-bits", "8"]
ALQ_STORED_PER_BASIS = 1.86  # resnet20's stored bits per ALQ basis (coordinates included), checkpoint_lr.md
# per level: sweep name, methods, target, extra arguments
CELLS = {
    "edges8": ("csq,bsq,uniform", lambda level: level, EDGES),
    "bmpq": ("bmpq", lambda level: level + 1, [*EDGES, "--set", "act_follow_weights=false"]),
    "alq": ("alq", lambda level: round((level + 1) / ALQ_STORED_PER_BASIS, 2), EDGES),
    "uniform-noedges": ("uniform", lambda level: level, []),
}
TRANSPLANT_FROM = ("csq", "bsq")


def common(args) -> list[str]:
    return [
        "--model", "resnet20", "--checkpoint", REFERENCE, "--data", "cifar10", "--data-dir", args.data_dir,
        "--val-split", "5000", "--epochs", str(args.epochs), "--probe-batches", "2",
    ]  # fmt: skip


def sweep_dir(out: Path, level: int, cell: str) -> Path:
    return out / f"L{level}" / cell


def run_sweeps(args, out: Path, log: list[str]) -> None:
    for level, seeds in SCHEDULE:
        for cell, (methods, target, extra) in CELLS.items():
            command = ["sweep", "--method", methods, "--target-bits", f"{target(level):g}", *extra, *common(args)]
            command += ["--seeds", ",".join(map(str, seeds)), "--out", str(sweep_dir(out, level, cell))]
            result = run(command, log, check=False)
            if "error" in result:
                print(f"sweep L{level} {cell}: {result['error']}", file=sys.stderr)
        for seed in seeds:
            for method in TRANSPLANT_FROM:
                source = sweep_dir(out, level, "edges8") / f"{method}-{level:g}bits-seed{seed}"
                target_dir = out / f"L{level}" / "transplant" / f"uniform-on-{method}-seed{seed}"
                if not (source / "summary.json").is_file() or (target_dir / "summary.json").is_file():
                    continue
                command = ["search", "--method", "uniform", "--scheme", str(source), *common(args)]
                run([*command, "--seed", str(seed), "--out", str(target_dir)], log, check=False)
                run(["export", str(target_dir), "-o", str(target_dir) + ".safetensors"], log, check=False)


def rows_of(out: Path, level: int) -> dict[str, dict[int, dict]]:
    """``{label: {seed: row}}`` of every finished, measured row at ``level``: the sweeps' rows (test top-1 from the
    exported file) and the transplants' (test top-1 of the packed file, measured here)."""
    found: dict[str, dict[int, dict]] = {}
    for cell in CELLS:
        path = sweep_dir(out, level, cell) / "sweep.json"
        if not path.is_file():
            continue
        for row in json.loads(path.read_text())["rows"]:
            if row.get("top1") is None or row.get("seed") is None:
                continue
            label = row["method"] + (" (no edges)" if cell == "uniform-noedges" else "")
            found.setdefault(label, {})[row["seed"]] = row
    for run_dir in sorted((out / f"L{level}" / "transplant").glob("uniform-on-*-seed*")):
        measured = run_dir.with_name(run_dir.name + ".measured.json")
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            continue
        summary = json.loads(summary_path.read_text())
        if not measured.is_file():
            evaluated = run(["eval", str(run_dir) + ".safetensors"], [], check=False)
            if "error" in evaluated:
                continue
            measured.write_text(json.dumps({"top1": evaluated["top1"], "samples": evaluated.get("samples")}))
        top1 = json.loads(measured.read_text())["top1"]
        method, seed = run_dir.name.removeprefix("uniform-on-").rsplit("-seed", 1)
        row = {**summary, "top1": top1, "seed": int(seed), "method": "uniform"}
        found.setdefault(f"uniform on {method}'s scheme", {})[int(seed)] = row
    return found


def level_table(level: int, found: dict[str, dict[int, dict]]) -> list[str]:
    lines = [f"## resnet20, {level} bits + sign", ""]
    uniforms = {k: v for k, v in found.items() if k in ("uniform", "uniform (no edges)")}
    if not uniforms:
        return [*lines, "No uniform run has finished yet.", ""]
    # the better uniform, chosen on the hold-out (mean val_top1 over its seeds), never on the test split
    best_label = max(uniforms, key=lambda k: spread([r["val_top1"] for r in uniforms[k].values()]).mean)
    best = uniforms[best_label]
    lines += [
        f"Baseline: **{best_label}** (the better uniform on the hold-out). Difference: the row's test top-1 minus the "
        "baseline's, paired by seed; 95 % t interval; exact sign-flip p (its floor, 2/2^n, beside it).",
        "",
        "| method | seeds | test top-1 % (mean ± std) | hold-out top-1 % | nominal bits | stored bits | difference "
        "| 95 % interval | p (floor) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, by_seed in sorted(found.items()):
        seeds = sorted(by_seed)
        top1 = spread([by_seed[s]["top1"] for s in seeds])
        val = spread([by_seed[s]["val_top1"] for s in seeds])
        nominal = spread([by_seed[s]["avg_bits"] for s in seeds]).mean
        stored = spread([by_seed[s]["avg_stored_bits"] for s in seeds]).mean
        cell = f"{top1.mean:.2f}" + (f" ± {top1.std:.2f}" if top1.std is not None else "")
        diff_text = interval = p_text = verdict = ""
        shared = [s for s in seeds if s in best]
        if label != best_label and len(shared) >= 1:
            d = paired_difference([by_seed[s]["top1"] for s in shared], [best[s]["top1"] for s in shared])
            diff_text = f"{d.mean:+.2f}"
            if d.low is not None:
                interval = f"[{d.low:+.2f}, {d.high:+.2f}]"
                p_text = f"{d.p:.3f} ({d.p_min:.3f})"
                base_stored = spread([best[s]["avg_stored_bits"] for s in shared]).mean
                if d.low > 0 and stored <= base_stored + 1e-9:
                    verdict = "**better**"
                elif d.high < 0:
                    verdict = "worse"
                else:
                    verdict = "no difference shown"
        lines.append(
            f"| {label} | {len(seeds)} | {cell} | {val.mean:.2f} | {nominal:.3f} | {stored:.3f} | {diff_text} | "
            f"{interval} | {p_text} | {verdict} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="runs/evidence/resnet20")
    parser.add_argument("--only-report", action="store_true", help="write the page from the finished runs only")
    args = parser.parse_args()
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    log: list[str] = []
    if not args.only_report:
        run_sweeps(args, out, log)
    lines = ["# Evidence: mixed precision against the strong uniform, over seeds", ""]
    lines += [__doc__.split("\n\n", 2)[2].strip(), ""]
    for level in sorted({level for level, _ in SCHEDULE}):
        lines += level_table(level, rows_of(out, level))
    if log:
        lines += ["Commands of this invocation:", "", "```", *log, "```"]
    write_results("benchmarks/results/evidence.md", lines)


if __name__ == "__main__":
    main()
