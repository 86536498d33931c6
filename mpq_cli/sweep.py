"""``mpq sweep``: one model searched at several budgets and methods (and seeds), each run exported and evaluated.

Every (method, target) pair (with ``seeds``, every (method, target, seed)) gets its own run directory
under the sweep's folder, so a sweep resumes where it stopped: a finished run made with the same
settings (the fingerprint ``--resume`` checks) is read back, an interrupted one (its ``checkpoint.pt``
exists) continues with ``--resume``, and an exported file newer than its run is evaluated again rather
than re-exported. A finished or interrupted run made with other settings is never shown under the new
ones: its row is refused ("stale", naming what differs) unless ``force``, which deletes it and runs it
again. A budget a method refuses (an error) or misses (``budget_met`` false) is a row of the table,
not a gap.

With ``seeds``, each (method, target) cell is summarised over its seeds (:func:`seed_cells`): mean ± std
of the file's top-1 and stored bits, and each method's difference to uniform at the same target paired
by seed, with its interval and exact p-value (``stats.py``).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import MpqError, StaleRunError
from .layers import LayerSelection
from .rundir import write_json, write_text_atomic
from .stats import MAX_EXACT_PAIRS, paired_difference, spread

# the method every other is compared with, seed by seed, at the same target
BASELINE = "uniform"
# stored bits within this of uniform's count as "at or under" (the means of equal files can differ in the last bits)
BITS_TOLERANCE = 1e-9


@dataclass
class SweepRow:
    """One (method, target, seed) run of a sweep and what its exported file measured."""

    method: str
    target_bits: float
    run: str
    seed: int | None = None  # with ``Sweep.seeds``; None: the sweep's one --seed
    status: str = "pending"  # done, reused, over budget, refused, stale
    error: str | None = None
    file: str | None = None
    avg_bits: float | None = None
    avg_stored_bits: float | None = None
    file_bytes: int | None = None
    top1: float | None = None  # measured on the exported file
    samples: int | None = None  # test images that measurement read
    split_samples: int | None = None  # of the test split's
    run_top1: float | None = None  # the run's own final evaluation (the test split)
    val_top1: float | None = None  # the run's final top-1 on its --val-split hold-out (None without one)
    seconds: float | None = None
    pareto: bool = False

    @property
    def measured(self) -> bool:
        return self.top1 is not None and self.file_bytes is not None


def run_name(method: str, target: float, seed: int | None = None) -> str:
    """``csq-2bits``, ``alq-0.5bits``, ``csq-2bits-seed1`` (with ``--seeds``): the run directory of one row."""
    return f"{method}-{target:g}bits" + (f"-seed{seed}" if seed is not None else "")


def method_fields(method: str) -> set[str]:
    """The config fields a method takes (``--FIELD-NAME`` options)."""
    from .methods import METHODS

    return {f.name for f in fields(METHODS[method].config_class)} - {"version"}


def check_methods(methods: list[str]) -> None:
    """At least one method, none twice, every one registered."""
    from .methods import METHODS

    if not methods:
        raise MpqError("mpq sweep needs at least one --method")
    if len(set(methods)) != len(methods):
        raise MpqError("mpq sweep: a method is listed twice")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MpqError(f"unknown method {unknown[0]!r} (choose from {', '.join(sorted(METHODS))})")


def pareto_front(rows: list[SweepRow]) -> None:
    """Mark the rows no other row beats on both file bytes (fewer) and top-1 (higher)."""
    measured = [r for r in rows if r.measured]
    for r in measured:
        r.pareto = not any(
            o.file_bytes <= r.file_bytes and o.top1 >= r.top1 and (o.file_bytes < r.file_bytes or o.top1 > r.top1)
            for o in measured
        )


@dataclass
class SweepCell:
    """One (method, target) over its seeds: mean ± std of its measured runs, and its top-1 minus uniform's
    at the same target, paired by seed (the seeds where both files were measured)."""

    method: str
    target_bits: float
    runs: int  # rows of the cell, measured or not
    n: int  # runs whose exported file was measured
    seeds: list = field(default_factory=list)  # those runs' seeds
    top1_mean: float | None = None
    top1_std: float | None = None  # None with one run
    stored_bits_mean: float | None = None
    stored_bits_std: float | None = None
    # stats.PairedDifference's fields, the paired seeds, and both sides' mean stored bits over them
    vs_uniform: dict | None = None
    verdict: str | None = None  # baseline, better, more bits, worse, tie; None with fewer than three pairs
    better: bool = False  # the interval lies above zero and the stored bits are at or under uniform's


def seed_cells(rows: list[SweepRow], baseline: str = BASELINE) -> list[SweepCell]:
    """Each (method, target) of ``rows`` summarised over its seeds, in the rows' order."""
    cells = []
    for method, target in dict.fromkeys((r.method, r.target_bits) for r in rows):
        runs = [r for r in rows if (r.method, r.target_bits) == (method, target)]
        measured = [r for r in runs if r.measured]
        cell = SweepCell(method, target, len(runs), len(measured), [r.seed for r in measured])
        cells.append(cell)
        if not measured:
            continue
        top1, bits = spread([r.top1 for r in measured]), spread([r.avg_stored_bits for r in measured])
        cell.top1_mean, cell.top1_std = top1.mean, top1.std
        cell.stored_bits_mean, cell.stored_bits_std = bits.mean, bits.std
        if method == baseline:
            cell.verdict = "baseline"
            continue
        base = {r.seed: r for r in rows if (r.method, r.target_bits) == (baseline, target) and r.measured}
        pairs = [(r, base[r.seed]) for r in measured if r.seed in base]
        if not pairs:
            continue
        diff = paired_difference([a.top1 for a, _ in pairs], [b.top1 for _, b in pairs])
        own_bits = spread([a.avg_stored_bits for a, _ in pairs]).mean
        base_bits = spread([b.avg_stored_bits for _, b in pairs]).mean
        cell.vs_uniform = {
            **asdict(diff),
            "seeds": [a.seed for a, _ in pairs],
            "stored_bits": own_bits,
            "uniform_stored_bits": base_bits,
        }
        cell.verdict = _verdict(diff, own_bits <= base_bits + BITS_TOLERANCE)
        cell.better = cell.verdict == "better"
    return cells


