"""How to train: the settings every command that trains takes (:class:`TrainConfig`, validated) and the
learning-rate schedule they describe. No torch here: the run record and ``mpq --help`` read them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import MpqError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "constant")
MAX_SEED = 2**32 - 1  # every epoch's generator seed (seed * 100,003 + epoch) then fits torch's 64 bits


@dataclass
class TrainConfig:
    """How to train.

    Args:
        epochs: passes over the training data.
        optimizer: ``sgd`` (momentum 0.9, Nesterov off) or ``adam``.
        lr: peak learning rate.
        weight_decay: L2 strength on the parameters the method marks for decay.
        schedule: ``cosine`` (to 0 over the run), ``step`` (x``gamma`` every ``step_epochs``) or ``constant``.
        warmup_epochs: linear warm-up before the schedule.
        step_epochs: epochs between decays of the ``step`` schedule.
        gamma: decay factor of the ``step`` schedule.
        momentum: SGD momentum.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        amp: bf16 autocast (CUDA and CPU).
        seed: seeds parameters, data order and augmentation.
        clip_grad: clip the global gradient norm to this value (``None``: no clipping).
        compile: run the bit methods' per-bit weight construction (CSQ, BSQ) as ``torch.compile``'d
            kernels: faster steps after a compile of tens of seconds at the first step.
    """

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.1
    momentum: float = 0.9
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    clip_grad: float | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        if self.clip_grad is not None and not _positive(self.clip_grad):
            raise MpqError(f"--clip-grad must be a finite number > 0, got {self.clip_grad}")
        if self.optimizer not in OPTIMIZERS:
            raise MpqError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise MpqError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if not _is_int(self.epochs) or self.epochs < 0:
            raise MpqError(f"--epochs must be an integer >= 0, got {self.epochs}")
        if not _positive(self.lr):
            raise MpqError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (_number(self.weight_decay) and self.weight_decay >= 0):
            raise MpqError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (_number(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise MpqError(f"--lr-warmup-epochs must be a finite number >= 0, got {self.warmup_epochs}")
        if not _is_int(self.step_epochs) or self.step_epochs < 1:
            raise MpqError(f"step_epochs must be an integer >= 1, got {self.step_epochs}")
        if not (_positive(self.gamma) and self.gamma <= 1):
            raise MpqError(f"gamma must be in (0, 1], got {self.gamma}")
        if not (_number(self.momentum) and 0 <= self.momentum < 1):
            raise MpqError(f"momentum must be in [0, 1), got {self.momentum}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise MpqError(f"--seed must be an integer in 0..{MAX_SEED}, got {self.seed}")
        if not isinstance(self.amp, bool):
            raise MpqError(f"amp must be true or false, got {self.amp!r}")
        if not isinstance(self.compile, bool):
            raise MpqError(f"compile must be true or false, got {self.compile!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["compile"]:  # the default is left out: runs written before the option keep their fingerprints
            del d["compile"]
        return d


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _number(value) and value > 0


def lr_at(cfg: TrainConfig, epoch_progress: float) -> float:
    """Learning rate at a fractional epoch."""
    if cfg.warmup_epochs and epoch_progress < cfg.warmup_epochs:
        return cfg.lr * (epoch_progress + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** int(epoch_progress // max(cfg.step_epochs, 1))
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    t = min((epoch_progress - cfg.warmup_epochs) / span, 1.0)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def group_lr(group: dict, lr: float, cfg: TrainConfig) -> float:
    """A parameter group's learning rate when the schedule is at ``lr``.

    A method may slow a group down (``lr_scale``), or give it its own peak rate under SGD
    (``sgd_peak_lr``, following the schedule's shape), for parameters whose regulariser was tuned to
    one rate whatever rate fine-tunes the weights. Adam's steps do not scale with the gradient, so
    there the group follows ``--lr``.
    """
    peak = group.get("sgd_peak_lr")
    if peak is not None and cfg.optimizer == "sgd" and cfg.lr > 0:
        lr = peak * lr / cfg.lr
    return lr * group.get("lr_scale", 1.0)
