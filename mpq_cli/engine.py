"""The one training and evaluation loop every command uses.

The loop knows nothing about methods: a method plugs in through the
:class:`TrainingHooks` it implements (extra loss, epoch/step hooks, progress
numbers, optimizer groups). Devices, bf16 autocast, learning-rate schedules,
metrics, per-epoch checkpoints and resuming live here, and so does running under torchrun
(``DistributedDataParallel``, sharded evaluation, rank 0 writing; :mod:`mpq_cli.distributed`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .distributed import check_ranks_agree, ranks_state_digests  # noqa: F401  (re-exported)
from .errors import MpqError
from .quant.bits import compiled_kernels
from .reporting import Reporter  # noqa: F401  (re-exported: library code reports through it)
from .rundir import MetricsLog, save_checkpoint
from .trainconfig import (  # noqa: F401  (re-exported: the settings' home is trainconfig.py)
    MAX_SEED,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    group_lr,
    lr_at,
)

# Training stops as diverged when the mean loss of a logging window (or the validation loss)
# exceeds this multiple of its reference: the larger of the run's first step's loss and
# ln(classes), the loss of a uniform guess (so that a model starting near zero loss may
# still rise while a method adapts it).
DIVERGENCE_FACTOR = 10.0
LOG_EVERY = 10  # steps between reads of the loss on the host (a synchronisation on a GPU)


class TrainingHooks(Protocol):
    """What the loop asks of a method (``mpq_cli.methods.base.Method`` implements it)."""

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]: ...
    def regularizer(self) -> torch.Tensor | None: ...
    def before_optimizer_step(self) -> None: ...
    def on_epoch_start(self, epoch: int, epochs: int, steps_per_epoch: int) -> None: ...
    def on_step_end(self) -> None: ...
    def progress(self) -> dict[str, float]: ...
    def wants_optimizer_reset(self) -> bool: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def distributed_gradients(self) -> list[torch.Tensor]: ...
    def agreement_tensors(self) -> list[torch.Tensor]: ...


class PlainTraining:
    """Hooks for FP training: weight decay on weights (ndim > 1) only, nothing else."""

    def param_groups(self, model, weight_decay):
        params = [p for p in model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]

    def regularizer(self):
        return None

    def before_optimizer_step(self):
        pass

    def on_epoch_start(self, epoch, epochs, steps_per_epoch):
        pass

    def on_step_end(self):
        pass

    def progress(self):
        return {}

    def wants_optimizer_reset(self):
        return False

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def distributed_gradients(self):
        return []

    def agreement_tensors(self):
        return []  # the parameters, which DDP keeps equal, are compared by the loop itself


def resolve_device(name: str) -> torch.device:
    name = distributed.device_for(name)  # under torchrun, each rank its own GPU
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MpqError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise MpqError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    # one fused kernel per update instead of a few passes per parameter tensor: the bit methods hold 16
    # parameters per weight, and on a CPU the default is a loop of single-tensor ops
    fused = all(p.is_floating_point() for g in groups for p in g["params"])
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA and on the CPU (where it is exact to test, and fast only on CPUs with bf16 units)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches, *, amp: bool = False, reporter: Reporter | None = None, description: str = "eval"
) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean loss of ``model`` in evaluation mode."""
    reporter = reporter or Reporter()
    model.eval()
    device = next(model.parameters()).device
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    reporter.start(description, len(batches))
    try:
        for x, y in batches:
            with _autocast(device, amp):
                out = model(x)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            correct1 += (top[:, 0] == y).sum()
            correct5 += (top == y[:, None]).any(1).sum()
            count += len(y)
            reporter.advance()
    finally:
        reporter.stop()
    if distributed.world().active:  # each rank saw its shard: the sums over ranks are the whole set's
        totals = torch.stack([correct1, correct5, loss_sum, torch.tensor(float(count), device=device)]).double()
        distributed.all_reduce_sum([totals])
        correct1, correct5, loss_sum, count = totals[0], totals[1], totals[2], int(totals[3])
    if count == 0:
        raise MpqError("the evaluation set is empty")
    result = {"top1": 100.0 * float(correct1) / count, "loss": float(loss_sum) / count, "samples": count}
    # the split's size beside what was read of it: a partial measurement says so wherever it is shown
    result["split_samples"] = getattr(batches, "split_samples", count)
    if out.shape[1] > 5:
        result["top5"] = 100.0 * float(correct5) / count
    return result


