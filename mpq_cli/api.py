"""The plain-Python API behind every command: ``train``, ``search``, ``finetune``, ``evaluate_run``,
``export``, ``inspect``.

Each function builds what it needs (model, data, method), runs the shared engine
and writes a run directory; it returns a summary dict (what ``--json`` prints).
"""

from __future__ import annotations

import functools
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .data import DataConfig, DatasetInfo, Splits, default_data_dir, load_splits
from .engine import (
    Reporter,
    TrainConfig,
    evaluate,
    fit,
    loss_probe,
    ranks_state_digests,
    resolve_device,
    seed_everything,
)
from .errors import MpqError, StaleRunError
from .export import pack_run, size_report
from .layers import (
    NORMALIZATION,
    QUANTIZABLE,
    READ_BY_PARENT_REASON,
    LayerSelection,
    QuantizedLayer,
    quantizable_layers,
    unquantized_modules,
)
from .methods import FinalizeResult, Method, get_method
from .models import ModelSpec, build_model, load_checkpoint, unique_state_dict, with_aliases
from .models.loading import read_state_dict, recorded_model, weights_normalisation
from .models.zoo import BUILTIN
from .packing.encodings import plan_codes
from .packing.format import FORMAT, PackedFile, load_packed, serialized_size, write_packed
from .report import markdown_report, markdown_size_report
from .rundir import (
    RunDirLock,
    default_run_dir,
    dumps,
    file_fingerprint,
    fingerprint,
    is_fresh_run_dir,
    load_checkpoint_state,
    read_json,
    read_jsonl,
    read_search_config,
    save_safetensors,
    versions,
    write_json,
    write_text_atomic,
)
from .scheme import LayerEntry, Scheme

_DEFAULT_INPUT = {"lenet5": (1, 28, 28)}


@dataclass
class ModelOptions:
    """Which model, from where.

    Args:
        name: built-in, torchvision or ``package.module:factory`` / ``file.py:factory``.
        weights: torchvision weights (``DEFAULT``, an enum name, ``none``).
        checkpoint: a ``.safetensors``/``.pt``/``.pth`` state dict, or an ``mpq train`` run directory.
        new_head: re-initialise the model's classifier (its last Linear) when the checkpoint's has another
            shape (an ImageNet head for a 10-class model); every other tensor still loads strictly.
    """

    name: str = "lenet5"
    weights: str | None = None
    checkpoint: str | None = None
    new_head: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.new_head, bool):
            raise MpqError(f"new_head must be true or false, got {self.new_head!r}")


@dataclass
class Context:
    """A model on its device with its data.

    ``val`` is what every in-training check reads (per-epoch top-1 and loss, divergence, the budget
    steps' loss probe): the ``--val-split`` hold-out, or without one the test split. ``test`` is the
    test split, measured once at the end of a command (its ``top1``).
    """

    spec: ModelSpec
    model: nn.Module
    info: DatasetInfo
    train: object
    val: object
    test: object
    device: torch.device
    val_images: int | None = None  # the hold-out's size; None without --val-split
    data: DataConfig | None = None  # as resolved (a torchvision model's own input statistics filled in)
    head_reinitialised: list[str] = field(default_factory=list)  # the checkpoint's classifier keys --new-head set aside


def _default_input(name: str) -> tuple[int, int, int]:
    if name in BUILTIN:
        return _DEFAULT_INPUT.get(name, (3, 32, 32))
    if ":" in name:
        return (3, 32, 32)
    return (3, 224, 224)


def resolved_data(model_opts: ModelOptions, data: DataConfig) -> DataConfig:
    """``data`` with the input statistics a model's pretrained torchvision weights were trained with
    (``weights.transforms()``) when ``data.normalize`` does not set them: the weights expect those inputs."""
    if data.normalize is not None:
        return data
    stats = weights_normalisation(model_opts.name, model_opts.weights)
    return data if stats is None else replace(data, normalize=stats)


def _setup(
    model_opts: ModelOptions, data: DataConfig, train_cfg: TrainConfig, reporter: Reporter | None = None
) -> Context:
    given = data
    data = resolved_data(model_opts, data)
    if data is not given and reporter is not None:
        mean, std = data.normalize
        reporter.log(f"inputs normalised as {model_opts.name} {model_opts.weights} expects: mean {mean}, std {std}")
    channels = 3 if (model_opts.name not in BUILTIN and ":" not in model_opts.name) else None
    splits = load_splits(data, channels=channels, default_input=_default_input(model_opts.name), seed=train_cfg.seed)
    info = splits.info
    weights = None if model_opts.weights in (None, "none") else model_opts.weights
    spec = ModelSpec(model_opts.name, weights, info.num_classes, info.in_channels, tuple(info.input_size))
    seed_everything(train_cfg.seed)
    model = build_model(spec)
    replaced = {}
    if model_opts.checkpoint:
        loaded = load_checkpoint(model, model_opts.checkpoint, new_head=model_opts.new_head)
        replaced = loaded.replaced
        if replaced and reporter is not None:
            reporter.log(
                f"--new-head: the classifier of checkpoint {model_opts.checkpoint} ("
                + ", ".join(f"{k} {tuple(shape)}" for k, shape in replaced.items())
                + f") re-initialised for {spec.num_classes} classes"
            )
        elif loaded.initialised and reporter is not None:
            reporter.log(
                f"checkpoint {model_opts.checkpoint} is a backbone without the classifier: "
                f"{', '.join(loaded.initialised)} initialised for {spec.num_classes} classes"
            )
    ctx = _place(model, spec, splits, resolve_device(train_cfg.device))
    ctx.data, ctx.head_reinitialised = data, list(replaced)
    check_forward(ctx.model, ctx.test, spec)
    return ctx


