"""The data settings (:class:`DataConfig`) and the dataset facts the command line shows: names, input
statistics, ``--normalize`` and ``--val-split`` syntax. Nothing here imports torch, so ``mpq --help`` stays fast;
:mod:`mpq_cli.data` loads and batches the data these settings describe."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MpqError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# name -> (mean, std, classes, augmentation: (crop padding, horizontal flip))
_TENSOR_DATASETS = {
    "mnist": ((0.1307,), (0.3081,), 10, (0, False)),
    "fashion-mnist": ((0.2860,), (0.3530,), 10, (2, True)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, (4, True)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100, (4, True)),
}
DATASETS = [*_TENSOR_DATASETS, "synthetic", "imagefolder:PATH"]


Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std), one value per channel or one for all

# --normalize's named statistics
NORMALIZE_PRESETS: dict[str, Stats] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "none": ((0.0,), (1.0,)),
    **{name: entry[:2] for name, entry in _TENSOR_DATASETS.items()},
}
NORMALIZE_SYNTAX = f"MEAN/STD (each one value or one per channel, comma-separated) or {', '.join(NORMALIZE_PRESETS)}"


def parse_normalize(text: str) -> Stats:
    """``--normalize`` text -> ``(mean, std)``: a preset (``imagenet``, ``none``, a dataset's name),
    ``MEAN/STD`` with each side one value or one per channel (``0.485,0.456,0.406/0.229,0.224,0.225``),
    or ``MEAN,STD`` (one value each: ``0.50196,0.50196`` is ``(x * 255 - 128) / 128``).

    Raises:
        MpqError: unparsable text, or statistics :func:`check_normalize` refuses.
    """
    text = text.strip().lower()
    if text in NORMALIZE_PRESETS:
        return NORMALIZE_PRESETS[text]
    if "/" in text:
        sides = text.split("/")
    else:  # the shorthand: exactly one mean and one std
        sides = text.split(",")
        if len(sides) != 2:
            sides = []
    try:
        mean, std = ([float(v) for v in side.split(",")] for side in sides)
    except ValueError:
        raise MpqError(f"--normalize expects {NORMALIZE_SYNTAX}; got {text!r}") from None
    return check_normalize((mean, std))


def check_normalize(value) -> Stats:
    """``(mean, std)`` as tuples of floats, checked: finite, std > 0, each side one value or one per channel
    (both sides the same length when both have several); a recorded ``[[...], [...]]`` is accepted."""
    try:
        mean, std = value
        mean = tuple(float(v) for v in mean if not isinstance(v, bool | str))
        std = tuple(float(v) for v in std if not isinstance(v, bool | str))
        ok = len(mean) == len(value[0]) and len(std) == len(value[1])
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MpqError(f"--normalize expects {NORMALIZE_SYNTAX}; got {value!r}")
    if not mean or not std or max(len(mean), len(std)) > 64:
        raise MpqError(f"--normalize needs 1 to 64 values on each side; got {len(mean)} and {len(std)}")
    if len(mean) > 1 and len(std) > 1 and len(mean) != len(std):
        raise MpqError(f"--normalize gives {len(mean)} means and {len(std)} standard deviations")
    if not all(math.isfinite(v) for v in mean + std):
        raise MpqError(f"--normalize values must be finite numbers; got {list(mean)}/{list(std)}")
    if min(std) <= 0:
        raise MpqError(f"--normalize standard deviations must be positive; got {list(std)}")
    return mean, std


def normalisation(name: str, channels: int, normalize=None) -> Stats:
    """``(mean, std)`` per input channel that the model's inputs are normalised with: ``normalize``
    (:attr:`DataConfig.normalize`) when given, else the dataset's statistics.

    Raises:
        MpqError: ``normalize`` gives neither one value nor ``channels`` values.
    """
    if normalize is not None:
        mean, std = check_normalize(normalize)
        for values in (mean, std):
            if len(values) not in (1, channels):
                wanted = "1 value" if channels == 1 else f"1 or {channels} values"
                raise MpqError(
                    f"--normalize gives {len(values)} values but the model takes {channels} input "
                    f"channel{'s' if channels > 1 else ''}: give {wanted} on each side"
                )
        return mean * (channels // len(mean)), std * (channels // len(std))
    if name in _TENSOR_DATASETS:
        mean, std = _TENSOR_DATASETS[name][:2]
        repeat = channels // len(mean) if channels % len(mean) == 0 else 1
        return mean * repeat, std * repeat
    if name.startswith("imagefolder:"):
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.0,) * channels, (1.0,) * channels


MAX_BATCH = 1 << 16
_SEED_STRIDE = 100_003  # a prime: (seed, epoch) pairs map to distinct generator seeds for any epoch count in use


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's shuffling and augmentation: a resumed run redraws the same batches."""
    return seed * _SEED_STRIDE + epoch


SYNTHETIC_IMAGES = 768  # 512 to train on, 256 to evaluate

# The hold-out's seed, apart from --seed: every run and every method of a comparison holds out the same images.
# Recorded in the run (DataConfig.val_split_seed), so a later default cannot move a recorded run's hold-out.
VAL_SPLIT_SEED = 271_828
VAL_SPLIT_SYNTAX = "a whole number of training images (N >= 1) or a fraction of them in (0, 1)"
MAX_SYNTHETIC_BYTES = 4 << 30


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def parse_val_split(text: str) -> int | float:
    """``--val-split`` text -> an image count (``5000``) or a fraction (``0.1``); checked by :class:`DataConfig`.

    Raises:
        MpqError: neither an integer nor a number.
    """
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise MpqError(f"--val-split expects {VAL_SPLIT_SYNTAX}; got {text!r}") from None


def check_val_split(value) -> int | float:
    """``value`` if it is an image count >= 1 or a fraction in (0, 1), else a one-line error."""
    if _int_in(value, 1, 1 << 40) or (isinstance(value, float) and math.isfinite(value) and 0 < value < 1):
        return value
    raise MpqError(f"--val-split expects {VAL_SPLIT_SYNTAX}; got {value!r}")


@dataclass
class DataConfig:
    """Which data, where, and how it is batched.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: root folder for dataset files (downloads go here when online); default ``$MPQ_DATA_DIR``,
            else ``data``, for the CLI and the API alike.
        batch_size: training and evaluation batch size.
        input_size: ``(C, H, W)`` for synthetic data (defaults to the model's).
        limit_train_batches: stop each training epoch after this many batches.
        limit_val_batches: evaluate on at most this many batches.
        augment: standard training augmentation for the dataset.
        workers: DataLoader workers (imagefolder only).
        normalize: ``(mean, std)`` the inputs, scaled to [0, 1], are normalised with (``x = (pixel / 255 - mean)
            / std``), each one value for every channel or one per channel; a ``--normalize`` text
            (:func:`parse_normalize`) is accepted. ``None``: the dataset's statistics (a torchvision model's
            pretrained weights bring their own, see ``api``).
        val_split: hold this many training images (an int) or this share of them (a float in (0, 1)) out of
            training, class-balanced (:func:`split_holdout`): the per-epoch checks and the budget steps' loss
            probe read them, and the test split is measured once at the end. ``None``: no hold-out; the
            checks read the test split. A ``--val-split`` text is accepted.
        val_split_seed: the hold-out's seed (:data:`VAL_SPLIT_SEED`, independent of ``--seed``).
    """

    name: str = "fashion-mnist"
    data_dir: str = field(default_factory=lambda: default_data_dir())  # $MPQ_DATA_DIR, else ./data, as the CLI
    batch_size: int = 128
    input_size: tuple[int, int, int] | None = None
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    augment: bool = True
    workers: int = 4
    normalize: Stats | None = None
    val_split: int | float | None = None
    val_split_seed: int = VAL_SPLIT_SEED

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or (
            self.name not in _TENSOR_DATASETS and self.name != "synthetic" and not self.name.startswith("imagefolder:")
        ):
            raise MpqError(f"unknown dataset {self.name!r}; choose from {', '.join(DATASETS)}")
        if not _int_in(self.batch_size, 1, MAX_BATCH):
            raise MpqError(f"--batch-size must be an integer in 1..{MAX_BATCH}, got {self.batch_size!r}")
        for option, value in (
            ("--limit-train-batches", self.limit_train_batches),
            ("--limit-val-batches", self.limit_val_batches),
        ):
            if value is not None and not _int_in(value, 1, 1 << 40):
                raise MpqError(f"{option} must be an integer >= 1 (leave it out for no limit), got {value!r}")
        if self.input_size is not None:
            size = tuple(self.input_size) if isinstance(self.input_size, list | tuple) else ()
            if len(size) != 3 or not _int_in(size[0], 1, 64) or not all(_int_in(v, 1, 4096) for v in size[1:]):
                raise MpqError(
                    f"--input-size must be C,H,W with C in 1..64 and H, W in 1..4096, got {self.input_size!r}"
                )
            self.input_size = size
        if not isinstance(self.augment, bool):
            raise MpqError(f"augment must be true or false, got {self.augment!r}")
        if isinstance(self.normalize, str):
            self.normalize = parse_normalize(self.normalize)
        elif self.normalize is not None:
            self.normalize = check_normalize(self.normalize)
        if isinstance(self.val_split, str):
            self.val_split = parse_val_split(self.val_split)
        if self.val_split is not None:
            self.val_split = check_val_split(self.val_split)
        if not _int_in(self.val_split_seed, 0, 2**63 - 1):
            raise MpqError(f"val_split_seed must be an integer >= 0, got {self.val_split_seed!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        # defaults are left out: runs written before these options keep their fingerprints
        if d["normalize"] is None:
            del d["normalize"]
        if d["val_split"] is None:
            del d["val_split"], d["val_split_seed"]
        return d


def default_data_dir() -> str:
    return os.environ.get("MPQ_DATA_DIR", "data")