def loss_probe(model: nn.Module, batches, max_batches: int) -> LossProbe:
    """A callable measuring the mean loss of ``model`` on the first ``max_batches`` batches
    (:class:`LossProbe`)."""
    fixed = []
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        fixed.append(batch)
    return LossProbe(model, fixed)


class LossProbe:
    """The mean loss of ``model`` on a fixed list of batches: calling it returns that number.

    The model runs in evaluation mode (exact quantized weights), except that BatchNorm
    layers normalise with each probe batch's own statistics and leave their running
    statistics untouched: those were collected with the weights the model trained with
    (a relaxed or latent weight), and a probe of exact weights against them can read a
    working network as broken (a ResNet-20 CSQ search measured loss 4 where the exact
    model was fine, and its budget step then zeroed whole blocks).

    Under torchrun each rank probes its shard of those batches and the loss is their mean over
    every rank's samples, the same number everywhere, so every rank takes the same decisions.
    :meth:`losses` gives the same batches' losses with their autograd graphs, for the budget step's
    screen (``mpq_cli.budget_screen``), which differentiates them instead of probing every option.
    """

    def __init__(self, model: nn.Module, batches: list):
        self.model = model
        self.batches = batches
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @torch.no_grad()
    def __call__(self) -> float:
        sums = torch.zeros(2, dtype=torch.float64, device=next(self.model.parameters()).device)  # loss, samples
        for loss, n in self.losses():
            sums[0] += loss.double()
            sums[1] += n
        distributed.all_reduce_sum([sums])
        total, n = sums.tolist()
        return total / max(n, 1)

    @torch.no_grad()
    def top1(self) -> float:
        """Top-1 (%) of the model on the probe's batches, in the probe's mode (over every rank's samples)."""
        sums = torch.zeros(2, dtype=torch.float64, device=next(self.model.parameters()).device)  # correct, samples
        for correct, n in self._outcomes():
            sums[0] += correct
            sums[1] += n
        distributed.all_reduce_sum([sums])
        correct, n = sums.tolist()
        return 100.0 * correct / max(n, 1)

    def _outcomes(self):
        for logits, y in self._logits():
            yield (logits.argmax(1) == y).sum().double(), len(y)

    def losses(self):
        """Each probe batch's summed loss (a graph to differentiate when grad is enabled) and its sample
        count, in the probe's mode; this rank's batches only (the caller reduces over ranks)."""
        for logits, y in self._logits():
            yield F.cross_entropy(logits, y, reduction="sum"), len(y)

    def _logits(self):
        """Each probe batch's logits and labels in the probe's mode (BatchNorm on the batch's statistics)."""
        was_training = self.model.training
        # the running statistics (buffers) only: writing the affine parameters back, unchanged, would bump their
        # versions and break a caller's backward pass through the losses given
        saved = [[(buf, buf.clone()) for buf in m.buffers(recurse=False)] for m in self._norms]
        self.model.eval()
        for m in self._norms:
            m.train()
        try:
            for x, y in self.batches:
                yield self.model(x), y
        finally:
            with torch.no_grad():
                for buf, value in (pair for pairs in saved for pair in pairs):
                    buf.copy_(value)
            self.model.train(was_training)


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, hooks: TrainingHooks, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step with the method's hooks; returns the detached ``(loss, logits)``.

    Nothing here reads a tensor into Python (tests/test_host_sync.py): on a GPU that would
    wait for the device every step."""
    with _autocast(x.device, cfg.amp), compiled_kernels(cfg.compile):
        out = model(x)
        loss = F.cross_entropy(out.float(), y)
    reg = hooks.regularizer()
    total = loss if reg is None else loss + reg
    optimizer.zero_grad(set_to_none=True)
    total.backward()  # under DDP, this also averages the parameters' gradients over the ranks
    if distributed.world().active:  # and these, which are no parameters: the tensors a method's own step reads
        distributed.average_gradients(hooks.distributed_gradients())
    if cfg.clip_grad:  # on the loss's own gradients, before a method rescales any (CSQ)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    hooks.before_optimizer_step()
    optimizer.step()
    hooks.on_step_end()
    if hooks.wants_optimizer_reset():
        optimizer.state.clear()
    return loss.detach(), out.detach()


def fit(
    model: nn.Module,
    train,
    val,
    cfg: TrainConfig,
    *,
    hooks: TrainingHooks | None = None,
    run_dir: Path | None = None,
    stage: str = "train",
    reporter: Reporter | None = None,
    resume: dict | None = None,
    fingerprint: str | None = None,
) -> list[dict]:
    """Train ``model`` for ``cfg.epochs``, evaluating and checkpointing after every epoch.

    Args:
        model: the model, already on its device.
        train, val: batch iterables with ``set_epoch`` and ``len``; ``val`` is what every epoch's check reads
            (its ``split``, ``holdout`` or ``test``, is recorded as ``val_set``).
        cfg: training settings.
        hooks: the method's hooks (default: plain FP training).
        run_dir: where ``metrics.jsonl`` and ``checkpoint.pt`` go (nothing written if ``None``).
        stage: label written into metrics and checkpoints (``train``, ``search``, ``finetune``).
        reporter: progress sink.
        resume: a checkpoint dict written by a previous call to continue from.
        fingerprint: identifies the configuration; a checkpoint from another is refused.

    Returns:
        The per-epoch metric records.
    """
    hooks = hooks or PlainTraining()
    reporter = reporter or Reporter()
    device = next(model.parameters()).device
    here = distributed.world()
    optimizer = make_optimizer(hooks.param_groups(model, cfg.weight_decay), cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl") if run_dir and here.is_main else None
    start_epoch = 0
    elapsed_before = float(resume.get("elapsed", 0.0)) if resume is not None else 0.0
    reference_loss = resume.get("reference_loss") if resume is not None else None
    first_loss = None
    fit_started = time.time()
    if resume is not None:
        if resume.get("stage") != stage or (fingerprint and resume.get("fingerprint") != fingerprint):
            raise MpqError("--resume: the checkpoint belongs to a different configuration or stage; start a new run")
        model.load_state_dict(resume["model"])
        hooks.load_state_dict(json.loads(resume["method"]))
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        start_epoch = int(resume["epoch"]) + 1
        if metrics:
            metrics.truncate_after(int(resume["epoch"]) + 1)
    steps = len(train)
    if steps == 0:
        raise MpqError("the training set is empty")
    step_model, trainable = model, None
    records = []
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        train.set_epoch(epoch)
        hooks.on_epoch_start(epoch, cfg.epochs, steps)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = reported = 0
        window_sum, window_seen = 0.0, 0
        # seconds per step, one value per logging window (its loss read on the host syncs a GPU): their median is
        # the epoch's training step time, which a budget step or a slow first step inside one window does not move
        step_times, window_started = [], time.perf_counter()
        reporter.start(f"{stage} {epoch + 1}/{cfg.epochs}", steps)
        try:
            for i, (x, y) in enumerate(train):
                lr = lr_at(cfg, epoch + i / steps)
                for group in optimizer.param_groups:
                    group["lr"] = group_lr(group, lr, cfg)
                if here.active and trainable != (now := tuple(p.requires_grad for p in model.parameters())):
                    # a method froze or freed some parameters: DDP is built again
                    step_model, trainable = distributed.data_parallel(model, device), now
                loss, out = train_step(step_model, x, y, optimizer, hooks, cfg)
                if reference_loss is None and first_loss is None:
                    first_loss = loss  # the starting model's loss (read at the next logging step)
                loss_sum += loss * len(y)
                correct += (out.argmax(1) == y).sum()
                seen += len(y)
                if i % LOG_EVERY == LOG_EVERY - 1 or i == steps - 1:
                    total_loss, total_correct, total_seen = _epoch_totals(loss_sum, correct, seen)
                    window = (total_loss - window_sum) / (total_seen - window_seen)
                    window_sum, window_seen = total_loss, total_seen
                    if reference_loss is None:  # the first step's loss, averaged over ranks: one reference
                        first = first_loss.double().clone()
                        distributed.all_reduce_mean([first])
                        start = float(first)
                        reference_loss = max(start if math.isfinite(start) else 0.0, math.log(out.shape[1]))
                    _check_divergence(window, reference_loss, epoch)
                    now = time.perf_counter()
                    step_times.append((now - window_started) / (i + 1 - reported))
                    window_started = now
                    reporter.advance(
                        i + 1 - reported,
                        loss=total_loss / total_seen,
                        acc=100.0 * total_correct / total_seen,
                        **hooks.progress(),
                    )
                    reported = i + 1
        finally:
            reporter.stop()
        train_loss = total_loss / max(total_seen, 1)
        if here.active:
            distributed.average_norm_statistics(model)
            check_ranks_agree(model, hooks, epoch)
        result = evaluate(model, val, amp=cfg.amp, reporter=reporter, description=f"eval {epoch + 1}/{cfg.epochs}")
        _check_divergence(result["loss"], reference_loss, epoch, "validation ")
        record = {
            "stage": stage,
            "epoch": epoch + 1,  # counted from 1, as every message counts them (the checkpoint keeps the index)
            "train_loss": train_loss,
            "train_acc": 100.0 * total_correct / max(total_seen, 1),
            "val_top1": result["top1"],
            "val_loss": result["loss"],
            # which split the val_ numbers are of: the --val-split hold-out, or the test split without one
            "val_set": getattr(val, "split", "test"),
            "lr": lr,
            **hooks.progress(),
            "seconds": round(time.time() - started, 2),
            "step_seconds": round(statistics.median(step_times), 5) if step_times else None,
        }
        if "top5" in result:
            record["val_top5"] = result["top5"]
        records.append(record)
        reporter.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if run_dir and here.is_main:
            metrics.append(record)
            save_checkpoint(
                run_dir / "checkpoint.pt",
                {
                    "stage": stage,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "method": json.dumps(hooks.state_dict()),
                    "rng": torch.get_rng_state(),
                    "fingerprint": fingerprint,
                    "elapsed": elapsed_before + time.time() - fit_started,
                    "reference_loss": reference_loss,
                },
            )
    return records


def _epoch_totals(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float, int]:
    """The epoch's summed loss, correct predictions and samples so far, over every rank (one host read)."""
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=loss_sum.device)])
    distributed.all_reduce_sum([totals])
    total_loss, total_correct, total_seen = totals.tolist()
    return total_loss, total_correct, int(total_seen)


def _check_divergence(loss: float, reference: float | None, epoch: int, what: str = "") -> None:
    """Stop a run whose loss is not finite or has grown past ``DIVERGENCE_FACTOR`` times its reference.

    The checkpoint of the last finished epoch (if any) stays as it was, for ``--resume``."""
    if math.isfinite(loss) and (reference is None or loss <= DIVERGENCE_FACTOR * reference):
        return
    why = (
        f"{what}loss is {loss}"
        if not math.isfinite(loss)
        else f"{what}loss {loss:.4g} is over {DIVERGENCE_FACTOR:g}x its start, {reference:.4g}"
    )
    kept = f"; checkpoint.pt keeps epoch {epoch}" if epoch > 0 else ""
    raise MpqError(f"training diverged in epoch {epoch + 1} ({why}){kept}: lower --lr and start a new run")
