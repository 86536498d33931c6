"""Datasets, augmentation and batch iteration.

Small datasets (MNIST, Fashion-MNIST, CIFAR, synthetic) live in memory as one
``uint8``/float tensor and are batched, augmented and normalised with vectorised
tensor ops on the training device: no per-image PIL work, deterministic for a seed.
``imagefolder:PATH`` uses torchvision's ImageFolder and a DataLoader.

Three splits: the training batches, an optional hold-out of the training split (``--val-split``,
:func:`split_holdout`) that every in-training check reads, and the test split, measured once at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .batches import (  # noqa: F401  (re-exported)
    LoaderBatches,
    TensorBatches,
    _random_crop,
    shard_order,
)
from .dataconfig import (  # noqa: F401  (re-exported: the data settings' home is dataconfig)
    _SEED_STRIDE,
    _TENSOR_DATASETS,
    DATASETS,
    DEBIAN_FASHION_MNIST,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_BATCH,
    MAX_SYNTHETIC_BYTES,
    NORMALIZE_PRESETS,
    NORMALIZE_SYNTAX,
    SYNTHETIC_IMAGES,
    VAL_SPLIT_SEED,
    VAL_SPLIT_SYNTAX,
    DataConfig,
    Stats,
    _int_in,
    check_normalize,
    check_val_split,
    default_data_dir,
    epoch_seed,
    normalisation,
    parse_normalize,
    parse_val_split,
)
from .datasets import (  # noqa: F401  (re-exported)
    CIFAR10_CLASSES,
    _cached_image_splits,
    _read_tensor_dataset,
    _small_uniform_images,
)
from .distributed import world
from .errors import MpqError


@dataclass
class DatasetInfo:
    """What a model needs to know about its data."""

    name: str
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    synthetic: bool = False


@dataclass
class Splits:
    """The batches of one dataset (:func:`load_splits`).

    Args:
        info: what the model needs to know about the data.
        train: shuffled, augmented training batches (without the hold-out).
        val: the hold-out of ``DataConfig.val_split`` (unshuffled, unaugmented), or ``None`` without one.
        test: the test (or ``val/``) split, unshuffled.
        val_images: the hold-out's size (``None`` without one).
    """

    info: DatasetInfo
    train: object
    val: object | None
    test: object
    val_images: int | None = None

    @property
    def checks(self):
        """What the in-training checks read: the hold-out, or the test split without one."""
        return self.val if self.val is not None else self.test


def load_data(
    cfg: DataConfig, *, channels: int | None = None, default_input: tuple[int, int, int] = (3, 32, 32), seed: int = 0
) -> tuple[DatasetInfo, object, object]:
    """``(info, train_batches, test_batches)`` of :func:`load_splits` (the hold-out, if any, left out)."""
    splits = load_splits(cfg, channels=channels, default_input=default_input, seed=seed)
    return splits.info, splits.train, splits.test


def load_splits(
    cfg: DataConfig, *, channels: int | None = None, default_input: tuple[int, int, int] = (3, 32, 32), seed: int = 0
) -> Splits:
    """Build the training batches, the hold-out (with ``cfg.val_split``) and the test split; under
    torchrun, each rank's shard of each (the hold-out is the same on every rank: its seed is fixed).

    Args:
        cfg: the data configuration.
        channels: channels the model takes; grayscale data is repeated to match.
        default_input: ``(C, H, W)`` synthetic data takes unless ``cfg.input_size`` says otherwise.
        seed: shuffling and synthetic-data seed (not the hold-out's: see ``DataConfig.val_split_seed``).
    """
    here = world()
    if not here.active:
        return _load_data(cfg, channels, default_input, seed)
    # rank 0 downloads, decodes and caches first; the others then read its cache
    if not here.is_main:
        torch.distributed.barrier()
    try:
        splits = _load_data(cfg, channels, default_input, seed)
    finally:
        if here.is_main:
            torch.distributed.barrier()
    for name, batches in (("hold-out (--val-split)", splits.val), ("validation set", splits.test)):
        if batches is None:
            continue
        held_out = len(batches.labels) if isinstance(batches, TensorBatches) else len(batches.dataset)
        if batches.limit:
            held_out = min(held_out, batches.limit * batches.batch_size * here.size)
        if held_out < here.size:  # a rank with nothing to evaluate would leave the others waiting
            raise MpqError(f"the {name} has fewer samples than the {here.size} processes; use fewer processes")
        batches.shard(here.rank, here.size)
    splits.train.shard(here.rank, here.size)
    return splits


def split_holdout(labels: torch.Tensor, val_split: int | float, classes: int, seed: int = VAL_SPLIT_SEED):
    """``(train_indices, holdout_indices)`` of a training split with these ``labels``: a class-balanced hold-out.

    The hold-out has ``N = val_split`` images (an int), or ``N = floor(val_split * len(labels))`` (a
    fraction); each class gives ``N // classes`` of them, and the classes with the lowest indices one
    more each until there are ``N``. Within a class the images are the first in a permutation drawn from
    ``seed`` alone, so the hold-out depends on the labels and the seed, never on ``--seed`` or the rank.
    The hold-out indices come in that permutation's order (any prefix, as ``--limit-val-batches``
    reads, mixes the classes); the training indices in ascending order.

    Raises:
        MpqError: ``N`` is not below the split's size, is under one image per class, or a class has too
            few images to give its share and keep one to train on.
    """
    n = len(labels)
    total = val_split if isinstance(val_split, int) else math.floor(val_split * n)
    if total >= n:
        raise MpqError(f"--val-split {val_split} holds out {total} of the {n} training images; it must leave some")
    if total < classes:
        raise MpqError(
            f"--val-split {val_split} holds out {total} of the {n} training images; "
            f"at least one per class ({classes}) is needed"
        )
    counts = torch.bincount(labels, minlength=classes)[:classes]
    want = torch.full((classes,), total // classes, dtype=torch.int64)
    want[: total % classes] += 1
    short = (counts <= want).nonzero().flatten().tolist()
    if short:
        c = short[0]
        raise MpqError(
            f"--val-split {val_split}: class {c} has {int(counts[c])} training images, too few to hold out "
            f"{int(want[c])} and train on the rest"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    by_class = labels[perm].sort(stable=True)
    # each sample's rank within its class, in the permutation's order
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_class.indices] = torch.arange(n) - starts[by_class.values]
    held = perm[rank < want[labels[perm]]]
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held


def _holdout_tensors(cfg: DataConfig, images: torch.Tensor, labels: torch.Tensor, classes: int):
    """``(train images, train labels, held-out images, held-out labels)``; the last two ``None`` without a split."""
    if cfg.val_split is None:
        return images, labels, None, None
    train, held = split_holdout(labels, cfg.val_split, classes, cfg.val_split_seed)
    return images[train], labels[train], images[held], labels[held]


def _holdout_batches(cfg: DataConfig, images, labels, mean, std, **kwargs) -> TensorBatches | None:
    """The hold-out as evaluation batches (no shuffle, no augmentation, ``--limit-val-batches``)."""
    if images is None:
        return None
    batches = TensorBatches(images, labels, cfg.batch_size, mean, std, limit=cfg.limit_val_batches, **kwargs)
    batches.split = "holdout"
    return batches


def _load_data(cfg: DataConfig, channels: int | None, default_input: tuple[int, int, int], seed: int) -> Splits:
    if cfg.name == "synthetic":
        return _synthetic(cfg, cfg.input_size or default_input, seed, channels)
    if cfg.name.startswith("imagefolder:"):
        return _imagefolder(cfg, seed)
    _, _, classes, (padding, flip) = _TENSOR_DATASETS[cfg.name]
    (xtr, ytr), (xte, yte) = _read_tensor_dataset(cfg.name, Path(cfg.data_dir))
    xtr, ytr, xval, yval = _holdout_tensors(cfg, xtr, ytr, classes)
    in_ch = xtr.shape[1]
    channels = channels or in_ch
    if channels not in (in_ch, 3) or (channels == 3 and in_ch not in (1, 3)):
        raise MpqError(f"model takes {channels} input channels but {cfg.name} has {in_ch}")
    mean, std = normalisation(cfg.name, channels, cfg.normalize)
    # --input-size resizes (e.g. CIFAR's 32 px to 96 for MobileNetV2, whose strides leave 1 px of 32)
    size = tuple(cfg.input_size[1:]) if cfg.input_size else tuple(xtr.shape[2:])
    info = DatasetInfo(cfg.name, classes, channels, size, mean, std)
    if mean[:in_ch] * (channels // in_ch) == mean and std[:in_ch] * (channels // in_ch) == std:
        mean, std = mean[:in_ch], std[:in_ch]  # grayscale normalised once, then repeated (not three times)
    train = TensorBatches(
        xtr,
        ytr,
        cfg.batch_size,
        mean,
        std,
        shuffle=True,
        crop_padding=padding if cfg.augment else 0,
        flip=flip and cfg.augment,
        seed=seed,
        limit=cfg.limit_train_batches,
        channels=channels,
        size=size,
    )
    val = _holdout_batches(cfg, xval, yval, mean, std, channels=channels, size=size)
    test = TensorBatches(xte, yte, cfg.batch_size, mean, std, limit=cfg.limit_val_batches, channels=channels, size=size)
    return Splits(info, train, val, test, None if yval is None else len(yval))


def _synthetic(cfg: DataConfig, shape, seed: int, channels: int | None):
    """Random images with labels a fixed random linear map of the pixels decides (learnable, not real)."""
    c, h, w = shape
    if channels and channels != c:
        c = channels
    if SYNTHETIC_IMAGES * c * h * w * 4 > MAX_SYNTHETIC_BYTES:
        raise MpqError(
            f"synthetic data of {SYNTHETIC_IMAGES} images of {c}x{h}x{w} would take "
            f"{SYNTHETIC_IMAGES * c * h * w * 4 / 2**30:.1f} GiB; use a smaller --input-size"
        )
    gen = torch.Generator().manual_seed(10_000 + seed)
    classes = 10
    x = torch.randn(SYNTHETIC_IMAGES, c, h, w, generator=gen)
    proj = torch.randn(c * h * w, classes, generator=gen)
    y = (x.flatten(1) @ proj).argmax(1)
    mean, std = normalisation("synthetic", c, cfg.normalize)
    info = DatasetInfo("synthetic", classes, c, (h, w), mean, std, synthetic=True)
    xtr, ytr, xval, yval = _holdout_tensors(cfg, x[:512], y[:512], classes)
    train = TensorBatches(xtr, ytr, cfg.batch_size, mean, std, shuffle=True, seed=seed, limit=cfg.limit_train_batches)
    val = _holdout_batches(cfg, xval, yval, mean, std)
    test = TensorBatches(x[512:], y[512:], cfg.batch_size, mean, std, limit=cfg.limit_val_batches)
    return Splits(info, train, val, test, None if yval is None else len(yval))


def _imagefolder(cfg: DataConfig, seed: int):
    from torchvision import datasets, transforms

    root = Path(cfg.name.split(":", 1)[1])
    held_out = next((name for name in ("val", "test") if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or held_out is None:
        raise MpqError(f"imagefolder:{root} needs train/ and val/ (or test/) subfolders (one folder per class)")
    small = _small_uniform_images(root, ("train", held_out))
    if small is not None and (cfg.input_size is None or tuple(cfg.input_size[1:]) == small):
        return _cached_imagefolder(cfg, root, held_out, seed)
    size = cfg.input_size[1:] if cfg.input_size else (224, 224)
    mean, std = normalisation(cfg.name, 3, cfg.normalize)
    norm = transforms.Normalize(mean, std)
    train_tf = (
        transforms.Compose(
            [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
        )
        if cfg.augment
        else None
    )
    val_tf = transforms.Compose(
        [transforms.Resize(int(size[0] * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(), norm]
    )
    try:
        train_ds = datasets.ImageFolder(str(root / "train"), train_tf or val_tf)
        val_ds = datasets.ImageFolder(str(root / held_out), val_tf)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or class folders without images
        first = (str(exc).strip().splitlines() or [""])[0]
        raise MpqError(f"imagefolder:{root}: {first}") from None
    if train_ds.classes != val_ds.classes:
        raise MpqError(f"{root}: train/ and {held_out}/ have different class folders")
    info = DatasetInfo(cfg.name, len(train_ds.classes), 3, tuple(size), mean, std)
    holdout = None
    if cfg.val_split is not None:  # the hold-out reads the training folder through the evaluation transform
        keep, held = split_holdout(
            torch.tensor(train_ds.targets), cfg.val_split, len(train_ds.classes), cfg.val_split_seed
        )
        plain = datasets.ImageFolder(str(root / "train"), val_tf)
        train_ds = torch.utils.data.Subset(train_ds, keep.tolist())
        holdout = LoaderBatches(
            torch.utils.data.Subset(plain, held.tolist()),
            cfg.batch_size,
            shuffle=False,
            workers=cfg.workers,
            seed=seed,
            limit=cfg.limit_val_batches,
        )
        holdout.split = "holdout"
    train = LoaderBatches(
        train_ds, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=seed, limit=cfg.limit_train_batches
    )
    test = LoaderBatches(
        val_ds, cfg.batch_size, shuffle=False, workers=cfg.workers, seed=seed, limit=cfg.limit_val_batches
    )
    return Splits(info, train, holdout, test, None if holdout is None else len(holdout.dataset))


def _cached_imagefolder(cfg: DataConfig, root: Path, held_out: str, seed: int):
    """A small image folder of one image size: decoded once, cached, and batched in memory like CIFAR (random
    crops with 1/8 of the side as padding and flips), normalised with ImageNet's statistics (or --normalize's)."""
    (xtr, ytr), (xte, yte) = _cached_image_splits(root, ("train", held_out))
    classes = int(max(ytr.max(), yte.max())) + 1
    xtr, ytr, xval, yval = _holdout_tensors(cfg, xtr, ytr, classes)
    padding = max(1, xtr.shape[-1] // 8)
    mean, std = normalisation(cfg.name, 3, cfg.normalize)
    info = DatasetInfo(cfg.name, classes, 3, tuple(xtr.shape[2:]), mean, std)
    train = TensorBatches(
        xtr,
        ytr,
        cfg.batch_size,
        mean,
        std,
        shuffle=True,
        crop_padding=padding if cfg.augment else 0,
        flip=cfg.augment,
        seed=seed,
        limit=cfg.limit_train_batches,
    )
    val = _holdout_batches(cfg, xval, yval, mean, std)
    test = TensorBatches(xte, yte, cfg.batch_size, mean, std, limit=cfg.limit_val_batches)
    return Splits(info, train, val, test, None if yval is None else len(yval))
