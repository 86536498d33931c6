"""The evidence page (issue 28): every method against the strong uniform at equal stored bits, from a trained
reference, over seeds, with intervals; and uniform trained on each bit method's scheme (the transplant).

Run from the repository root after `bash scripts/setup.sh`, in the background (about six CPU hours on 2 cores; run
it again to continue). Every finished row is kept in `benchmarks/results/evidence/resnet20/` (its numbers, its
command, and for CSQ and BSQ its scheme): commit them, and a later run, on another machine too, runs only the rows
still missing (an interrupted row restarts; the run directories under `runs/` are scratch):

    nice .venv/bin/python benchmarks/evidence.py                 # benchmarks/results/evidence.md
    nice .venv/bin/python benchmarks/evidence.py --only-report   # the page from the kept rows alone
    python benchmarks/evidence.py --model mobilenet_v2 --device cuda --jobs 8   # on a GPU machine (its own page;
    # its reference is not in git: build it with benchmarks/references.py, and carry it to the machine)

Protocol (resnet20 on the shared CIFAR-10 JPEGs; `--model mobilenet_v2` as its page says):

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
  step (of the hold-out), the same for every row. The budget step probes every option exactly (`--budget-probe
  exact`) in the CSQ and BSQ rows; the rows "csq (budget screen)" and "bsq (budget screen)" use the screen
  (CSQ's default since its config version 9) at every seed of the 2-bit level, paired with "csq" and "bsq" by
  seed. The row "csq (reg_strength 0.1)" is CSQ's defaults with the budget regulariser's lambda at 0.1 instead of
  the paper's 0.01 (issue 31: chosen on seed 1's hold-out), paired with "csq (budget screen)".
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
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    in_repository,
    keep_record,
    partial_note,
    reference_top1,
    require_reference,
    run,
    sweep_row,
    write_results,
)

sys.path.insert(0, str(ROOT))
from mpq_cli.stats import paired_difference, spread  # noqa: E402
from mpq_cli.sweep import MIN_VERDICT_PAIRS  # noqa: E402

# Per model: the reference, its data options, the (level, seeds) schedule in the order rows run (every cell at 3
# seeds first, then the closest cells to 5), ALQ's stored bits per basis there (its target follows the others'
# stored bits), the level of the budget-screen rows, and the page.
MODELS = {
    "resnet20": {
        "reference": "benchmarks/references/resnet20-cifar10.safetensors",
        "options": [],
        "schedule": "2:0,1,2;3:0,1,2;2:0,1,2,3,4",
        "alq_per_basis": 1.86,  # 2 bases stored 3.72 bits (benchmarks/results/checkpoint_lr.md)
        "screen_level": 2,
        "page": "benchmarks/results/evidence.md",
        "title": "resnet20",
    },
    "mobilenet_v2": {
        "reference": "benchmarks/references/mobilenet_v2-cifar10.safetensors",
        "options": ["--input-size", "3,96,96", "--batch-size", "64"],
        "schedule": "3:0,1,2;4:0,1,2",
        "alq_per_basis": 1.25,  # 2 bases stored 2.50 bits (benchmarks/results/checkpoint_lr_mobilenet_v2.md)
        "screen_level": 3,
        "page": "benchmarks/results/evidence_mobilenet_v2.md",
        "title": "MobileNetV2",
    },
}


def parse_schedule(text: str) -> list[tuple[int, list[int]]]:
    return [
        (int(level), [int(s) for s in seeds.split(",")]) for level, seeds in (p.split(":") for p in text.split(";"))
    ]


EDGES = ["--edge-bits", "8"]
# per cell: methods, target of a level, extra arguments (ALQ's target: the model's stored bits per basis)
CELLS = {
    # the exact probe pinned: CSQ's rows were measured with it (the default before CSQ config version 9), and
    # the screen, CSQ's default since, has its own rows
    "edges8": ("csq,bsq,uniform", lambda level, model: level, [*EDGES, "--budget-probe", "exact"]),
    "bmpq": ("bmpq", lambda level, model: level + 1, [*EDGES, "--set", "act_follow_weights=false"]),
    "alq": ("alq", lambda level, model: round((level + 1) / MODELS[model]["alq_per_basis"], 2), EDGES),
    "uniform-noedges": ("uniform", lambda level, model: level, []),
    # issue 32, part 3: CSQ and BSQ with the budget step's screen against the exact probe, paired by seed
    "screen": ("csq,bsq", lambda level, model: level, [*EDGES, "--budget-probe", "screen"]),
    # issue 31: CSQ (its defaults, the screen) with a stronger budget regulariser, lambda 0.1 instead of the paper's
    # 0.01: the search arrives nearer its budget by itself (seed 1's hold-out chose it: docs/methods/csq.md)
    "lambda0.1": ("csq", lambda level, model: level, [*EDGES, "--set", "reg_strength=0.1"]),
}
SCREEN_LEVEL_CELLS = ("screen", "lambda0.1")  # cells measured at the model's screen level only
TRANSPLANT_FROM = ("csq", "bsq")
LABEL_SUFFIX = {
    "uniform-noedges": (" (no edges)", "-noedges"),
    "screen": (" (budget screen)", "-screen"),
    "lambda0.1": (" (reg_strength 0.1)", "-lambda0.1"),
}
# (row, reference row): a paired difference of test top-1 shown under each level's table
PAIRS = [
    ("csq (reg_strength 0.1)", "csq (budget screen)"),
    ("csq (budget screen)", "csq"),
    ("bsq (budget screen)", "bsq"),
    ("csq (budget screen, config v6)", "csq (config v6)"),
    ("csq", "csq (config v7)"),
    ("csq (config v7)", "csq (config v6)"),
]


def common(args) -> list[str]:
    return [
        "--model", args.model, "--checkpoint", MODELS[args.model]["reference"], *MODELS[args.model]["options"],
        "--data", "cifar10", "--data-dir", args.data_dir, "--val-split", "5000", "--epochs", str(args.epochs),
        "--probe-batches", "2", *(["--device", args.device] if args.device else []), *args.extra.split(),
    ]  # fmt: skip


def label_of(cell: str, method: str) -> str:
    return method + LABEL_SUFFIX.get(cell, ("", ""))[0]


def record_path(records: Path, level: int, label: str, seed: int) -> Path:
    """Where one finished row is kept: ``L2/csq-seed0.json``, ``L2/uniform-noedges-seed1.json``,
    ``L3/uniform-on-bsq-seed2.json`` (a label's spaces, parentheses and apostrophes dropped)."""
    for text, slug_part in LABEL_SUFFIX.values():
        label = label.replace(text, slug_part)
    slug = label.replace("'s scheme", "").replace(" ", "-")
    return records / f"L{level}" / f"{slug}-seed{seed}.json"


KEPT = ("method", "target_bits", "seed", "avg_bits", "avg_stored_bits", "file_bytes", "top1", "samples",
        "split_samples", "run_top1", "val_top1", "seconds")  # fmt: skip


def run_row(args, out: Path, records: Path, level: int, seed: int, cell: str, method: str, log: list[str]) -> None:
    """One method at one seed: a one-row ``mpq sweep`` (search, export, evaluate the file on the whole test split);
    its row, and for CSQ and BSQ the scheme (the transplant's input), are kept under ``records``."""
    _, target, extra = CELLS[cell]
    path = record_path(records, level, label_of(cell, method), seed)
    if path.is_file():
        return
    sweep = out / f"L{level}" / f"{cell}-{method}-seed{seed}"
    command = ["sweep", "--method", method, "--target-bits", f"{target(level, args.model):g}", *extra, *common(args)]
    command += ["--seeds", str(seed), "--out", str(sweep)]
    row, why = sweep_row(command, sweep, log)
    if row is None:
        print(f"L{level} {cell} {method} seed {seed}: {why}", file=sys.stderr)
        return
    if method in TRANSPLANT_FROM:
        scheme = Path(row["run"]) / "scheme.json"
        keep_record(path.with_suffix(".scheme.json"), json.loads(scheme.read_text()))
    summary = Path(row["run"]) / "summary.json"  # the search's health (issue 31) and its budget step's cost (32)
    health = json.loads(summary.read_text()).get("search_health") if summary.is_file() else None
    record = {**{k: row.get(k) for k in KEPT}, "search_health": health}
    keep_record(path, {**record, "label": label_of(cell, method), "command": log[-1]})


def run_transplant(args, out: Path, records: Path, level: int, seed: int, method: str, log: list[str]) -> None:
    """Uniform trained under one CSQ or BSQ run's scheme (same seed, edges included), exported and evaluated."""
    path = record_path(records, level, f"uniform on {method}'s scheme", seed)
    scheme = record_path(records, level, method, seed).with_suffix(".scheme.json")
    if path.is_file() or not scheme.is_file():
        return
    run_dir = out / f"L{level}" / "transplant" / f"uniform-on-{method}-seed{seed}"
    packed = str(run_dir) + ".safetensors"
    command = ["search", "--method", "uniform", "--scheme", str(scheme), *common(args), "--seed", str(seed)]
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt's (search refuses a used --out)
    summary = run([*command, "--out", str(run_dir)], log, check=False)
    searched = log[-1]
    exported = run(["export", str(run_dir), "-o", packed], log, check=False) if "error" not in summary else {}
    measured = (
        run(["eval", packed, "--data-dir", args.data_dir], log, check=False)
        if "error" not in summary | exported
        else {}
    )
    if "error" in summary | exported | measured:
        print(f"L{level} transplant {method} seed {seed}: {(summary | exported | measured)['error']}", file=sys.stderr)
        return
    record = {k: summary.get(k) for k in KEPT} | {"top1": measured["top1"], "samples": measured.get("samples")}
    keep_record(
        path,
        {**record, "method": "uniform", "seed": seed, "label": f"uniform on {method}'s scheme", "command": searched},
    )


def run_sweeps(args, out: Path, records: Path) -> None:
    """Seed by seed (every finished seed is a complete pairing); with ``--jobs N`` (a GPU machine), every method row
    at once, N at a time, then the transplants, which read the CSQ and BSQ rows' schemes."""
    rows, transplants = [], []
    for level, seeds in parse_schedule(args.schedule):
        for seed in seeds:
            for cell, (methods, _, _) in CELLS.items():
                # the screen rows run at every seed of the model's screen level (the screen is CSQ's default)
                screen = level == MODELS[args.model]["screen_level"]
                if cell in SCREEN_LEVEL_CELLS and not screen or cell not in (args.cells or cell).split(","):
                    continue
                rows += [(level, seed, cell, m) for m in methods.split(",") if m in (args.methods or m).split(",")]
            transplants += [(level, seed, m) for m in TRANSPLANT_FROM if m in (args.methods or m).split(",")]
            if args.jobs <= 1:  # in order, seed by seed
                for row in rows:
                    run_row(args, out, records, *row, [])
                for transplant in transplants:
                    run_transplant(args, out, records, *transplant, [])
                rows, transplants = [], []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # threads: each waits on its own process
        list(pool.map(lambda row: run_row(args, out, records, *row, []), rows))
        list(pool.map(lambda t: run_transplant(args, out, records, *t, []), transplants))


def rows_of(records: Path, level: int) -> dict[str, dict[int, dict]]:
    """``{label: {seed: row}}`` of every kept row at ``level``."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted((records / f"L{level}").glob("*-seed*.json")):
        if path.name.endswith(".scheme.json"):
            continue
        row = json.loads(path.read_text())
        found.setdefault(row["label"], {})[row["seed"]] = row
    return found


def level_table(title: str, level: int, found: dict[str, dict[int, dict]], fp32_top1: float | None = None) -> list[str]:
    lines = [f"## {title}, {level} bits + sign", ""]
    uniforms = {k: v for k, v in found.items() if k in ("uniform", "uniform (no edges)")}
    if not found:
        return [*lines, "No row has finished yet.", ""]
    # the better uniform, chosen on the hold-out (mean val_top1 over its seeds), never on the test split
    best_label = (
        max(uniforms, key=lambda k: spread([r["val_top1"] for r in uniforms[k].values()]).mean) if uniforms else None
    )
    best = uniforms.get(best_label, {})
    lines += [
        f"Baseline: **{best_label}** (the better uniform on the hold-out). Difference: the row's test top-1 minus the "
        "baseline's, paired by seed; 95 % t interval; exact sign-flip p (its floor, 2/2^n, beside it)."
        if best_label
        else "No uniform run has finished yet: no row has a difference.",
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
        cell += partial_note([by_seed[s] for s in seeds])
        diff_text = interval = p_text = verdict = ""
        shared = [s for s in seeds if s in best]
        if label != best_label and len(shared) >= 1:
            d = paired_difference([by_seed[s]["top1"] for s in shared], [best[s]["top1"] for s in shared])
            diff_text = f"{d.mean:+.2f}"
            if d.low is not None:
                interval = f"[{d.low:+.2f}, {d.high:+.2f}]"
                p_text = f"{d.p:.3f} ({d.p_min:.3f})"
                base_stored = spread([best[s]["avg_stored_bits"] for s in shared]).mean
                if len(shared) < MIN_VERDICT_PAIRS:  # mpq sweep's rule: two pairs' p cannot go below 0.5
                    verdict = f"needs {MIN_VERDICT_PAIRS} seeds"
                elif d.low > 0 and stored <= base_stored + 1e-9:
                    verdict = "**better**"
                elif d.high < 0:
                    verdict = "worse"
                else:
                    verdict = "no difference shown"
        lines.append(
            f"| {label} | {len(seeds)} | {cell} | {val.mean:.2f} | {nominal:.3f} | {stored:.3f} | {diff_text} | "
            f"{interval} | {p_text} | {verdict} |"
        )
    if best and fp32_top1 is not None:
        # what any method can gain over uniform here without beating the FP32 model it started from
        base = spread([r["top1"] for r in best.values()]).mean
        lines += [
            "",
            f"Headroom: the FP32 reference scores {fp32_top1:.2f} % test, {fp32_top1 - base:.2f} points above "
            f"**{best_label}** at {base:.2f} %: a method beats uniform here by more than that only by beating the "
            "unquantized model it started from.",
        ]
    for row, reference in PAIRS:
        shared = sorted(set(found.get(row, {})) & set(found.get(reference, {})))
        if shared:
            d = paired_difference(
                [found[row][s]["top1"] for s in shared], [found[reference][s]["top1"] for s in shared]
            )
            interval = f", 95 % interval [{d.low:+.2f}, {d.high:+.2f}], p {d.p:.3f}" if d.low is not None else ""
            lines += ["", f"{row} − {reference}, paired by seed ({len(shared)}): {d.mean:+.2f} points{interval}."]
    return [*lines, "", *health_table(found)]


def health_table(found: dict[str, dict[int, dict]]) -> list[str]:
    """The search health of the rows that have a budget step (issue 31), and its cost (issue 32): means over seeds."""
    healths = {
        label: [r["search_health"] for r in by.values() if r.get("search_health")] for label, by in found.items()
    }
    healths = {label: h for label, h in healths.items() if h}
    if not healths:
        return []
    lines = [
        "Search health (means over seeds): where each search arrived by itself, what the budget step then changed, and "
        "what it cost in training steps of the same run.",
        "",
        "| method | bits before budget step | aimed | layers changed | weights changed | budget step, training steps "
        "| healthy |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, h in sorted(healths.items()):
        cost = [x["budget_step_in_training_steps"] for x in h if x.get("budget_step_in_training_steps") is not None]
        lines.append(
            f"| {label} | {spread([x['bits_before_budget_step'] for x in h]).mean:.3f} | {h[0]['aimed_bits']:g} | "
            f"{spread([x['layers_changed'] for x in h]).mean:.1f} of {h[0]['layers']} | "
            f"{100 * spread([x['share_of_weights_changed'] for x in h]).mean:.0f} % | "
            f"{f'{spread(cost).mean:.0f}' if cost else ''} | {sum(bool(x['healthy']) for x in h)} of {len(h)} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=list(MODELS))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default=None, help="run directories (scratch; default runs/evidence/MODEL)")
    parser.add_argument("--records", default=None, help="kept rows (default benchmarks/results/evidence/MODEL)")
    parser.add_argument("--page", default=None, help="default: the model's page")
    parser.add_argument("--schedule", default=None, help="LEVEL:SEEDS;... in the order they run (default: the model's)")
    parser.add_argument("--device", default=None, help="passed to every command (default: mpq's, auto)")
    parser.add_argument("--jobs", type=int, default=1, help="rows at once (on a GPU machine: several)")
    parser.add_argument(
        "--methods", default=None, help="run only these methods' rows (comma list; default: every method)"
    )
    parser.add_argument("--cells", default=None, help=f"run only these cells (comma list of {', '.join(CELLS)})")
    parser.add_argument("--extra", default="", help="more search options, for a smoke run of this script")
    parser.add_argument("--only-report", action="store_true", help="write the page from the finished runs only")
    args = parser.parse_args()
    spec = MODELS[args.model]
    args.schedule = args.schedule or spec["schedule"]
    out = Path(args.out or f"runs/evidence/{args.model}")
    records = Path(args.records or f"benchmarks/results/evidence/{args.model}")
    out, records = (p if p.is_absolute() else ROOT / p for p in (out, records))
    if not args.only_report:
        require_reference(spec["reference"])
        run_sweeps(args, out, records)
    lines = [f"# Evidence ({spec['title']}): mixed precision against the strong uniform, over seeds", ""]
    if args.model == "mobilenet_v2":
        lines += [
            "MobileNetV2: the protocol below from `benchmarks/references/mobilenet_v2-cifar10.safetensors` (90.11 % "
            "test) at 96 px, batch 64 (704 steps an epoch), at 3 and 4 bits + sign; ALQ at (L + 1) / 1.25 bases per "
            "weight (its stored bits per basis on this network). Made for a GPU machine "
            "(`--device cuda --jobs N`): on 2 CPU cores a row is hours.",
            "",
        ]
    lines += [__doc__[__doc__.index("Protocol") :].strip(), ""]
    levels = sorted({level for level, _ in parse_schedule(args.schedule)})
    for level in levels:
        lines += level_table(spec["title"], level, rows_of(records, level), reference_top1(args.model))
    kept = [row for level in levels for by in rows_of(records, level).values() for row in by.values()]
    commands = [in_repository(row["command"]) for row in kept]
    lines += ["Commands (one per kept row; each sweep also exports and evaluates its file):", "", "```"]
    lines += [*sorted(commands), "```"]
    write_results(args.page or spec["page"], lines)


if __name__ == "__main__":
    main()
