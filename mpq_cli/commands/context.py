"""What every command sets up: the model from its options, the data, both on their device (a :class:`Context`),
checked with one batch; the loss probe the budget steps read; the torchrun session."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..data import DataConfig, DatasetInfo, Splits, load_splits
from ..engine import (
    Reporter,
    TrainConfig,
    evaluate,
    loss_probe,
    resolve_device,
    seed_everything,
)
from ..errors import MpqError
from ..models import ModelSpec, build_model, load_checkpoint
from ..models.loading import weights_normalisation
from ..models.zoo import BUILTIN

DEFAULT_INPUT = {"lenet5": (1, 28, 28)}


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


def default_input(name: str) -> tuple[int, int, int]:
    if name in BUILTIN:
        return DEFAULT_INPUT.get(name, (3, 32, 32))
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


def setup(
    model_opts: ModelOptions, data: DataConfig, train_cfg: TrainConfig, reporter: Reporter | None = None
) -> Context:
    given = data
    data = resolved_data(model_opts, data)
    if data is not given and reporter is not None:
        mean, std = data.normalize
        reporter.log(f"inputs normalised as {model_opts.name} {model_opts.weights} expects: mean {mean}, std {std}")
    channels = 3 if (model_opts.name not in BUILTIN and ":" not in model_opts.name) else None
    splits = load_splits(data, channels=channels, default_input=default_input(model_opts.name), seed=train_cfg.seed)
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
    ctx = place(model, spec, splits, resolve_device(train_cfg.device))
    ctx.data, ctx.head_reinitialised = data, list(replaced)
    check_forward(ctx.model, ctx.test, spec)
    return ctx


def new_head_record(model_opts: ModelOptions, ctx: Context) -> dict:
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


def place(model: nn.Module, spec: ModelSpec, splits: Splits, device: torch.device) -> Context:
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


def final_eval(
    ctx: Context, amp: bool, reporter: Reporter, description: str = "final eval"
) -> tuple[dict, dict | None]:
    """The end of a command: the test split measured once, and the hold-out's last reading (None without one)."""
    final = evaluate(ctx.model, ctx.test, amp=amp, reporter=reporter, description=description)
    if ctx.val_images is None:
        return final, None
    held = evaluate(ctx.model, ctx.val, amp=amp, reporter=reporter, description=f"{description} (hold-out)")
    return final, held


def val_record(ctx: Context, held: dict | None) -> dict:
    """The summary's hold-out keys: ``val_top1`` and ``val_images`` (both None without --val-split)."""
    return {"val_top1": held["top1"] if held else None, "val_images": ctx.val_images}


def in_session(command):
    """Run a command inside torchrun's process group when it was launched by torchrun (else as is)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        with distributed.session():
            return command(*args, **kwargs)

    return run


def checkpoint_bytes(checkpoint: str | None) -> int | None:
    """Size of the FP32 checkpoint file a run started from (``None`` when it has none)."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    return path.stat().st_size if path.is_file() else None


PROBE_EPOCH = 10**6  # the probe's batches come from an epoch no training run reaches: fixed, and not epoch 0's


def budget_probe(ctx: Context, batches: int):
    """Loss on the hold-out's first ``batches`` batches (unaugmented) with --val-split; without one, on a fixed
    set of training batches. Never on the test split: the budget step chooses bits by it."""
    if ctx.val_images is not None:
        return loss_probe(ctx.model, ctx.val, batches)
    ctx.train.set_epoch(PROBE_EPOCH)
    probe = loss_probe(ctx.model, ctx.train, batches)
    ctx.train.set_epoch(0)
    return probe


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
