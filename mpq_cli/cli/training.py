"""``mpq train``, ``mpq search`` and ``mpq finetune``."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from .entry import app
from .options import (
    DATA,
    METHOD,
    METHOD_NAMES,
    MODEL,
    SEARCH_TRAINING,
    TRAINING,
    CompileOpt,
    DataDirOpt,
    JsonOpt,
    LimitTrainOpt,
    LimitValOpt,
    LrOpt,
    OptimOpt,
    OutOpt,
    QuietOpt,
    ResumeOpt,
    SchedOpt,
    UserModelOpt,
    WdOpt,
    method_settings,
    with_groups,
)
from .output import RichReporter, emit, exit_if_over_budget, handle_errors


@app.command()
@handle_errors
@with_groups(MODEL, DATA, TRAINING)
def train(
    model,
    data,
    training,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train the FP32 baseline: the reference every search starts from and is measured against.

    Defaults: 12 epochs of Adam (lr 2e-3, cosine). Writes RUN/model.safetensors.
    """
    from .. import api

    reporter = RichReporter(quiet, bars=False if as_json else None)
    summary = api.train(model, data, training, out=out, resume=resume, reporter=reporter)
    emit(summary, as_json, "FP32")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
@with_groups(MODEL, DATA, SEARCH_TRAINING, METHOD)
def search(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help=f"Search method: {METHOD_NAMES} (`mpq methods` describes them).")] = "csq",
    target_bits: Annotated[
        float | None,
        typer.Option(
            help="Average bits per weight as the method counts them (CSQ, "
            "BSQ, uniform: magnitude bits; BMPQ: two's complement width; "
            "ALQ: binary bases per weight, may be below 1), weighted by "
            "parameters (default: the method's; CSQ, uniform, BMPQ 3; ALQ 1; "
            "BSQ none: open loop with its alpha)."
        ),
    ] = None,
    model=None,
    data=None,
    training=None,
    method_options=None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Search a mixed-precision scheme and write a run directory (state, scheme.json, report.md).

    Default epochs: 10. Training defaults (optimizer, lr, weight decay, schedule): from a --checkpoint or pretrained
    --weights, those measured to work from a trained reference; else the method's paper's (--recipe paper|checkpoint
    chooses; `mpq methods` lists both).

    Method options: every field of the method's config is also an option, --FIELD-NAME VALUE (e.g. bmpq: --bits 2,4 --warmup-epochs 2 --interval 2 --budget-bytes N; bsq: --alpha 0.02; alq: --max-bits 6 --prune-ratio 0.4 --rounds 4 --groups 'classifier.*=channel'). `mpq methods` lists them with their defaults.
    """
    from .. import api
    from ..methods import get_method

    method_name = method.value if isinstance(method, enum.Enum) else method
    get_method(method_name)  # an unknown name is refused before its fields are looked up
    method_config, selection = method_settings(ctx, [method_name], method_options)
    if target_bits is not None:
        method_config["target_bits"] = target_bits
    options = api.SearchOptions(
        method_name, method_config, selection, method_options["probe_batches"], method_options["recipe"]
    )
    reporter = RichReporter(quiet, bars=False if as_json else None)
    summary = api.search(model, data, training, options, out=out, resume=resume, reporter=reporter)
    emit(summary, as_json, "search")
    exit_if_over_budget(summary)


@app.command()
@handle_errors
def finetune(
    run: Annotated[Path, typer.Argument(help="A search run directory.")],
    epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs (default: 5, as api.finetune).")] = None,
    lr: LrOpt = None,
    optimizer: OptimOpt = None,
    schedule: SchedOpt = None,
    weight_decay: WdOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the run's).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: the run's).")] = None,
    data_dir: DataDirOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the run's).")] = None,
    limit_train_batches: LimitTrainOpt = None,
    limit_val_batches: LimitValOpt = None,
    compile_kernels: CompileOpt = False,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Run directory to write (default: RUN-finetune).")
    ] = None,
    model: UserModelOpt = None,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train a searched model further under its fixed scheme (CSQ: Alg. 1's second stage; ALQ: more basis and coordinate epochs at the fixed widths)."""
    train_overrides = {
        k: v
        for k, v in dict(
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            schedule=schedule,
            weight_decay=weight_decay,
            seed=seed,
            device=device,
            compile=compile_kernels or None,
        ).items()
        if v is not None
    }
    data_overrides = {
        k: v
        for k, v in dict(
            data_dir=data_dir,
            batch_size=batch_size,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
        ).items()
        if v is not None
    }
    from .. import api

    summary = api.finetune(
        str(run),
        train_overrides,
        data_overrides,
        out=out,
        resume=resume,
        reporter=RichReporter(quiet, bars=False if as_json else None),
        model=model,
    )
    emit(summary, as_json, "finetune")
    exit_if_over_budget(summary)
