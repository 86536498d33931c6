"""Datasets, augmentation and batch iteration.

Small datasets (MNIST, Fashion-MNIST, CIFAR, synthetic) live in memory as one
``uint8``/float tensor and are batched, augmented and normalised with vectorised
tensor ops on the training device: no per-image PIL work, deterministic for a seed.
``imagefolder:PATH`` uses torchvision's ImageFolder and a DataLoader.

Three splits: the training batches, an optional hold-out of the training split (``--val-split``,
:func:`split_holdout`) that every in-training check reads, and the test split, measured once at the end.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


class TensorBatches:
    """Shuffled, augmented, normalised batches from in-memory tensors.

    ``images`` is ``(N, C, H, W)`` ``uint8`` (scaled to [0, 1], then normalised) or float (normalised
    as they are: synthetic data, whose statistics are 0 and 1 unless ``--normalize`` says otherwise).
    ``mean``/``std`` with more channels than the images (a grayscale dataset for an RGB model)
    broadcast them. Shuffling depends only on ``seed`` and the epoch set
    with :meth:`set_epoch`, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        images,
        labels,
        batch_size,
        mean,
        std,
        *,
        shuffle=False,
        crop_padding=0,
        flip=False,
        seed=0,
        limit=None,
        channels=None,
        size=None,
    ):
        self.images, self.labels = images, labels
        # (H, W) the model takes; images of another size are resized (bilinear) after augmentation
        self.size = tuple(size) if size is not None and tuple(size) != tuple(images.shape[2:]) else None
        self.batch_size, self.shuffle = batch_size, shuffle
        self.crop_padding, self.flip = crop_padding, flip
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.seed, self.epoch, self.limit = seed, 0, limit
        self.channels = channels or images.shape[1]
        self.device = torch.device("cpu")
        self.channels_last = False
        self.rank, self.ranks = 0, 1
        self.split = "train" if shuffle else "test"  # which split these are: train, holdout or test

    def to(self, device) -> TensorBatches:
        self.device = torch.device(device)
        self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def shard(self, rank: int, ranks: int) -> TensorBatches:
        """Read only this rank's share of every epoch (see :func:`shard_order`)."""
        self.rank, self.ranks = rank, ranks
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return _batch_count(len(self.labels), self)

    @property
    def split_samples(self) -> int:
        """Images in the whole split, whatever ``limit`` reads of it."""
        return len(self.labels)

    def __iter__(self):
        order, gen = _epoch_order(len(self.labels), self)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size].to(self.device)
            x = self.images[idx]
            x = ((x.float() / 255.0 if x.dtype == torch.uint8 else x) - self.mean) / self.std
            if self.crop_padding:
                x = _random_crop(x, self.crop_padding, gen)
            if self.flip:
                flip = (torch.rand(len(idx), generator=gen) < 0.5).to(self.device).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(-1), x)
            if x.shape[1] != self.channels:
                x = x.expand(-1, self.channels, -1, -1)
            if self.size is not None:
                x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