def _new_head_record(model_opts: ModelOptions, ctx: Context) -> dict:
    """The run record of ``--new-head``: the option and the checkpoint keys it set aside (nothing without
    the option, so that runs written before it keep their fingerprints)."""
    return {"new_head": True, "head_reinitialised": ctx.head_reinitialised} if model_opts.new_head else {}


def check_forward(model: nn.Module, batches, spec: ModelSpec) -> None:
    """Run one evaluation batch through the model before anything is trained or written, so that a
    model that cannot take the data (an input too small for its strides, a factory's broken
    forward) is a one-line error rather than a failure mid-epoch."""
    x, _ = next(iter(batches))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as exc:  # a model can fail on an input in any way: say which and on what
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise MpqError(f"model {spec.name} cannot take inputs of shape {list(x.shape[1:])}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != spec.num_classes:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MpqError(f"model {spec.name} returned {shape} for a batch of 2; expected [2, {spec.num_classes}] logits")


def _place(model: nn.Module, spec: ModelSpec, splits: Splits, device: torch.device) -> Context:
    model.to(device)
    every = [b for b in (splits.train, splits.val, splits.test) if b is not None]
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # NHWC convolutions are markedly faster on CPU (oneDNN) and with AMP on GPU
        model.to(memory_format=torch.channels_last)
        for batches in every:
            batches.channels_last = True
    for batches in every:
        batches.to(device)
    return Context(
        spec, model, splits.info, splits.train, splits.checks, splits.test, device, val_images=splits.val_images
    )


def _final_eval(
    ctx: Context, amp: bool, reporter: Reporter, description: str = "final eval"
) -> tuple[dict, dict | None]:
    """The end of a command: the test split measured once, and the hold-out's last reading (None without one)."""
    final = evaluate(ctx.model, ctx.test, amp=amp, reporter=reporter, description=description)
    if ctx.val_images is None:
        return final, None
    held = evaluate(ctx.model, ctx.val, amp=amp, reporter=reporter, description=f"{description} (hold-out)")
    return final, held


def _val_record(ctx: Context, held: dict | None) -> dict:
    """The summary's hold-out keys: ``val_top1`` and ``val_images`` (both None without --val-split)."""
    return {"val_top1": held["top1"] if held else None, "val_images": ctx.val_images}


def _in_session(command):
    """Run a command inside torchrun's process group when it was launched by torchrun (else as is)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        with distributed.session():
            return command(*args, **kwargs)

    return run


@contextmanager
def _claim_run_dir(out: str | None, prefix: str, model: str, resume: bool):
    """The run directory, locked against a second writer for the ``with`` block.

    A directory that is empty, or holds only the ``config.json`` of a run that never
    finished an epoch, may be started afresh; anything else needs ``--resume``. Under
    torchrun rank 0 claims it (and names it) and tells the other ranks, which only read it.
    """
    path = distributed.broadcast_object(Path(out) if out else default_run_dir(prefix, model))
    if not distributed.world().is_main:
        refused = distributed.broadcast_object(None)
        if refused:
            raise MpqError(refused)
        yield path
        return
    told = False
    try:
        if path.exists() and not path.is_dir():
            raise MpqError(f"--out {path} is a file; give a directory for the run")
        path.mkdir(parents=True, exist_ok=True)
        with RunDirLock(path):
            if not resume and not is_fresh_run_dir(path):
                raise MpqError(f"{path} already exists and is not empty; pass --resume to continue it or choose --out")
            told = distributed.broadcast_object(None) is None
            yield path
    except MpqError as exc:
        if not told:
            distributed.broadcast_object(str(exc))
        raise


def _resume_state(run_dir: Path, resume: bool, stage: str, fingerprint: str, reporter: Reporter) -> dict | None:
    """The checkpoint to continue from, checked against this configuration before anything is written."""
    if not resume:
        return None
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.exists():
        if is_fresh_run_dir(run_dir):
            reporter.log(f"--resume: {run_dir} holds no finished epoch; starting from the beginning")
            return None
        raise MpqError(f"--resume: {ckpt} does not exist")
    state = load_checkpoint_state(ckpt)
    if state.get("stage") != stage or state.get("fingerprint") != fingerprint:
        raise StaleRunError(
            f"--resume: {run_dir} was made with a different configuration or command; nothing was "
            "changed (start a new run with another --out, or repeat the original options)"
        )
    reporter.log(f"continuing {run_dir} from epoch {int(state['epoch']) + 2}")
    return state


# --------------------------------------------------------------------------------------- train
# The FP32 baseline's schedule (``mpq train``'s defaults).
FP_DEFAULTS = {"epochs": 12, "optimizer": "adam", "lr": 2e-3, "weight_decay": 0.0, "schedule": "cosine"}
SEARCH_EPOCHS = 10


def training(given: TrainConfig | dict | None, defaults: dict) -> TrainConfig:
    """The training settings of a command: a :class:`TrainConfig` as given, or a dict of the fields the
    caller sets (``None`` values ignored) over ``defaults``. The CLI passes the dict, so the Python
    API and ``mpq`` apply the same defaults (a method's paper's, for a search)."""
    if isinstance(given, TrainConfig):
        return given
    try:
        return TrainConfig(**{**defaults, **{k: v for k, v in (given or {}).items() if v is not None}})
    except TypeError as exc:
        raise MpqError(f"training settings: {exc}") from None


@_in_session
def train(
    model: ModelOptions,
    data: DataConfig,
    train_cfg: TrainConfig | dict | None = None,
    *,
    out: str | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Train the FP32 baseline and write ``RUN/model.safetensors`` (the reference for every search).

    ``train_cfg``: a TrainConfig, or a dict of settings over :data:`FP_DEFAULTS` (12 epochs of Adam 2e-3).
    """
    reporter = reporter or Reporter()
    train_cfg = training(train_cfg, FP_DEFAULTS)
    ctx = _setup(model, data, train_cfg, reporter)
    config = {
        "command": "train",
        "model": ctx.spec.to_dict(),
        "checkpoint": model.checkpoint,
        **_new_head_record(model, ctx),
        "data": ctx.data.to_dict(),
        "train": train_cfg.to_dict(),
        "versions": versions(),
    }
    config["fingerprint"] = fingerprint({k: v for k, v in config.items() if k != "versions"})
    with _claim_run_dir(out, "train", model.name, resume) as run_dir:
        state = _resume_state(run_dir, resume, "train", config["fingerprint"], reporter)
        if distributed.world().is_main:
            write_json(run_dir / "config.json", config)
        fit(
            ctx.model,
            ctx.train,
            ctx.val,
            train_cfg,
            run_dir=run_dir,
            stage="train",
            reporter=reporter,
            resume=state,
            fingerprint=config["fingerprint"],
        )
        return _finish_train(run_dir, ctx, model, data, train_cfg, reporter)


def _finish_train(
    run_dir: Path, ctx: Context, model: ModelOptions, data: DataConfig, train_cfg: TrainConfig, reporter: Reporter
) -> dict:
    final, held = _final_eval(ctx, train_cfg.amp, reporter)
    if not distributed.world().is_main:
        return {**distributed.broadcast_object(None), "rank": distributed.world().rank}  # once rank 0 wrote it
    metadata = {
        "mpq.model": json.dumps(ctx.spec.to_dict()),
        "mpq.data": data.name,
        "mpq.top1": f"{final['top1']:.4f}",
        "mpq.version": versions()["mpq"],
    }
    save_safetensors(run_dir / "model.safetensors", unique_state_dict(ctx.model), metadata)
    summary = {
        "command": "train",
        "model": model.name,
        "data": data.name,
        "synthetic": ctx.info.synthetic,
        "top1": final["top1"],
        "top5": final.get("top5"),
        "samples": final.get("samples"),
        "split_samples": final.get("split_samples"),
        "loss": final["loss"],
        **_val_record(ctx, held),
        "params": sum(p.numel() for p in ctx.model.parameters()),
        "checkpoint": str(run_dir / "model.safetensors"),
        "out": str(run_dir),
    }
    write_json(run_dir / "summary.json", summary)
    return distributed.broadcast_object(summary)  # the other ranks return when the run is written


# ------------------------------------------------------------------------------- search & co.
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


def build_scheme(method: Method, model: nn.Module, codes: dict | None = None) -> Scheme:
    """The bit table of a prepared model, with stored bits measured from the exact codes."""
    entries = []
    codes = codes if codes is not None else method.layer_codes()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            kind = "conv2d" if isinstance(module.layer, nn.Conv2d) else "linear"
            act_bits = getattr(module.act_quantizer, "bits", None)
            basis = codes[name].basis
            if basis is not None:  # sign bits per weight, a float32 coordinate per basis, a byte per group
                used = int(basis.group_bits.sum())
                stored, scales, index = used * basis.group_size / module.params, used, basis.group_bits.numel()
                if used == 0:
                    stored, scales, index = 0, 0, 0
            else:
                plan = plan_codes(codes[name].codes)
                stored, scales, index = plan.width, plan.extra_values, 0
            entries.append(
                LayerEntry(
                    name,
                    kind,
                    list(module.weight_shape),
                    module.params,
                    codes[name].nominal_bits,
                    stored,
                    scales,
                    act_bits,
                    index,
                )
            )
    for name, module in quantizable_layers(model).items():
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        entries.append(LayerEntry(name, kind, list(module.weight.shape), module.weight.numel(), None, None, 0))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    entries.sort(key=lambda e: order[e.name])
    fp_weight_keys = {f"{e.name}.weight" for e in entries if e.is_fp}
    quantizer_prefixes = tuple(f"{n}.weight_quantizer." for n in method.layers)
    other = sum(
        t.numel()
        for k, t in unique_state_dict(model).items()
        if t.is_floating_point() and k not in fp_weight_keys and not k.startswith(quantizer_prefixes)
    )
    return Scheme(method=method.name, layers=entries, other_params=other)


def _save_quantized_run(
    run_dir: Path,
    config: dict,
    method: Method,
    model: nn.Module,
    summary_base: dict,
    final: dict,
    result: FinalizeResult,
    records: list[dict],
    codes: dict,
) -> dict:
    scheme = build_scheme(method, model, codes)
    save_safetensors(run_dir / "model.safetensors", unique_state_dict(model), {"mpq.run": "state"})
    write_json(run_dir / "method.json", method.state_dict())
    tensors, forms = {}, {}
    for name, lc in codes.items():
        act = method.layers[name].act_quantizer
        forms[name] = {"weight": "basis" if lc.basis is not None else "codes", "act": getattr(act, "kind", None)}
        if lc.basis is not None:
            tensors.update(lc.basis.to_tensors(name))
            continue
        tensors[f"{name}.codes"] = lc.codes.to(torch.int32)
        tensors[f"{name}.step"] = lc.step.to(torch.float32)
    # each layer's form is recorded, so that export reads it rather than guessing it from tensor names
    save_safetensors(run_dir / "codes.safetensors", tensors, {"mpq.codes": "1", "mpq.forms": dumps(forms)})
    scheme.save(run_dir / "scheme.json")
    summary = {
        **summary_base,
        "top1": final["top1"],
        "top5": final.get("top5"),
        "samples": final.get("samples"),
        "split_samples": final.get("split_samples"),
        "loss": final["loss"],
        **scheme.summary(),
        **result.summary(),
        "out": str(run_dir),
    }
    summary["bits_under_budget"] = bits_under_budget(summary)
    write_json(run_dir / "summary.json", {**summary, "budget_changes": result.budget_changes})
    sizes = file_sizes(run_dir)  # the file this run exports, measured as `mpq inspect` measures it
    layer_stored = sizes.pop("layer_stored_bits")
    summary.update(sizes)
    for estimate in ("model_bytes_estimated", "model_compression_estimated"):
        summary.pop(estimate, None)
    write_json(run_dir / "summary.json", {**summary, "budget_changes": result.budget_changes})
    notes = []
    changes = result.budget_changes
    if changes:
        lines = [
            f"- `{c['layer']}`: "
            + (
                f"{c['bits_before']} -> {c['bits_after']} bits"
                if c["bits_before"] != c["bits_after"]
                else f"re-rounded from its relaxed weight at {c['bits_after']} bits"
            )
            + f" (probe loss change alone {c['probe_loss_change_alone']:+.4f}"
            + (", estimated by the screen)" if c.get("measured_alone") is False else ")")
            for c in changes
        ]
        notes.append(
            "## Budget step\n\nThe search ended at "
            f"{result.avg_bits_before_budget_step:.4f} average bits; the loss-aware budget "
            "step changed:\n\n" + "\n".join(lines) + f"\n\nProbe loss: {changes[0]['probe_loss_before']:.4f}"
            f" -> {changes[0]['probe_loss_after']:.4f}."
            + (
                " The layers interacted (the first choice measured worse than its parts predicted): every option was "
                + ("estimated" if "measured_alone" in changes[0] else "measured")
                + " again from it, and the second choice measured better."
                if changes[0].get("passes") == 2
                else ""
            )
        )
    notes += method.report_notes()
    if records:
        notes.append(f"Trained {len(records)} epoch(s); per-epoch numbers are in metrics.jsonl.")
    charts = _charts(run_dir, scheme, summary)
    write_text_atomic(run_dir / "report.md", markdown_report(summary, scheme, notes, charts, layer_stored))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(
            dumps(
                {
                    "stage": "final",
                    "top1": final["top1"],
                    **({"val_top1": summary["val_top1"]} if summary.get("val_top1") is not None else {}),
                    "avg_bits": scheme.avg_bits,
                    "avg_stored_bits": summary["avg_stored_bits"],
                }
            )
            + "\n"
        )
    return summary


def file_sizes(run_dir: Path) -> dict:
    """The sizes of the packed file ``mpq export`` writes from a finished run, measured on it serialised in
    memory with the exporter's own code and ``size_report`` (the function `mpq inspect` uses), so a run's
    report and its file give the same numbers: ``avg_stored_bits`` (sign, scales, tables and padding
    included), ``weight_bytes``, ``file_bytes``, ``fp32_bytes``, ``compression`` (FP32 bytes / file bytes)."""
    packed = pack_run(run_dir)
    file_bytes = serialized_size(packed.header, packed.tensors)
    report = size_report(packed.header, {n: t.nbytes for n, t in packed.tensors.items()}, file_bytes)
    keys = ("avg_stored_bits", "weight_bytes", "file_bytes", "fp32_bytes", "compression")
    return {
        **{k: report[k] for k in keys},
        "layer_stored_bits": {r["name"]: r["stored_bits"] for r in report["layers"]},
    }


def _charts(run_dir: Path, scheme: Scheme, summary: dict) -> list[tuple[str, str]]:
    """Draw bits.png and training.png into the run directory; their captions and names for report.md."""
    from .plots import bits_chart, training_chart

    title = f"{summary['method']} on {summary['model']}: {scheme.avg_bits:.3f} nominal bits, "
    title += f"{summary['avg_stored_bits']:.3f} stored bits per weight (average, file)"
    layers = [{**asdict(e), "bits": None if e.is_fp else e.bits} for e in scheme.layers]
    charts = [("bits per layer", bits_chart(layers, run_dir / "bits.png", title).name)]
    records = read_jsonl(run_dir / "metrics.jsonl")
    drawn = training_chart(records, run_dir / "training.png", f"{summary['method']} on {summary['model']}")
    if drawn is not None:
        charts.append(("training: top-1, loss and average bits per epoch", drawn.name))
    return charts


@_in_session
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
    ctx = _setup(model, data, train_cfg, reporter)
    fp_top1 = None
    if model.checkpoint:
        fp_top1 = evaluate(ctx.model, ctx.test, amp=train_cfg.amp, reporter=reporter, description="FP32 eval")["top1"]
    method = method_cls(method_cfg, options.selection)
    method.prepare(ctx.model, loss_probe=_probe(ctx, options.probe_batches))
    config = {
        "command": "search",
        "model": ctx.spec.to_dict(),
        "checkpoint": model.checkpoint,
        "checkpoint_sha256": file_fingerprint(model.checkpoint),
        **_new_head_record(model, ctx),
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
        return _finished_run(Path(out), config)
    config["checkpoint_bytes"] = checkpoint_bytes(model.checkpoint)  # for the export's size comparison
    config["versions"] = versions()
    run_dir = _claim_run_dir(out, options.method, model.name, resume)
    return _train_quantized(run_dir, resume, config, method, ctx, train_cfg, fp_top1, reporter, "search")


def _differences(new: dict, old: dict) -> list[str]:
    """The settings (``section`` or ``section.key``) in which two run records differ."""
    out = []
    for section in sorted(set(new) | set(old)):
        if section in ("fingerprint", "checkpoint_bytes", "versions") or new.get(section) == old.get(section):
            continue
        a, b = new.get(section), old.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(section)
    return out


def _finished_run(run_dir: Path, config: dict) -> dict:
    """The summary of the finished run in ``run_dir`` if ``config`` would make it again, else StaleRunError."""
    saved = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    if saved.get("fingerprint") == config["fingerprint"]:
        return {**read_json(run_dir / "summary.json"), "reused": True}
    what = ", ".join(_differences(config, saved)[:4]) or "its record"
    raise StaleRunError(f"{run_dir} was made with other settings ({what} differ)")


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
        state = _resume_state(run_dir, resume, command, config["fingerprint"], reporter)
        if distributed.world().is_main:
            write_json(run_dir / "config.json", config)
        started = time.time() - _elapsed_before(state)
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


def _elapsed_before(state: dict | None) -> float:
    """Seconds the epochs a resumed run had already trained took (0 for a new run)."""
    return float(state.get("elapsed", 0.0)) if state else 0.0


def checkpoint_bytes(checkpoint: str | None) -> int | None:
    """Size of the FP32 checkpoint file a run started from (``None`` when it has none)."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    return path.stat().st_size if path.is_file() else None


_PROBE_EPOCH = 10**6  # the probe's batches come from an epoch no training run reaches: fixed, and not epoch 0's


def _probe(ctx: Context, batches: int):
    """Loss on the hold-out's first ``batches`` batches (unaugmented) with --val-split; without one, on a fixed
    set of training batches. Never on the test split: the budget step chooses bits by it."""
    if ctx.val_images is not None:
        return loss_probe(ctx.model, ctx.val, batches)
    ctx.train.set_epoch(_PROBE_EPOCH)
    probe = loss_probe(ctx.model, ctx.train, batches)
    ctx.train.set_epoch(0)
    return probe


def _finish(run_dir, config, method, ctx, train_cfg, records, fp_top1, started, reporter, command):
    result = method.finalize()
    codes = method.layer_codes()  # one computation feeds the collapse check, the scheme and codes.safetensors
    here = distributed.world()
    if here.active:  # the final model too (the budget step ran on every rank), before any rank may stop
        codes_digest = distributed.digest(method.agreement_tensors())
        digests = ranks_state_digests(ctx.model, method, buffers=True)
        distributed.check_agreement({**digests, "codes and bits": codes_digest}, "the final model and scheme")
    _refuse_collapsed_layers(method, codes)
    final, held = _final_eval(ctx, train_cfg.amp, reporter)
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
        **_val_record(ctx, held),
        "seconds": round(time.time() - started, 1),
    }
    summary = _save_quantized_run(run_dir, config, method, ctx.model, base, final, result, records, codes)
    return distributed.broadcast_object(summary)


def bits_under_budget(summary: dict) -> float | None:
    """How far under its ceiling (``target_bits``, in the method's own count, or in stored bits with
    ``budget_on`` stored) a run's scheme ended; negative when over it, None for a run without a budget."""
    target, avg = summary.get("target_bits"), summary.get("avg_counted_bits", summary.get("avg_bits"))
    if target is None or avg is None or summary.get("budget_met") is None:
        return None
    return round(float(target) - float(avg), 6)


def _refuse_collapsed_layers(method: Method, codes: dict | None = None) -> None:
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
    ctx = _setup(ModelOptions(spec.name, None, None), data, train_cfg)
    if ctx.spec.num_classes != spec.num_classes or ctx.spec.in_channels != spec.in_channels:
        raise MpqError(
            f"the data does not fit the run's model ({spec.num_classes} classes, {spec.in_channels} channels)"
        )
    method = method_cls(method_config, selection)
    probe = _probe(ctx, config.get("probe_batches", 8)) if with_probe else None
    method.prepare(ctx.model, loss_probe=probe)
    state, _ = read_state_dict(run_dir / "model.safetensors")
    try:
        ctx.model.load_state_dict(with_aliases(ctx.model, state))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MpqError(f"{run_dir}/model.safetensors does not fit the run's config: {first}") from None
    method.load_state_dict(read_json(run_dir / "method.json"))
    return config, ctx, method, data, train_cfg


@_in_session
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
    claim = _claim_run_dir(out or f"{run}-finetune", f"{config['method']}-ft", ctx.spec.name, resume)
    return _train_quantized(
        claim, resume, ft_config, method, ctx, train_cfg, config.get("fp_top1"), reporter, "finetune"
    )


@_in_session
def evaluate_run(
    target: str,
    data_overrides: dict | None = None,
    *,
    device: str | None = None,
    reporter: Reporter | None = None,
    model: str | None = None,
    verify: bool = True,
) -> dict:
    """Accuracy of a packed file, of a run's exactly quantized model, or of an ``mpq train`` run's FP model.

    On the whole validation (test) split, unless ``data_overrides`` sets ``limit_val_batches``.
    ``model`` names the user factory of a file or run made with one (never taken from the file).
    """
    overrides = {"device": device} if device else {}
    run_path = Path(target)
    if run_path.is_file():
        return evaluate_packed(run_path, data_overrides, device=device, reporter=reporter, model=model, verify=verify)
    # the whole split unless asked: a run's --limit-val-batches bounded its in-training checks, not this measurement
    data_overrides = {"limit_val_batches": None, **(data_overrides or {})}
    config = read_json(run_path / "config.json") if (run_path / "config.json").is_file() else None
    if config is None:
        raise MpqError(
            f"{target} not found"
            if not run_path.exists()
            else f"{target} is neither a packed file nor an mpq run directory (no config.json)"
        )
    if "method" in config:
        _, ctx, _, data, train_cfg = load_run(target, data_overrides, overrides, model=model)  # exact weights
    else:
        try:
            data = DataConfig(**{**config["data"], **(data_overrides or {})})
            train_cfg = TrainConfig(**{**config["train"], **overrides})
        except (TypeError, KeyError) as exc:
            raise MpqError(f"{run_path}/config.json: malformed data or train record ({exc})") from None
        spec = recorded_model(config.get("model"), f"{run_path}/config.json", model)
        ctx = _setup(ModelOptions(spec.name, None, str(run_path / "model.safetensors")), data, train_cfg)
    result, held = _final_eval(ctx, train_cfg.amp, reporter, "eval")
    return {
        "command": "eval",
        "run": str(target),
        "data": data.name,
        "synthetic": ctx.info.synthetic,
        **result,
        **_val_record(ctx, held),
        "out": str(target),
    }


@_in_session
def evaluate_packed(
    path: str | Path,
    data_overrides: dict | None = None,
    *,
    device: str | None = None,
    reporter: Reporter | None = None,
    model: str | None = None,
    verify: bool = True,
) -> dict:
    """Top-1 (and top-5) of the model decoded from a packed file, on the data recorded in it by default.

    The whole validation (test) split unless ``data_overrides`` sets ``limit_val_batches``; the result's
    ``top1_at_export`` was measured on the run's ``limit_val_batches_at_export`` batches (``None``: all).

    ``model`` names the user factory of a file made with one (never taken from the file).
    """
    packed = PackedFile.open(path)
    spec = recorded_model(packed.header["model"], str(path), model)
    net = load_packed(path, model=model, verify=verify)
    header = packed.header
    recorded = header.get("eval") if isinstance(header.get("eval"), dict) else {}
    recorded_data = recorded.get("data") if isinstance(recorded.get("data"), dict) else {}
    fields = {
        "name": (header.get("data") or {}).get("name", "fashion-mnist"),
        **{k: v for k, v in recorded_data.items() if k in _REPLAYED_DATA_FIELDS},
        "data_dir": default_data_dir(),
        **(data_overrides or {}),
    }
    try:
        data = DataConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise MpqError(f"{path}: malformed eval record in the header ({exc})") from None
    if data.input_size is not None and tuple(data.input_size) != (spec.in_channels, *spec.input_size):
        raise MpqError(
            f"{path}: the eval record's input size {list(data.input_size)} is not the model's "
            f"{[spec.in_channels, *spec.input_size]}"
        )
    seed = recorded.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MpqError(f"{path}: malformed eval record in the header (seed {seed!r})")
    splits = load_splits(data, channels=spec.in_channels, default_input=(spec.in_channels, *spec.input_size), seed=seed)
    if splits.info.num_classes != spec.num_classes:
        raise MpqError(f"{data.name} has {splits.info.num_classes} classes; the packed model has {spec.num_classes}")
    ctx = _place(net, spec, splits, resolve_device(device or "auto"))
    check_forward(ctx.model, ctx.test, spec)
    result, held = _final_eval(ctx, False, reporter, "eval")
    return {
        "command": "eval",
        "file": str(path),
        "data": data.name,
        "synthetic": splits.info.synthetic,
        **result,
        **_val_record(ctx, held),
        "top1_at_export": (header.get("source") or {}).get("top1"),
        "limit_val_batches_at_export": _recorded_limit(recorded_data.get("limit_val_batches")),
        "out": str(path),
    }


def _recorded_limit(value) -> int | None:
    """A file's record of its run's --limit-val-batches, for display: a positive int, else None (all, or unreadable)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


STAYS_FP = "not Conv2d/Linear: stays FP"


def model_layers(name: str, num_classes: int = 10, input_size: tuple[int, int, int] | None = None) -> dict:
    """Which weights of a model are quantized and which stay FP32.

    Built-in and torchvision models are built on the meta device: no memory, no weights.

    Returns:
        ``layers``: the Conv2d/Linear layers (the names ``--keep-fp`` and ``--fix-bits`` match), in
        module order, each with ``name``, ``kind``, ``shape`` and ``params`` (its weight);
        ``fp_layers``: the other modules that own parameters (a Conv1d, an Embedding, a module with its
        own ``nn.Parameter``), each with ``name``, ``kind`` (its class), ``shape`` (its weight's, or its
        first parameter's), ``tensors`` (its parameters' names), ``params`` and ``reason``;
        ``normalisation``: BatchNorm/LayerNorm/GroupNorm-like layers, each with ``name``, ``kind``,
        ``params`` (they stay FP32 by design);
        ``params``: totals: ``quantizable``, ``not_quantizable`` and its parts ``fp_layers``,
        ``normalisation`` and ``biases`` (of the Conv2d/Linear layers).
    """
    c, h, w = input_size or _default_input(name)
    spec = ModelSpec(name, None, num_classes, c, (h, w))
    if spec.kind == "user":
        model = build_model(spec)
    else:
        with torch.device("meta"):
            model = build_model(spec)
    quantizable = quantizable_layers(model)
    layers = [
        {
            "name": n,
            "kind": "conv2d" if isinstance(m, nn.Conv2d) else "linear",
            "shape": list(m.weight.shape),
            "params": m.weight.numel(),
        }
        for n, m in quantizable.items()
    ]
    fp_layers, norms = [], []
    for n, m in unquantized_modules(model).items():
        own = dict(m.named_parameters(recurse=False))
        count = sum(p.numel() for p in own.values())
        if isinstance(m, NORMALIZATION):
            norms.append({"name": n, "kind": type(m).__name__, "params": count})
            continue
        shape = list(own.get("weight", next(iter(own.values()))).shape)
        row = {"name": n, "kind": type(m).__name__, "shape": shape, "tensors": list(own), "params": count}
        fp_layers.append({**row, "reason": READ_BY_PARENT_REASON if isinstance(m, QUANTIZABLE) else STAYS_FP})
    biases = sum(p.numel() for m in quantizable.values() for k, p in m.named_parameters(recurse=False) if k != "weight")
    fp, norm = sum(r["params"] for r in fp_layers), sum(r["params"] for r in norms)
    params = {
        "quantizable": sum(r["params"] for r in layers),
        "not_quantizable": fp + norm + biases,
        "fp_layers": fp,
        "normalisation": norm,
        "biases": biases,
    }
    return {"model": name, "layers": layers, "fp_layers": fp_layers, "normalisation": norms, "params": params}


# The data settings a packed file's eval record may set (the data folder is the reader's own; the run's
# --limit-val-batches bounded its in-training checks: mpq eval measures the whole split unless asked).
_REPLAYED_DATA_FIELDS = ("name", "batch_size", "input_size", "augment", "normalize", "val_split", "val_split_seed")


# ------------------------------------------------------------------------------ export & inspect
def _report_paths(out: Path) -> tuple[Path, Path]:
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(f"{stem}.report.json"), out.with_name(f"{stem}.report.md")


def export(run: str | Path, out: str | Path | None = None) -> dict:
    """Write a run's bit-packed safetensors file and its size report (``FILE.report.json`` / ``.md``).

    Returns the size report's totals with ``out`` (the file) and ``report`` (the JSON report).
    """
    packed = pack_run(run)
    out = Path(out) if out else Path(run) / "packed.safetensors"
    if out.is_dir():
        raise MpqError(f"-o {out} is a directory; give a file name")
    write_packed(out, packed.header, packed.tensors)
    written = PackedFile.open(out)  # sizes are measured on the file as written
    report = size_report(written.header, {n: t.nbytes for n, t in written.tensors.items()}, written.file_bytes)
    json_path, md_path = _report_paths(out)
    write_json(json_path, report)
    write_text_atomic(md_path, markdown_size_report(report, out.name))
    return {
        "command": "export",
        **{k: v for k, v in report.items() if k != "layers"},
        "out": str(out),
        "report": str(json_path),
    }


def plot_layers(report: dict, layers: list[dict], path: str | Path) -> Path:
    """Draw the bits per layer of an :func:`inspect` report (its ``layers``, or a selection of them) as a PNG."""
    from .plots import bits_chart

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MpqError(f"--plot writes a PNG: give a file name ending in .png, not {path.name!r}")
    if not path.parent.is_dir():
        raise MpqError(f"--plot: folder {path.parent} does not exist")
    if not layers:
        raise MpqError("--plot: no layer to draw (check --layers)")
    title = f"{report['method']} on {report['model']}: {report['avg_bits']:.3f} nominal bits, "
    title += f"{report['avg_stored_bits']:.3f} stored bits per weight (average, file)"
    first = report["layers"][0]["name"] if report["layers"] else None
    rows = [{**e, "bits": e["bits"] if e["quantized"] else None, "first": e["name"] == first} for e in layers]
    return bits_chart(rows, path, title)


def inspect(target: str | Path) -> dict:
    """The size report of a packed file (from its header, without building the model) or of a run
    (encoded in memory exactly as ``mpq export`` would write it)."""
    path = Path(target)
    if path.is_dir():
        packed = pack_run(path)
        size = serialized_size(packed.header, packed.tensors)
        report = size_report({"format": FORMAT, **packed.header}, packed.tensor_bytes(), size)
        return {**report, "source": "run", "target": str(path)}
    if not path.exists():
        raise MpqError(f"{path} not found")
    packed_file = PackedFile.open(path)
    report = size_report(
        packed_file.header, {n: t.nbytes for n, t in packed_file.tensors.items()}, packed_file.file_bytes
    )
    return {**report, "source": "file", "target": str(path)}


def method_listing() -> dict:
    """Every registered method: its summary, its config fields (default, meaning from the config's
    docstring) and its training defaults, as ``mpq methods`` shows them."""
    import dataclasses

    from .methods import METHODS
    from .methods.base import field_help

    listing = {}
    for name, cls in sorted(METHODS.items()):
        meanings = field_help(cls.config_class)
        listing[name] = {
            "summary": next(iter((cls.__doc__ or "").strip().splitlines()), ""),
            "fields": {
                f.name: {
                    "default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                    "help": meanings.get(f.name, ""),
                }
                for f in dataclasses.fields(cls.config_class)
                if f.name != "version"
            },
            "training_defaults": cls.training_defaults,
        }
    return listing
