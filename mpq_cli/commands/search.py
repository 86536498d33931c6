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
from ..models.loading import read_state_dict, recorded_model
from ..rundir import (
    file_fingerprint,
    fingerprint,
    read_json,
    read_jsonl,
    read_search_config,
    versions,
    write_json,
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


@dataclass
class SearchOptions:
    """Method-independent search settings.

    Args:
        method: registered method name.
        method_config: fields of the method's config (``target_bits``, ``act_bits``, ...).
        selection: FP layers and fixed bits.
        probe_batches: batches the loss-aware final steps measure: the hold-out's first ones with
            ``DataConfig.val_split``, else a fixed set of training batches.
    """

    method: str = "csq"
    method_config: dict = field(default_factory=dict)
    selection: LayerSelection = field(default_factory=LayerSelection)
    probe_batches: int = 8


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

    ``train_cfg``: a TrainConfig, or a dict of settings over the method's paper's training defaults
    (``Method.training_defaults``, 10 epochs), exactly as ``mpq search`` applies them.
    ``reuse_finished``: when ``out`` holds a finished run, return its summary (``reused`` true) if it
    was made with this configuration (the fingerprint ``--resume`` checks), else raise
    :class:`StaleRunError` naming what differs (``mpq sweep``).

    Returns the summary (``top1``, ``avg_bits``, ``out``, ...).
    """
    reporter = reporter or Reporter()
    if options.probe_batches < 1:
        raise MpqError("--probe-batches must be >= 1")
    method_cls = get_method(options.method)
    method_cfg = method_cls.config_class.from_dict(options.method_config)
    train_cfg = training(train_cfg, {"epochs": SEARCH_EPOCHS, **method_cls.training_defaults})
    ctx = setup(model, data, train_cfg, reporter)
    fp_top1 = None
    if model.checkpoint:
        fp_top1 = evaluate(ctx.model, ctx.test, amp=train_cfg.amp, reporter=reporter, description="FP32 eval")["top1"]
    method = method_cls(method_cfg, options.selection)
    method.prepare(ctx.model, loss_probe=budget_probe(ctx, options.probe_batches))
    config = {
        "command": "search",
        "model": ctx.spec.to_dict(),
        "checkpoint": model.checkpoint,
        "checkpoint_sha256": file_fingerprint(model.checkpoint),
        **new_head_record(model, ctx),
        "data": ctx.data.to_dict(),
        "train": train_cfg.to_dict(),
        "method": options.method,
        "method_config": method_cfg.to_dict(),
        "selection": {"keep_fp": options.selection.keep_fp, "fix_bits": options.selection.fix_bits},
        "probe_batches": options.probe_batches,
        "fp_top1": fp_top1,
    }
    config["fingerprint"] = fingerprint(config)
    if reuse_finished and out and (Path(out) / "summary.json").is_file():
        return finished_run(Path(out), config)
    config["checkpoint_bytes"] = checkpoint_bytes(model.checkpoint)  # for the export's size comparison
    config["versions"] = versions()
    run_dir = claim_run_dir(out, options.method, model.name, resume)
    return _train_quantized(run_dir, resume, config, method, ctx, train_cfg, fp_top1, reporter, "search")


def _train_quantized(
    claim,
    resume: bool,
    config: dict,
    method: Method,
    ctx: Context,
    train_cfg: TrainConfig,
    fp_top1: float | None,
    reporter: Reporter,
    command: str,
) -> dict:
    """A search's or fine-tuning's run: take the run directory (``claim``, locked for the run), check a
    ``--resume`` against ``config`` before writing anything, train, fix the scheme and save the run."""
    with claim as run_dir:
        state = resume_state(run_dir, resume, command, config["fingerprint"], reporter)
        if distributed.world().is_main:
            write_json(run_dir / "config.json", config)
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
            fingerprint=config["fingerprint"],
        )
        return _finish(run_dir, config, method, ctx, train_cfg, records, fp_top1, started, reporter, command=command)


def _finish(run_dir, config, method, ctx, train_cfg, records, fp_top1, started, reporter, command):
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
        **val_record(ctx, held),
        "seconds": round(time.time() - started, 1),
    }
    summary = save_quantized_run(run_dir, config, method, ctx.model, base, final, result, records, codes)
    return distributed.broadcast_object(summary)


def refuse_collapsed_layers(method: Method, codes: dict | None = None) -> None:
    """A layer whose every code is zero outputs its bias alone: a collapse, unless 0 bits were asked for
    (``--fix-bits NAME=0``, or ``--allow-zero-bits true`` for the methods that may choose it)."""
    allowed = method.config.allow_zero_bits
    collapsed = []
    for name, lc in (codes if codes is not None else method.layer_codes()).items():
        if method.selection.fixed_bits(name) == 0 or allowed:
            continue
        empty = int(lc.basis.group_bits.sum()) == 0 if lc.basis is not None else not bool(lc.codes.any())
        if empty:
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
    """Rebuild a search/finetune run: ``(config, ctx, method)`` with the run's state loaded.

    ``model`` names the user factory of a run made with one (never taken from the run); ``with_probe``
    gives the method its loss probe (the run's ``probe_batches`` batches: of its recorded hold-out, if
    any, else of training), to train further. The run's recorded ``val_split`` holds out the same images.
    """
    run_dir = Path(run_dir)
    config = read_search_config(run_dir)
    source = f"{run_dir}/config.json"
    try:
        data = DataConfig(**{**config["data"], **(data_overrides or {})})
        train_cfg = TrainConfig(**{**config["train"], **(train_overrides or {})})
        method_cls = get_method(config["method"] if isinstance(config["method"], str) else "?")
        selection = LayerSelection(
            keep_fp=list(config["selection"]["keep_fp"]), fix_bits=dict(config["selection"]["fix_bits"])
        )
        method_config = method_cls.config_class.from_dict(config["method_config"])
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise MpqError(f"{source}: malformed run record ({exc.__class__.__name__}: {exc})") from None
    spec = recorded_model(config.get("model"), source, model)
    ctx = setup(ModelOptions(spec.name, None, None), data, train_cfg)
    if ctx.spec.num_classes != spec.num_classes or ctx.spec.in_channels != spec.in_channels:
        raise MpqError(
            f"the data does not fit the run's model ({spec.num_classes} classes, {spec.in_channels} channels)"
        )
    method = method_cls(method_config, selection)
    probe = budget_probe(ctx, config.get("probe_batches", 8)) if with_probe else None
    method.prepare(ctx.model, loss_probe=probe)
    state, _ = read_state_dict(run_dir / "model.safetensors")
    try:
        ctx.model.load_state_dict(with_aliases(ctx.model, state))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MpqError(f"{run_dir}/model.safetensors does not fit the run's config: {first}") from None
    method.load_state_dict(read_json(run_dir / "method.json"))
    return config, ctx, method, data, train_cfg


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
    parent_config = read_search_config(Path(run))
    method_cls = get_method(parent_config["method"])
    defaults = {**method_cls.finetune_defaults}
    config, ctx, method, data, train_cfg = load_run(
        run, data_overrides, {**defaults, **train_overrides}, model=model, with_probe=True
    )
    method.start_finetune()
    ft_config = {**config, "command": "finetune", "parent": run, "train": train_cfg.to_dict(), "data": data.to_dict()}
    if model is not None:
        ft_config["model"] = ctx.spec.to_dict()
    for key in ("versions", "fingerprint", "checkpoint_bytes"):
        ft_config.pop(key, None)
    ft_config["fingerprint"] = fingerprint(ft_config)
    ft_config["checkpoint_bytes"] = config.get("checkpoint_bytes")
    ft_config["versions"] = versions()
    claim = claim_run_dir(out or f"{run}-finetune", f"{config['method']}-ft", ctx.spec.name, resume)
    return _train_quantized(
        claim, resume, ft_config, method, ctx, train_cfg, config.get("fp_top1"), reporter, "finetune"
    )
