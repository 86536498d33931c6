"""Batch iteration: in-memory tensor datasets batched, augmented and normalised with vectorised ops on the
training device (deterministic for a seed), image folders through a DataLoader, and each process's shard
under torchrun."""

from __future__ import annotations

import torch

from .dataconfig import epoch_seed


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
