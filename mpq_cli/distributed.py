"""Several processes, one run: torchrun's environment, PyTorch's process group, and the few collectives
the engine and the methods need.

``torchrun --nproc-per-node N -m mpq_cli search ...`` starts N copies of mpq with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in the environment. :func:`session` joins them
(NCCL on CUDA, gloo on the CPU); the model trains under ``DistributedDataParallel``, each rank
reads a disjoint shard of every epoch (:mod:`mpq_cli.data`), and only rank 0 writes. Without
torchrun the world is one process and every function here is a no-op, so nothing else branches
on it.

What a method must reduce beyond the parameters' gradients (which DDP averages) it declares
through :class:`~mpq_cli.methods.base.Method`: ``distributed_gradients()`` for tensors whose
``.grad`` its step reads, and :func:`all_reduce_sum` where it sums statistics of its own.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import MpqError

# how long a collective waits for a rank that stopped answering before the run fails
TIMEOUT_ENV = "MPQ_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def launched() -> bool:
    """Started by torchrun (or another launcher setting ``WORLD_SIZE``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session():
    """Join the process group torchrun set up for the duration of one command (no-op for one process,
    or when the caller already joined one). Yields the :class:`World`.

    On a CUDA machine the group takes NCCL for CUDA tensors and gloo for CPU ones (a run with
    ``--device cpu`` there works too), and each rank's current device is ``cuda:LOCAL_RANK``.
    """
    global _world
    if not launched() or torch.distributed.is_initialized():
        yield _world
        return
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and local < torch.cuda.device_count()
    if cuda:
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    except Exception as exc:  # a rendezvous fails in many ways; one line says which
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MpqError(f"rank {rank}: could not join the {size} processes: {first}") from None
    _world = World(rank, size, local)
    try:
        yield _world
    finally:
        _world = World()
        # The DDP wrappers (often in reference cycles) hold the group: free them first, so that the group's
        # threads end here and not while the interpreter shuts down, where one that needs the GIL aborts the
        # process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def device_for(name: str) -> str:
    """The device a rank trains on: ``cuda``, ``cuda:N`` (a run's recorded device too) and ``auto`` on a
    CUDA machine become ``cuda:LOCAL_RANK``, one GPU per process as torchrun lays them out."""
    if not _world.active or name == "cpu":
        return name
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        if local_rank_gpus() <= _world.local_rank:
            raise MpqError(
                f"process {_world.local_rank} on this machine has no GPU of its own "
                f"({local_rank_gpus()} visible); start at most that many processes per machine"
            )
        return f"cuda:{_world.local_rank}"
    return name


def local_rank_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over ranks in place, in one collective per dtype (no-op for one process)."""
    if not _world.active or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_max(tensors: list[torch.Tensor]) -> None:
    """The elementwise maximum of ``tensors`` over ranks, in place (no-op for one process)."""
    if not _world.active:
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over ranks in place (no-op for one process)."""
    if not _world.active or not tensors:
        return
    all_reduce_sum(tensors)
    for t in tensors:
        t.div_(_world.size)


def average_gradients(tensors: list[torch.Tensor]) -> None:
    """Average the ``.grad`` of ``tensors`` (those that have one) over ranks: what DDP does for parameters,
    for the tensors a method's own step reads (ALQ's weights)."""
    all_reduce_mean([t.grad for t in tensors if t is not None and t.grad is not None])


def digest(tensors: list[torch.Tensor]) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes: what two ranks compare to prove they agree."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_agreement(digests: dict[str, str], what: str) -> None:
    """Every rank holds the same ``digests`` (name -> hash), or the run stops with an error naming the
    ranks and the first entries that differ."""
    if not _world.active:
        return
    gathered: list[dict[str, str] | None] = [None] * _world.size
    torch.distributed.all_gather_object(gathered, digests)
    differ = [r for r, d in enumerate(gathered) if d != gathered[0]]
    if differ:
        other = gathered[differ[0]] or {}
        names = [n for n in gathered[0] or {} if other.get(n) != gathered[0][n]] or ["(the set of entries)"]
        more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
        raise MpqError(
            f"ranks disagree on {what}: rank(s) {', '.join(map(str, differ))} differ from rank 0 in "
            f"{', '.join(names[:3])}{more}; the run stopped (its last checkpoint is kept; --resume continues it)"
        )


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (the value itself with one process)."""
    if not _world.active:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# -- the training loop under torchrun (engine.fit calls these) --------------------------------------------
def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel for the training steps (the method keeps the bare model).

    DDP fixes the parameters it reduces when it is built, so the loop builds it again when a method
    stops or starts training some (CSQ fixing its masks): rare, and cheaper than DDP's search for
    unused parameters at every step. Buffers are synchronised from rank 0 when it is built but not
    at every forward pass (DDP's default): a method's buffers change alike on every rank or hold a
    rank's own sums that the method reduces itself (BMPQ's bit gradients). BatchNorm's running
    statistics are averaged over the ranks at every epoch's end instead."""
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in model.parameters()):
        return model  # nothing to reduce: DDP refuses such a model
    # channels_last weights whose gradient arrives in another layout cost DDP one copy: not worth a warning
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # newer torch
        return DistributedDataParallel(model, device_ids=ids, init_sync=True, forward_sync_buffers=False)
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def average_norm_statistics(model: nn.Module) -> None:
    """BatchNorm running statistics averaged over ranks (each rank's were collected on its own shard)."""
    stats = [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var)
        if b is not None
    ]
    all_reduce_mean(stats)


def ranks_state_digests(model: nn.Module, hooks, *, buffers: bool = False) -> dict[str, str]:
    """Hashes of what every rank must hold alike: each parameter (and with ``buffers``, each buffer),
    the method's ``agreement_tensors`` (codes, bits) and its JSON state (schedules, alpha, history).

    Buffers are compared at the end only: during an epoch some hold a rank's own running sums."""
    tensors = model.state_dict() if buffers else dict(model.named_parameters())
    digests = {name: digest([t]) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    digests["method codes and bits"] = digest(list(hooks.agreement_tensors()))
    digests["method state"] = hashlib.sha256(json.dumps(hooks.state_dict(), sort_keys=True).encode()).hexdigest()
    return digests


def check_ranks_agree(model: nn.Module, hooks, epoch: int) -> None:
    """Stop the run unless every rank holds the same parameters and method state."""
    check_agreement(ranks_state_digests(model, hooks), f"the model and its scheme after epoch {epoch + 1}")