MIN_VERDICT_PAIRS = 3  # two pairs give an interval, but their sign-flip p cannot go below 0.5: no verdict


def _verdict(diff, bits_at_or_under: bool) -> str | None:
    """better only where the interval lies above zero at no more stored bits than uniform's; none from fewer
    than three pairs."""
    if diff.low is None or diff.n < MIN_VERDICT_PAIRS:
        return None
    if diff.low > 0:
        return "better" if bits_at_or_under else "more bits"
    return "worse" if diff.high < 0 else "tie"


@dataclass
class Sweep:
    """What ``mpq sweep`` runs: the methods and targets, and every run's shared settings."""

    methods: list[str]
    targets: list[float]
    out: Path
    model: object  # api.ModelOptions
    data: object  # data.DataConfig
    train: dict = field(default_factory=dict)  # TrainConfig fields over each method's defaults
    # method config fields (act_bits, --FIELD-NAME, --set); each run gets those its method has
    method_config: dict = field(default_factory=dict)
    selection: LayerSelection = field(default_factory=LayerSelection)  # --keep-fp, --fix-bits of every run
    probe_batches: int = 8
    recipe: str = "auto"
    force: bool = False  # re-run rows whose runs were made with other settings
    seeds: list[int] | None = None  # every cell over these seeds; None: one run per cell at train["seed"]

    def __post_init__(self) -> None:
        check_methods(self.methods)
        if not self.targets:
            raise MpqError("mpq sweep needs at least one --target-bits")
        if len(set(self.targets)) != len(self.targets):
            raise MpqError("mpq sweep: a target is listed twice")
        if self.seeds is not None:
            if not self.seeds or len(set(self.seeds)) != len(self.seeds):
                raise MpqError("--seeds needs distinct seeds, e.g. 0,1,2")
            if len(self.seeds) > MAX_EXACT_PAIRS:  # the exact p-value enumerates 2^n sign flips
                raise MpqError(f"--seeds takes at most {MAX_EXACT_PAIRS} seeds, got {len(self.seeds)}")
        if getattr(self.selection, "scheme", None) is not None and len(self.targets) > 1:
            raise MpqError("--scheme fixes every layer's bits: a sweep with it takes one --target-bits")
        if "target_bits" in self.method_config:
            raise MpqError("mpq sweep: the targets are --target-bits's list, not a method field")
        # a field is passed to the swept methods that have it; one that none of them has is a mistake
        for name in self.method_config:
            if not any(name in method_fields(m) for m in self.methods):
                raise MpqError(
                    f"--{name.replace('_', '-')} is not a field of {', '.join(self.methods)} (`mpq methods`)"
                )

    def method_config_for(self, method: str, target: float) -> dict:
        """The method fields of one run: the sweep's that ``method`` has, and the target."""
        own = method_fields(method)
        return {**{k: v for k, v in self.method_config.items() if k in own}, "target_bits": target}

    def partial_fields(self) -> dict[str, list[str]]:
        """Fields given that some swept methods lack: field -> the methods that take it."""
        taking = {name: [m for m in self.methods if name in method_fields(m)] for name in self.method_config}
        return {name: ms for name, ms in taking.items() if len(ms) < len(self.methods)}