def shard_order(order: torch.Tensor, rank: int, ranks: int, *, pad: bool, keep: int | None = None) -> torch.Tensor:
    """Rank ``rank``'s share of one epoch's sample ``order`` (the same on every rank): every ``ranks``-th
    sample from ``rank`` on, as ``torch.utils.data.DistributedSampler`` does, so that batch ``i`` of all
    ranks together holds the samples of batch ``i`` of one process with a ``ranks`` times larger batch.

    Training (``pad``) repeats the order's first samples so every rank takes as many steps; an
    evaluation keeps its first ``keep`` samples and pads nothing, so each sample counts once.
    """
    if keep is not None:
        order = order[:keep]
    if pad and len(order) % ranks:
        extra = ranks - len(order) % ranks
        order = torch.cat([order, order.repeat(-(-extra // len(order)))[:extra]])
    return order[rank::ranks]


def _epoch_order(samples: int, batches) -> tuple[torch.Tensor, torch.Generator]:
    """This rank's sample order for the epoch and the generator its augmentation draws from.

    The permutation comes from ``(seed, epoch)`` alone, the same on every rank; under torchrun
    each rank then takes its shard and augments from a generator of its own."""
    gen = torch.Generator().manual_seed(epoch_seed(batches.seed, batches.epoch))
    order = torch.randperm(samples, generator=gen) if batches.shuffle else torch.arange(samples)
    if batches.ranks == 1:
        return order, gen
    order = shard_order(order, batches.rank, batches.ranks, pad=batches.shuffle, keep=_kept(batches))
    return order, torch.Generator().manual_seed(epoch_seed(batches.seed, batches.epoch) * batches.ranks + batches.rank)


def _kept(batches) -> int | None:
    """Samples a sharded evaluation keeps before sharding: ``limit`` batches of every rank."""
    return batches.limit * batches.batch_size * batches.ranks if batches.limit and not batches.shuffle else None


def _batch_count(samples: int, batches) -> int:
    """Batches one rank reads per epoch from ``samples``, after its shard and the limit."""
    if batches.ranks > 1:
        kept = min(samples, _kept(batches) or samples)
        samples = -(-kept // batches.ranks) if batches.shuffle else len(range(batches.rank, kept, batches.ranks))
    count = -(-samples // batches.batch_size)
    return min(count, batches.limit) if batches.limit else count


def _random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` (zero in normalised space) and crop back at a random offset per image."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(-1, x.shape[1], -1, w + 2 * padding)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(-1, x.shape[1], h, -1)
    return cropped.gather(3, cols)


class LoaderBatches:
    """A torch DataLoader with the same ``set_epoch``/limit/device interface as :class:`TensorBatches`."""

    def __init__(self, dataset, batch_size, *, shuffle, workers, seed, limit=None):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.workers, self.seed, self.limit, self.epoch = workers, seed, limit, 0
        self.device = torch.device("cpu")
        self.channels_last = False
        self.rank, self.ranks = 0, 1
        self.split = "train" if shuffle else "test"  # which split these are: train, holdout or test

    def to(self, device) -> LoaderBatches:
        self.device = torch.device(device)
        return self

    def shard(self, rank: int, ranks: int) -> LoaderBatches:
        """Read only this rank's share of every epoch (see :func:`shard_order`)."""
        self.rank, self.ranks = rank, ranks
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return _batch_count(len(self.dataset), self)

    @property
    def split_samples(self) -> int:
        """Images in the whole split, whatever ``limit`` reads of it."""
        return len(self.dataset)

    def __iter__(self):
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        sampler = None
        if self.ranks > 1:  # this rank's indices; the workers' augmentation seeds come from its generator
            order, gen = _epoch_order(len(self.dataset), self)
            sampler = order.tolist()
        loader = torch.utils.data.DataLoader(
            self.dataset,
            self.batch_size,
            shuffle=self.shuffle and sampler is None,
            sampler=sampler,
            generator=gen,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        for i, (x, y) in enumerate(loader):
            if i >= len(self):
                break
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


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


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_tensor_dataset(name: str, root: Path):
    if name in ("mnist", "fashion-mnist"):
        folder = _find_idx_folder(name, root)
        return tuple(_read_idx_pair(folder, *_IDX_FILES[split]) for split in ("train", "test"))
    return _read_cifar(name, root)


def _find_idx_folder(name: str, root: Path) -> Path:
    tv_name = "MNIST" if name == "mnist" else "FashionMNIST"
    candidates = [root / tv_name / "raw", root / name, root]
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        if all(_idx_path(folder, f) for pair in _IDX_FILES.values() for f in pair):
            return folder
    try:  # online: let torchvision fetch the files into data_dir
        from torchvision import datasets

        getattr(datasets, tv_name)(str(root), train=True, download=True)
        getattr(datasets, tv_name)(str(root), train=False, download=True)
        return root / tv_name / "raw"
    except Exception:  # no network: fall through to a message that says where the files go
        hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
        raise MpqError(
            f"{name} not found and could not be downloaded (offline?): put the four idx files "
            f"(train-images-idx3-ubyte.gz, ...) in {root / tv_name / 'raw'}{hint}"
        ) from None


def _idx_path(folder: Path, stem: str) -> Path | None:
    for p in (folder / stem, folder / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise MpqError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise MpqError(f"{path}: truncated idx file")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _read_idx_pair(folder: Path, images: str, labels: str):
    x = torch.from_numpy(_read_idx(_idx_path(folder, images)).copy()).unsqueeze(1)
    y = torch.from_numpy(_read_idx(_idx_path(folder, labels)).astype(np.int64))
    return x, y


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _read_cifar(name: str, root: Path):
    """CIFAR from, in this order: a folder of JPEG/PNG images (``train/<class>/*``, ``test/<class>/*``,
    also under ``ROOT/cifar10``), a ``cifar10*.tar*`` archive of that layout in ``ROOT``, or torchvision's
    python batches (``cifar-10-batches-py`` / ``cifar-100-python``, read without unpickling code),
    downloaded there when online. Images are decoded once into a uint8 cache."""
    if name == "cifar10":
        for folder in (root, root / "cifar10", root / "cifar-10"):
            if (folder / "train").is_dir() and (folder / "test").is_dir():
                return _cached_image_splits(folder, ("train", "test"), CIFAR10_CLASSES)
        archives = sorted(root.glob("cifar10*.tar*")) if root.is_dir() else []
        if archives:
            return _cached_image_splits(archives[0], ("train", "test"), CIFAR10_CLASSES)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if not folder.is_dir():
        _download_cifar(name, root, folder)
    return _read_cifar_batches(name, folder)


def _download_cifar(name: str, root: Path, folder: Path) -> None:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:  # online: the official archive, checked against its MD5
        datasets.utils.download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except Exception:  # no network: a message that says where the files go
        hint = (
            f", or the JPEG folders {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg"
            if name == "cifar10"
            else ""
        )
        raise MpqError(
            f"{name} not found and could not be downloaded (offline?): extract the python version so "
            f"that {folder} exists{hint}"
        ) from None


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles of numpy arrays: only the globals those need are allowed, so a
    batch file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batches(name: str, folder: Path):
    files = (
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if name == "cifar10"
        else {"train": ["train"], "test": ["test"]}
    )
    label_key = "labels" if name == "cifar10" else "fine_labels"
    out = []
    for split in ("train", "test"):
        images, labels = [], []
        for file in files[split]:
            try:
                with open(folder / file, "rb") as f:
                    batch = _BatchUnpickler(f, encoding="latin1").load()
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(v) for v in batch[label_key])
            except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
                raise MpqError(
                    f"{folder / file}: not a readable CIFAR batch ({exc.__class__.__name__}: {exc})"
                ) from None
        out.append((torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)))
    return tuple(out)


MAX_CACHED_IMAGE_BYTES = 2 << 30  # an image folder decoded whole into memory, at most
_CACHE_ORDER_SEED = 0  # the fixed order a decoded image set is stored in


def _small_uniform_images(root: Path, splits: tuple[str, str]) -> tuple[int, int] | None:
    """``(H, W)`` when every image under ``root/SPLIT/CLASS/`` has that one size and all of them decoded fit in
    :data:`MAX_CACHED_IMAGE_BYTES` (read from the files' headers); else ``None``."""
    from PIL import Image

    paths = [p for split in splits for p in (root / split).glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        return None
    sizes = set()
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
        except OSError:
            return None
        if len(sizes) > 1:
            return None
    w, h = sizes.pop()
    return (h, w) if len(paths) * 3 * h * w <= MAX_CACHED_IMAGE_BYTES else None


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


# -- image folders and archives, decoded once into a uint8 cache -------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _image_members(source: Path, splits: tuple[str, ...]) -> dict[str, list[tuple[str, str]]]:
    """Per split, ``(class, member)`` of every image in a folder or a tar archive, sorted."""
    found: dict[str, list[tuple[str, str]]] = {split: [] for split in splits}
    if source.is_dir():
        for split in splits:
            for path in sorted((source / split).glob("*/*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    found[split].append((path.parent.name, str(path.relative_to(source))))
        return found
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if (
                member.isfile()
                and len(parts) >= 3
                and parts[-3] in found
                and Path(member.name).suffix.lower() in IMAGE_SUFFIXES
            ):
                found[parts[-3]].append((parts[-2], member.name))
    return {split: sorted(items) for split, items in found.items()}


def _cache_path(source: Path, fingerprint: str) -> Path:
    """``source``'s cache file: beside the data when that folder is writable, else in ``$MPQ_CACHE_DIR``
    (default ``~/.cache/mpq``)."""
    name = f"{source.name}.{fingerprint}.mpq-cache.safetensors"
    beside = source.parent if source.is_file() else source
    # the folder's write bits, not only access(): root may write anywhere, but a folder shipped read-only
    # (a shared dataset) is not the place for a cache
    if beside.stat().st_mode & 0o222 and os.access(beside, os.W_OK):
        return beside / ".mpq-cache" / name
    return Path(os.environ.get("MPQ_CACHE_DIR", Path.home() / ".cache" / "mpq")) / name


def _cached_image_splits(source: Path, splits: tuple[str, str], classes: tuple[str, ...] | None = None):
    """``((x_train, y_train), (x_test, y_test))`` as uint8 ``(N, 3, H, W)`` and int64 labels, from a folder
    or archive of ``SPLIT/CLASS/IMAGE`` files. The first call decodes every image and writes a cache
    (safetensors, keyed by the files' names, sizes and times); later calls read only the cache."""
    from safetensors.torch import load_file

    from .rundir import save_safetensors

    # the cache key: an archive's path, size and time (listing it means decompressing it); a folder's files
    archive = source.is_file()
    members = None if archive else _image_members(source, splits)
    stat = source.stat()
    key = [str(source.resolve()), list(splits), list(classes or []), f"order-{_CACHE_ORDER_SEED}"]
    if archive:
        key += [stat.st_size, stat.st_mtime_ns]
    else:
        key.append(
            [
                (m, (source / m).stat().st_size, (source / m).stat().st_mtime_ns)
                for items in members.values()
                for _, m in items
            ]
        )
    cache = _cache_path(source, hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16])
    if cache.is_file():
        try:
            tensors = load_file(str(cache))
            return tuple((tensors[f"{s}.images"], tensors[f"{s}.labels"]) for s in splits)
        except Exception:  # a damaged cache is rebuilt
            cache.unlink(missing_ok=True)
    members = members or _image_members(source, splits)
    if not members[splits[0]] or not members[splits[1]]:
        raise MpqError(f"{source}: no images under {splits[0]}/<class>/ and {splits[1]}/<class>/")
    found_classes = sorted({c for items in members.values() for c, _ in items})
    classes = classes or tuple(found_classes)
    unknown = sorted(set(found_classes) - set(classes))
    if unknown:
        raise MpqError(f"{source}: unexpected class folders {unknown[:3]} (expected {', '.join(classes)})")
    index = {c: i for i, c in enumerate(classes)}
    tensors = {}
    for split in splits:
        images = _decode_all(source, [m for _, m in members[split]])
        labels = torch.tensor([index[c] for c, _ in members[split]], dtype=torch.int64)
        # files come sorted by class; a fixed shuffle makes every prefix (--limit-val-batches) a fair sample
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_CACHE_ORDER_SEED))
        tensors[f"{split}.images"], tensors[f"{split}.labels"] = images[order].contiguous(), labels[order]
    try:
        save_safetensors(cache, tensors, {"mpq.classes": ",".join(classes), "mpq.source": str(source)})
    except OSError:  # no writable cache folder: decode again next time
        pass
    return tuple((tensors[f"{s}.images"], tensors[f"{s}.labels"]) for s in splits)


def _decode_all(source: Path, names: list[str]) -> torch.Tensor:
    """Decode images (all of one size) into one uint8 ``(N, 3, H, W)`` tensor."""
    import io

    from PIL import Image, UnidentifiedImageError

    def decode(data: bytes, name: str) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(data)) as img:
                return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        except (OSError, UnidentifiedImageError) as exc:
            raise MpqError(f"{source}: cannot decode {name} ({exc})") from None

    if source.is_dir():
        images = [decode((source / n).read_bytes(), n) for n in names]
    else:
        wanted = set(names)
        raw: dict[str, bytes] = {}
        with tarfile.open(source) as tar:
            for member in tar:
                if member.name in wanted:
                    raw[member.name] = tar.extractfile(member).read()
        images = [decode(raw[n], n) for n in names]
    sizes = {tuple(img.shape) for img in images}
    if len(sizes) != 1:
        raise MpqError(f"{source}: images of several sizes {sorted(sizes)[:3]}; resize them to one size first")
    return torch.stack(images)
