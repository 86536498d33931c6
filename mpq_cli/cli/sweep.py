"""``mpq sweep``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import MpqError
from .entry import app
from .options import (
    DATA,
    METHOD,
    MODEL,
    SEARCH_TRAINING,
    JsonOpt,
    QuietOpt,
    float_list,
    int_list,
    method_settings,
    with_groups,
)
from .output import RichReporter, handle_errors, out_console, print_json


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
@with_groups(MODEL, DATA, SEARCH_TRAINING, METHOD)
def sweep(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help="Methods, comma-separated (e.g. csq,uniform).")] = "csq,uniform",
    target_bits: Annotated[str, typer.Option(help="Budgets, comma-separated, as each method counts bits.")] = "2,3,4",
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Run every (method, budget) once per seed, comma-separated (0,1,2), and give each its mean ± std and "
            "its paired difference to uniform with a 95 % interval and an exact p-value. Default: one run at --seed."
        ),
    ] = None,
    model=None,
    data=None,
    training=None,
    method_options=None,
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
    """Search one model at several budgets and methods (and seeds), export and evaluate each run, and chart accuracy against size.

    Each (method, budget) is its own run directory under --out (METHOD-Bbits; with --seeds, METHOD-Bbits-seedS); run again, a sweep reads back the finished runs made with the same settings (the fingerprint --resume checks) and resumes an interrupted one; a run made with other settings is refused as stale, or with --force run again. Writes sweep.json, sweep.md (the table, the Pareto front marked; with --seeds, mean ± std per cell and the paired difference to uniform) and sweep.png (top-1 against stored bits; error bars over seeds). Optimizer, lr and weight decay are each method's unless given.

    Every search option applies to every run: --keep-fp, --fix-bits, --set and the method fields (--FIELD-NAME VALUE, `mpq methods`); a field goes to the swept methods that have it and is refused when none has it.
    """
    from ..sweep import Sweep, check_methods, run_sweep

    methods = [m for m in method.replace(" ", "").split(",") if m]
    check_methods(methods)  # before their fields are looked up
    if seeds is not None and training["seed"] != 0:
        raise MpqError("give --seeds or --seed, not both")
    method_config, selection = method_settings(ctx, methods, method_options)
    plan = Sweep(
        methods=methods,
        targets=float_list(target_bits, "--target-bits"),
        out=Path(out),
        model=model,
        data=data,
        train=training,
        method_config=method_config,
        selection=selection,
        probe_batches=method_options["probe_batches"],
        recipe=method_options["recipe"],
        force=force,
        seeds=None if seeds is None else int_list(seeds, "--seeds"),
    )
    result = run_sweep(plan, reporter=RichReporter(quiet, bars=False if as_json else None))
    if as_json:
        print_json(result)
        return
    out_console.print(Path(out, "sweep.md").read_text(), highlight=False, markup=False, soft_wrap=True)