def run_sweep(sweep: Sweep, reporter=None) -> dict:
    """Run (or resume) every row, export and evaluate each, and write sweep.json, sweep.md and sweep.png."""
    from . import api
    from .distributed import launched
    from .engine import Reporter

    if launched():  # every rank would run and write every row
        raise MpqError("mpq sweep runs in one process; run each search under torchrun instead (README, Several GPUs)")
    reporter = reporter or Reporter()
    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, taking in sweep.partial_fields().items():
        reporter.log(f"--{name.replace('_', '-')} applies to {', '.join(taking)} only (the other methods lack it)")
    rows: list[SweepRow] = []
    fp_top1 = None
    # seeds outermost: an interrupted sweep has every cell at its first seeds rather than some cells at all
    for seed in sweep.seeds if sweep.seeds is not None else [None]:
        for method in sweep.methods:
            for target in sweep.targets:
                row = SweepRow(method, target, str(out / run_name(method, target, seed)), seed=seed)
                rows.append(row)
                fp_top1 = _run_row(api, sweep, row, reporter, fp_top1)
                _write(out, rows, fp_top1, sweep)
    return _write(out, rows, fp_top1, sweep, final=True)


def _run_row(api, sweep: Sweep, row: SweepRow, reporter, fp_top1):
    """Search (or read back) one row's run, export and evaluate its file, and fill ``row``; returns the
    FP32 reference's top-1 as the run measured it (or ``fp_top1`` unchanged)."""
    run_dir = Path(row.run)
    summary_path = run_dir / "summary.json"
    packed = run_dir.with_name(f"{run_dir.name}.safetensors")
    options = api.SearchOptions(
        row.method,
        sweep.method_config_for(row.method, row.target_bits),
        copy.deepcopy(sweep.selection),  # a run never sees another's selection object
        sweep.probe_batches,
        sweep.recipe,
    )
    train = dict(sweep.train) if row.seed is None else {**sweep.train, "seed": row.seed}
    try:
        summary = _search_row(api, sweep, train, options, run_dir, packed, reporter)
    except StaleRunError as exc:
        row.status, row.error = "stale", f"{exc}; `mpq sweep --force` runs it again"
        return fp_top1
    except MpqError as exc:
        row.status, row.error = "refused", str(exc)
        return fp_top1
    row.status = "reused" if summary.pop("reused", False) else "done"
    fp_top1 = summary.get("fp_top1", fp_top1)
    row.run_top1, row.seconds = summary.get("top1"), summary.get("seconds")
    row.val_top1 = summary.get("val_top1")
    if not summary.get("budget_met", True):
        row.status = "over budget"
    if not packed.is_file() or packed.stat().st_mtime < summary_path.stat().st_mtime:
        api.export(run_dir, packed)
    size = api.inspect(packed)
    row.file = str(packed)
    row.avg_bits, row.avg_stored_bits = size["avg_bits"], size["avg_stored_bits"]
    row.file_bytes = size["file_bytes"]
    # the sweep's --limit-val-batches bounds this measurement too: FP32's and the runs' own top-1 are on it
    overrides = {"limit_val_batches": getattr(sweep.data, "limit_val_batches", None)}
    if getattr(sweep.data, "data_dir", None):
        overrides["data_dir"] = sweep.data.data_dir
    evaluated = api.evaluate_packed(packed, overrides, device=sweep.train.get("device"), reporter=reporter)
    row.top1, row.samples = evaluated["top1"], evaluated.get("samples")
    row.split_samples = evaluated.get("split_samples")
    return fp_top1


def _search_row(api, sweep: Sweep, train: dict, options, run_dir: Path, packed: Path, reporter) -> dict:
    """One row's search: its finished run read back when made with these settings, an interrupted one
    continued; a run made with other settings raises StaleRunError, or with ``force`` is deleted
    (with its packed file) and run again."""
    for attempt in range(2):
        try:
            return api.search(
                sweep.model,
                sweep.data,
                dict(train),
                options,
                out=str(run_dir),
                resume=(run_dir / "checkpoint.pt").is_file(),
                reporter=reporter,
                reuse_finished=True,
            )
        except StaleRunError:
            if not sweep.force or attempt:
                raise
            reporter.log(f"--force: {run_dir} was made with other settings; running it again")
            shutil.rmtree(run_dir)
            packed.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def _write(out: Path, rows: list[SweepRow], fp_top1, sweep: Sweep, final: bool = False) -> dict:
    """sweep.json and sweep.md after every row (an interrupted sweep leaves its table so far); the chart at the end."""
    pareto_front(rows)
    result = {
        "command": "sweep",
        "model": getattr(sweep.model, "name", None),
        "data": getattr(sweep.data, "name", None),
        "fp32_top1": fp_top1,
        "seeds": sweep.seeds,
        "baseline": BASELINE,
        "rows": [asdict(r) for r in rows],
        "cells": [asdict(c) for c in seed_cells(rows)],
        "out": str(out),
    }
    if final:
        from .plots import sweep_chart

        if any(r.measured for r in rows):
            result["chart"] = str(sweep_chart(result, out / "sweep.png"))
    write_json(out / "sweep.json", result)
    write_text_atomic(out / "sweep.md", sweep_markdown(result))
    return result


