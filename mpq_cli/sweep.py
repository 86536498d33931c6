"""``mpq sweep``: one model searched at several budgets and methods, each run exported and evaluated.

Every (method, target) pair gets its own run directory under the sweep's folder, so a sweep
resumes where it stopped: a finished run made with the same settings (the fingerprint ``--resume``
checks) is read back, an interrupted one (its ``checkpoint.pt`` exists) continues with ``--resume``,
and an exported file newer than its run is evaluated again rather than re-exported. A finished or
interrupted run made with other settings is never shown under the new ones: its row is refused
("stale", naming what differs) unless ``force``, which deletes it and runs it again. A budget a
method refuses (an error) or misses (``budget_met`` false) is a row of the table, not a gap.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MpqError, StaleRunError
from .rundir import write_json, write_text_atomic


@dataclass
class SweepRow:
    """One (method, target) run of a sweep and what its exported file measured."""

    method: str
    target_bits: float
    run: str
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


def run_name(method: str, target: float) -> str:
    """``csq-2bits``, ``alq-0.5bits``: the run directory of one row."""
    return f"{method}-{target:g}bits"


def pareto_front(rows: list[SweepRow]) -> None:
    """Mark the rows no other row beats on both file bytes (fewer) and top-1 (higher)."""
    measured = [r for r in rows if r.measured]
    for r in measured:
        r.pareto = not any(
            o.file_bytes <= r.file_bytes and o.top1 >= r.top1 and (o.file_bytes < r.file_bytes or o.top1 > r.top1)
            for o in measured
        )


@dataclass
class Sweep:
    """What ``mpq sweep`` runs: the methods and targets, and every run's shared settings."""

    methods: list[str]
    targets: list[float]
    out: Path
    model: object  # api.ModelOptions
    data: object  # data.DataConfig
    train: dict = field(default_factory=dict)  # TrainConfig fields over each method's defaults
    method_config: dict = field(default_factory=dict)  # shared method fields (act_bits)
    selection: object = None  # layers.LayerSelection shared by every row (--edge-bits); None: quantize every layer
    probe_batches: int = 8
    force: bool = False  # re-run rows whose runs were made with other settings

    def __post_init__(self) -> None:
        if not self.methods or not self.targets:
            raise MpqError("mpq sweep needs at least one --method and one --target-bits")
        if len(set(self.methods)) != len(self.methods) or len(set(self.targets)) != len(self.targets):
            raise MpqError("mpq sweep: a method or target is listed twice")
        from .methods import METHODS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise MpqError(f"unknown method {unknown[0]!r} (choose from {', '.join(sorted(METHODS))})")


def run_sweep(sweep: Sweep, reporter=None) -> dict:
    """Run (or resume) every row, export and evaluate each, and write sweep.json, sweep.md and sweep.png."""
    from . import api
    from .distributed import launched
    from .engine import Reporter
    from .layers import LayerSelection

    if launched():  # every rank would run and write every row
        raise MpqError("mpq sweep runs in one process; run each search under torchrun instead (README, Several GPUs)")
    reporter = reporter or Reporter()
    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[SweepRow] = []
    fp_top1 = None
    for method in sweep.methods:
        for target in sweep.targets:
            run_dir = out / run_name(method, target)
            row = SweepRow(method, target, str(run_dir))
            rows.append(row)
            summary_path = run_dir / "summary.json"
            packed = out / f"{run_name(method, target)}.safetensors"
            options = api.SearchOptions(
                method,
                {**sweep.method_config, "target_bits": target},
                sweep.selection or LayerSelection(),
                sweep.probe_batches,
            )
            try:
                summary = _search_row(api, sweep, options, run_dir, packed, reporter)
            except StaleRunError as exc:
                row.status, row.error = "stale", f"{exc}; `mpq sweep --force` runs it again"
                _write(out, rows, fp_top1, sweep)
                continue
            except MpqError as exc:
                row.status, row.error = "refused", str(exc)
                _write(out, rows, fp_top1, sweep)
                continue
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
            evaluated = api.evaluate_packed(
                packed,
                overrides,
                device=sweep.train.get("device"),
                reporter=reporter,
            )
            row.top1, row.samples = evaluated["top1"], evaluated.get("samples")
            row.split_samples = evaluated.get("split_samples")
            _write(out, rows, fp_top1, sweep)
    return _write(out, rows, fp_top1, sweep, final=True)


def _search_row(api, sweep: Sweep, options, run_dir: Path, packed: Path, reporter) -> dict:
    """One row's search: its finished run read back when made with these settings, an interrupted one
    continued; a run made with other settings raises StaleRunError, or with ``force`` is deleted
    (with its packed file) and run again."""
    for attempt in range(2):
        try:
            return api.search(
                sweep.model,
                sweep.data,
                dict(sweep.train),
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
        "rows": [asdict(r) for r in rows],
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
    lines += [
        "| method | target bits | status | nominal bits | stored bits | file bytes | top-1 % (file) | Pareto |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"| {r['method']} | {r['target_bits']:g} | refused: {r['error']} | | | | | |")
            continue
        if r["top1"] is None:
            lines.append(f"| {r['method']} | {r['target_bits']:g} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['target_bits']:g} | {r['status']} | {r['avg_bits']:.3f} | "
            f"{r['avg_stored_bits']:.3f} | {r['file_bytes']:,} | {r['top1']:.2f}{measured_on(r)} | "
            f"{'★' if r['pareto'] else ''} |"
        )
    if result.get("chart"):
        lines += ["", f"![top-1 against stored bits]({Path(result['chart']).name})"]
    return "\n".join(lines) + "\n"
