"""``mpq search`` and ``mpq finetune``: a method trained inside the shared engine, its scheme fixed, the run saved;
and ``load_run``, which rebuilds a finished run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import distributed
from ..data import DataConfig
from ..engine import (
    Reporter,
    TrainConfig,
    evaluate,
    fit,
    ranks_state_digests,
)
from ..errors import MpqError
from ..layers import (
    LayerSelection,
)
from ..methods import Method, get_method
from ..models import with_aliases
from ..models.loading import read_state_dict
from ..record import RunRecord
from ..rundir import (
    file_fingerprint,
    read_json,
    read_jsonl,
)
from .context import (
    Context,
    ModelOptions,
    budget_probe,
    checkpoint_bytes,
    final_eval,
    in_session,
    new_head_record,
    setup,
    training,
    val_record,
)
from .runs import claim_run_dir, elapsed_before, finished_run, resume_state
from .save import save_quantized_run

# ------------------------------------------------------------------------------- search & co.
SEARCH_EPOCHS = 10  # a search's length unless --epochs or a method's defaults say otherwise
FINETUNE_EPOCHS = 5  # mpq finetune's and api.finetune's length unless given
RECIPES = ("auto", "paper", "checkpoint")


def resolve_recipe(recipe: str, model: ModelOptions) -> str:
    """``auto``: ``checkpoint`` when the search starts from trained weights (a --checkpoint, or torchvision
    weights other than none), else ``paper``; the others as given."""
    if recipe not in RECIPES:
        raise MpqError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe != "auto":
        return recipe
    pretrained = model.weights is not None and str(model.weights).lower() != "none"
    return "checkpoint" if model.checkpoint or pretrained else "paper"


@dataclass
class SearchOptions:
    """Method-independent search settings.

    Args:
        method: registered method name.
        method_config: fields of the method's config (``target_bits``, ``act_bits``, ...), over those
            ``--recipe checkpoint`` sets (``Method.checkpoint_fields``).
        selection: FP layers and fixed bits.
        probe_batches: batches the loss-aware final steps measure: the hold-out's first ones with
            ``DataConfig.val_split``, else a fixed set of training batches.
        recipe: whose training defaults fill what ``train_cfg`` leaves unset: ``paper`` (the method's paper's
            schedule, made for training from scratch), ``checkpoint`` (measured to work from a trained
            reference) or ``auto`` (``checkpoint`` when the model starts from trained weights).
    """

    method: str = "csq"
    method_config: dict = field(default_factory=dict)
    selection: LayerSelection = field(default_factory=LayerSelection)
    probe_batches: int = 8
    recipe: str = "auto"


@in_session
def search(
    model: ModelOptions,
    data: DataConfig,
    train_cfg: TrainConfig | dict | None,
    options: SearchOptions,
    *,
    out: str | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    reuse_finished: bool = False,
) -> dict:
    """Run a mixed-precision search and write its run directory.

    ``train_cfg``: a TrainConfig, or a dict of settings over the defaults of ``options.recipe`` (the method's
    paper's, ``Method.training_defaults``, or from a checkpoint ``Method.checkpoint_defaults``; 10 epochs),
    exactly as ``mpq search`` applies them.
    ``reuse_finished``: when ``out`` holds a finished run, return its summary (``reused`` true) if it
    was made with this configuration (the fingerprint ``--resume`` checks), else raise
    :class:`StaleRunError` naming what differs (``mpq sweep``).

    Returns the summary (``top1``, ``avg_bits``, ``out``, ...).
    """
    reporter = reporter or Reporter()
    if options.probe_batches < 1:
        raise MpqError("--probe-batches must be >= 1")
    method_cls = get_method(options.method)
    recipe = resolve_recipe(options.recipe, model)
    method_cfg = method_cls.config_class.from_dict(method_cls.recipe_fields(recipe, options.method_config))
    train_cfg = training(train_cfg, {"epochs": SEARCH_EPOCHS, **method_cls.recipe_defaults(recipe)})
    ctx = setup(model, data, train_cfg, reporter)
    fp_top1 = None
    if model.checkpoint:
        fp_top1 = evaluate(ctx.model, ctx.test, amp=train_cfg.amp, reporter=reporter, description="FP32 eval")["top1"]
    method = method_cls(method_cfg, options.selection.with_scheme(options.method))
    method.prepare(ctx.model, loss_probe=budget_probe(ctx, options.probe_batches))
    record = RunRecord.for_search(
        model=ctx.spec.to_dict(),
        checkpoint=model.checkpoint,
        checkpoint_sha256=file_fingerprint(model.checkpoint),
        head=new_head_record(model, ctx),
        data=ctx.data,
        train=train_cfg,
        method=options.method,
        method_config=method_cfg,
        selection=method.selection,
        probe_batches=options.probe_batches,
        fp_top1=fp_top1,
    )
    if reuse_finished and out and (Path(out) / "summary.json").is_file():
        return finished_run(Path(out), record)
    record = record.finished(checkpoint_bytes(model.checkpoint))
    run_dir = claim_run_dir(out, options.method, model.name, resume)
    return _train_quantized(run_dir, resume, record, method, ctx, train_cfg, reporter, "search", recipe=recipe)


def _train_quantized(
    claim,
    resume: bool,
    record: RunRecord,
    method: Method,
    ctx: Context,
    train_cfg: TrainConfig,
    reporter: Reporter,
    command: str,
    recipe: str | None = None,
) -> dict:
    """A search's or fine-tuning's run: take the run directory (``claim``, locked for the run), check a
    ``--resume`` against ``record`` before writing anything, train, fix the scheme and save the run."""
    with claim as run_dir:
        state = resume_state(run_dir, resume, command, record.fingerprint, reporter)
        if distributed.world().is_main:
            record.save(run_dir)
        started = time.time() - elapsed_before(state)
        records = fit(
            ctx.model,
            ctx.train,
            ctx.val,
            train_cfg,
            hooks=method,
            run_dir=run_dir,
            stage=command,
            reporter=reporter,
            resume=state,
            fingerprint=record.fingerprint,
        )
        return _finish(
            run_dir, method, ctx, train_cfg, records, record.fp_top1, started, reporter, command=command, recipe=recipe
        )


def _finish(run_dir, method, ctx, train_cfg, records, fp_top1, started, reporter, command, recipe=None):
    result = method.finalize()
    codes = method.layer_codes()  # one computation feeds the collapse check, the scheme and codes.safetensors
    here = distributed.world()
    if here.active:  # the final model too (the budget step ran on every rank), before any rank may stop
        codes_digest = distributed.digest(method.agreement_tensors())
        digests = ranks_state_digests(ctx.model, method, buffers=True)
        distributed.check_agreement({**digests, "codes and bits": codes_digest}, "the final model and scheme")
    refuse_collapsed_layers(method, codes)
    final, held = final_eval(ctx, train_cfg.amp, reporter)
    if not here.is_main:  # rank 0 writes the run; the others return its summary once it is written
        return {**distributed.broadcast_object(None), "rank": here.rank, "codes_sha256": codes_digest}
    records = read_jsonl(run_dir / "metrics.jsonl")  # every epoch, those before a --resume included
    base = {
        "command": command,
        "method": method.name,
        "model": ctx.spec.name,
        "data": ctx.info.name,
        "synthetic": ctx.info.synthetic,
        "target_bits": getattr(method.config, "target_bits", None),
        "budget_on": method.config.budget_on,
        # what --target-bits caps: the nominal average, or with --budget-on stored the file's stored bits per weight
        "avg_counted_bits": method.budget_average(),
        "fp_top1": fp_top1,
        **({"recipe": recipe} if recipe else {}),  # whose training defaults the search used (mpq search only)
        **val_record(ctx, held),
        "seconds": round(time.time() - started, 1),
    }
    summary = save_quantized_run(run_dir, method, ctx.model, base, final, result, records, codes)
    return distributed.broadcast_object(summary)


def refuse_collapsed_layers(method: Method, codes: dict | None = None) -> None:
    """A layer whose every code is zero outputs its bias alone: a collapse, unless 0 bits were asked for
    (``--fix-bits NAME=0``, or ``--allow-zero-bits true`` for the methods that may choose it)."""
    allowed = method.config.allow_zero_bits
    collapsed = []
    for name, lc in (codes if codes is not None else method.layer_codes()).items():
        if method.selection.fixed_bits(name) == 0 or allowed:
            continue
        if lc.form.is_empty(lc):
            collapsed.append(name)
    if collapsed:
        more = f" (+{len(collapsed) - 3} more)" if len(collapsed) > 3 else ""
        raise MpqError(
            f"the search ended with layer(s) {', '.join(collapsed[:3])}{more} at all-zero codes (a "
            "collapsed model); the run directory keeps the last epoch's checkpoint: lower --lr, train "
            "longer or raise --target-bits, then --resume or start again"
        )


def load_run(
    run_dir: str | Path,
    data_overrides: dict | None = None,
    train_overrides: dict | None = None,
    *,
    model: str | None = None,
    with_probe: bool = False,
):
    """Rebuild a search/finetune run: ``(record, ctx, method, data, train_cfg)`` with the run's state loaded.

    ``model`` names the user factory of a run made with one (never taken from the run); ``with_probe``
    gives the method its loss probe (the run's ``probe_batches`` batches: of its recorded hold-out, if
    any, else of training), to train further. The run's recorded ``val_split`` holds out the same images.
    """
    run_dir = Path(run_dir)
    record = RunRecord.load(run_dir, quantized=True)
    data = record.data(data_overrides)
    train_cfg = record.training(train_overrides)
    method_cls = get_method(record.method)
    method_config, selection = record.method_config(), record.selection()
    spec = record.model_spec(model)
    ctx = setup(ModelOptions(spec.name, None, None), data, train_cfg)
    if ctx.spec.num_classes != spec.num_classes or ctx.spec.in_channels != spec.in_channels:
        raise MpqError(
            f"the data does not fit the run's model ({spec.num_classes} classes, {spec.in_channels} channels)"
        )
    method = method_cls(method_config, selection)
    probe = budget_probe(ctx, record.probe_batches) if with_probe else None
    method.prepare(ctx.model, loss_probe=probe)
    state, _ = read_state_dict(run_dir / "model.safetensors")
    try:
        ctx.model.load_state_dict(with_aliases(ctx.model, state))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MpqError(f"{run_dir}/model.safetensors does not fit the run's config: {first}") from None
    method.load_state_dict(read_json(run_dir / "method.json"))
    return record, ctx, method, data, train_cfg


@in_session
def finetune(
    run: str,
    train_overrides: dict,
    data_overrides: dict | None = None,
    *,
    out: str | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
    model: str | None = None,
) -> dict:
    """Train a finished search further under its fixed scheme; writes a new run directory."""
    reporter = reporter or Reporter()
    run = str(run).rstrip("/")
    parent = RunRecord.load(run, quantized=True)
    # the fine-tuning schedule: FINETUNE_EPOCHS and the method's paper's settings, under what the caller gives
    defaults = {"epochs": FINETUNE_EPOCHS, **get_method(parent.method).finetune_defaults}
    record, ctx, method, data, train_cfg = load_run(
        run, data_overrides, {**defaults, **train_overrides}, model=model, with_probe=True
    )
    method.start_finetune()
    ft_record = record.finetuned(
        parent=run, data=data, train=train_cfg, model=ctx.spec.to_dict() if model is not None else None
    )
    claim = claim_run_dir(out or f"{run}-finetune", f"{record.method}-ft", ctx.spec.name, resume)
    return _train_quantized(claim, resume, ft_record, method, ctx, train_cfg, reporter, "finetune")