def sweep_markdown(result: dict) -> str:
    seeded = result.get("seeds") is not None
    lines = [
        f"# mpq sweep: {result['model']} on {result['data']}",
        "",
        "Top-1 measured on each exported file (`mpq eval FILE`); bits averaged over quantized weights, "
        "nominal as each method counts them, stored as the file holds them. ★: on the Pareto front "
        "(no other row has fewer file bytes and a higher top-1).",
        "",
    ]
    from .report import measured_on

    partial = next((measured_on(r) for r in result["rows"] if measured_on(r)), "")
    if partial:  # every row and the FP32 reference read the same --limit-val-batches slice
        lines += [f"Partial measurements: every top-1 here is{partial} (`--limit-val-batches`).", ""]
    if result.get("fp32_top1") is not None:
        lines += [f"FP32 reference (the checkpoint): top-1 {result['fp32_top1']:.2f} %{partial}.", ""]
    if seeded:
        lines += _cells_markdown(result)
    seed_head, seed_rule = ("seed | ", "---|") if seeded else ("", "")
    lines += [
        f"| method | target bits | {seed_head}status | nominal bits | stored bits | file bytes | top-1 % (file) "
        "| Pareto |",
        f"|---|---|{seed_rule}---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        head = f"| {r['method']} | {r['target_bits']:g} | " + (f"{r['seed']} | " if seeded else "")
        if r["error"]:
            lines.append(f"{head}{r['status']}: {r['error']} | | | | | |")
            continue
        if r["top1"] is None:
            lines.append(f"{head}{r['status']} | | | | | |")
            continue
        lines.append(
            f"{head}{r['status']} | {r['avg_bits']:.3f} | "
            f"{r['avg_stored_bits']:.3f} | {r['file_bytes']:,} | {r['top1']:.2f}{measured_on(r)} | "
            f"{'★' if r['pareto'] else ''} |"
        )
    if result.get("chart"):
        lines += ["", f"![top-1 against stored bits]({Path(result['chart']).name})"]
    return "\n".join(lines) + "\n"


VERDICTS = {
    "baseline": "baseline",
    "better": "**better**",
    "more bits": "higher, at more stored bits",
    "worse": "worse",
    "tie": "tie (interval includes 0)",
}


def _cells_markdown(result: dict) -> list[str]:
    """The table over seeds: mean ± std per cell and the paired difference to the baseline."""
    base = result.get("baseline", BASELINE)
    lines = [
        f"## Over seeds {', '.join(map(str, result['seeds']))}",
        "",
        f"Mean ± std (n - 1) over the runs whose files were measured. Δ top-1: the method's minus {base}'s "
        "at the same target, paired by seed. 95 % interval: Student t on those differences (exact if they "
        "are normal). p: exact two-sided sign-flip test; with n pairs no p below 2/2^n can occur (3 seeds: "
        "0.25, 5: 0.0625), shown after it, so a p at that floor is not evidence by itself. **better**: the "
        f"interval lies above zero and the mean stored bits are at or under {base}'s; tie: it includes zero. "
        "Fewer than three seeds paired: no verdict (two give an interval, shown, but a p of 0.5 at best).",
        "",
    ]
    if not any(c["method"] == base for c in result["cells"]):
        lines += [f"No paired differences: {base} is not among the swept methods (add it to --method).", ""]
    lines += [
        f"| method | target bits | n | top-1 % | stored bits | Δ top-1 vs {base} | 95 % interval | p (floor) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        head = f"| {c['method']} | {c['target_bits']:g} | {c['n']} of {c['runs']} | "
        if not c["n"]:
            lines.append(f"{head} | | | | | |")
            continue
        diff, interval, p = "", "", ""
        d = c["vs_uniform"]
        if d is not None:
            diff = f"{d['mean']:+.2f} (n {d['n']})"
            if d["low"] is not None:
                interval = f"[{d['low']:+.2f}, {d['high']:+.2f}]"
                p = f"{d['p']:.3g} ({d['p_min']:.3g})"
        verdict = VERDICTS.get(c["verdict"], "") if c["verdict"] else ("one seed" if d is not None else "")
        lines.append(
            f"{head}{_mean_std(c['top1_mean'], c['top1_std'], 2)} | "
            f"{_mean_std(c['stored_bits_mean'], c['stored_bits_std'], 3)} | {diff} | {interval} | {p} | {verdict} |"
        )
    return lines + [""]


def _mean_std(mean: float, std: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
