"""``mpq sweep``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .entry import app
from .options import DATA, MODEL, TRAINING, JsonOpt, QuietOpt, float_list, with_groups
from .output import RichReporter, handle_errors, out_console, print_json


@app.command()
@handle_errors
@with_groups(MODEL, DATA, TRAINING)
def sweep(
    method: Annotated[str, typer.Option(help="Methods, comma-separated (e.g. csq,uniform).")] = "csq,uniform",
    target_bits: Annotated[str, typer.Option(help="Budgets, comma-separated, as each method counts bits.")] = "2,3,4",
    model=None,
    data=None,
    training=None,
    act_bits: Annotated[int | None, typer.Option(help="Quantize layer inputs to N bits (see search).")] = None,
    probe_batches: Annotated[
        int,
        typer.Option(
            help="Batches the loss-aware budget step measures: of the --val-split hold-out, else of training."
        ),
    ] = 8,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Folder of the sweep's runs (reused: finished runs are skipped).")
    ] = "runs/sweep",
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Run again the rows whose runs were made with other settings (they are refused otherwise)."
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Search one model at several budgets and methods, export and evaluate each run, and chart accuracy against size.

    Each (method, budget) is its own run directory under --out (METHOD-Bbits); run again, a sweep reads back the finished runs made with the same settings (the fingerprint --resume checks) and resumes an interrupted one; a run made with other settings is refused as stale, or with --force run again. Writes sweep.json, sweep.md (the table, the Pareto front marked) and sweep.png (top-1 against stored bits). Optimizer, lr and weight decay are each method's unless given.
    """
    from ..sweep import Sweep, run_sweep

    plan = Sweep(
        methods=[m for m in method.replace(" ", "").split(",") if m],
        targets=float_list(target_bits, "--target-bits"),
        out=Path(out),
        model=model,
        data=data,
        train=training,
        method_config={"act_bits": act_bits},
        probe_batches=probe_batches,
        force=force,
    )
    result = run_sweep(plan, reporter=RichReporter(quiet, bars=False if as_json else None))
    if as_json:
        print_json(result)
        return
    out_console.print(Path(out, "sweep.md").read_text(), highlight=False, markup=False, soft_wrap=True)
