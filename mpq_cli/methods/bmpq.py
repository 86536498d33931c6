"""BMPQ: bit-gradient sensitivity-driven mixed-precision quantization (Kundu et al., DATE 2022).

Quantization-aware training from scratch (or from a checkpoint) in which every layer
holds an FP32 latent weight ``W`` and computes with its ``q``-bit symmetric
fixed-point version (Eq. 3-4), through a straight-through estimator::

    S = max|W| / (2^(q-1) - 1),   W^q = round(W / S) * S

or, at ``q = 2``, the ternary weights of TWN (Li et al. 2016: threshold ``0.7 mean|W|``,
scale the mean magnitude above it), as the paper does. ``q`` is the two's complement
width, sign included, which is how BMPQ counts bits: codes lie in
``[-(2^(q-1) - 1), 2^(q-1) - 1]`` and the packed file stores exactly ``q`` bits per
weight. (The grid is the one a sign-magnitude method reaches with ``q - 1`` magnitude
bits; compare methods at equal *stored* bits.)

The first ``warmup_epochs`` train every free layer at the largest support width.
Then every ``interval`` epochs the widths are re-assigned by the integer program of
Eq. 8-9 (:func:`mpq_cli.budget.assign_bits`, SciPy's ``milp``): maximise
``sum_l ENBG_l * q_l`` subject to ``sum_l params_l * q_l <= C``, where ``C`` comes from
``--target-bits`` (``C = target * total params``) or ``budget_bytes``. ENBG, the
epoch-normalised bit gradient, is the mean over the interval's epochs of each epoch's
mean NBG; NBG (Eq. 5-7) is the mean over a layer's weights of the summed magnitudes of
the loss gradients with respect to the ``q_max`` two's complement bits. Because
``dW^q / db_i = S 2^i`` (``-S 2^(q-1)`` for the sign bit), it is
``(2^q_max - 1) S_qmax mean|dL/dW^q|``, read from the gradient the training step
already computes (a tensor hook; no extra backward pass, no host sync per step).

Activations are quantized with PACT at the bits of the layer that reads them, the
last layer's input stays FP (the paper's ReLU), first and last layers sit at
``edge_bits`` (16) outside the integer program, or at the shared ``--edge-bits`` when given.

Decisions where the paper leaves room (BMPQ has no public code; docs/methods/bmpq.md):

- NBG uses the scale of the ``q_max`` representation for every layer, whatever its
  current width, so that a layer's sensitivity is not inflated by the coarser step
  of a low width it already has (the paper sizes the bit-gradient matrix by ``q_max``
  and leaves ``S`` unspecified).
- The objective weights bits, not an assignment index, so with more than two
  support widths the value of going up a width grows with the width.
- Layers that read the same tensor (a ResNet block's first conv and its downsample
  conv) are tied to one width: the tensor is quantized once at that width. Ties are
  found on the first training batch by tracing; ``ties`` adds the user's own.
- "First and last layers" are the model's first and last Conv2d/Linear in module order.
- The schedule is in epochs; by default the interval is a tenth of the search (the
  paper: 20 of 200 epochs) and the warm-up one interval. The last assignment is the
  scheme: the final epochs train under it, as the paper's intervals do. A one-epoch
  run (its default warm-up is the whole epoch) keeps those proportions in steps: an
  assignment at the end of each of its first nine tenths (*ours*; assigned at its end,
  untrained, MobileNetV2 fell to 12 %).
  A run too short for the schedule the user set is assigned at its end (the report says so).
- The memory budget counts weight bits as Eq. 11 does (params x bits, every
  quantized layer including the 16-bit edges); steps and other tensors are not in
  it, and the export report measures them.
- Cosine learning-rate annealing instead of the paper's steps at 40 % and 70 %;
  weight decay 5e-4 (the paper does not say).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..budget import AVERAGE_SLACK, assign_bits
from ..errors import MpqError
from ..layers import quantizable_layers
from ..quant.act import PACT
from ..quant.primitives import max_code, quantize_codes, step_rows
from ..scheme import BITS_CONVENTIONS
from .base import FinalizeResult, Method, MethodConfig, Phase, WeightQuantizer, register

MAX_WIDTH = 16  # two's complement widths up to 16 bits fit the packed format's code range


# -- pure functions: the quantizers and the bit gradients -------------------------------------------------
def _channel_rows(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """The weight as rows that share a step: ``(1, N)`` per tensor, ``(C, N / C)`` per output channel."""
    return weight.reshape(step_rows(weight, granularity), -1)


def _step_shaped(values: torch.Tensor, weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """Per-row values as a step: 0-d per tensor, ``(C, 1, ..., 1)`` per channel."""
    if granularity == "tensor":
        return values.reshape(())
    return values.reshape(weight.shape[0], *([1] * (weight.dim() - 1)))


def fixed_point_codes(
    weight: torch.Tensor, bits: int, granularity: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3-4: ``(codes, step)`` of a ``bits``-bit two's complement symmetric quantization.

    ``step = max|W| / (2^(bits-1) - 1)`` over the layer, or over each output channel (``granularity``
    ``channel``: Eq. 3's ``S`` per channel); codes are ``round(W / step)`` (int32).
    """
    if bits < 2:
        raise ValueError(f"a two's complement width must be >= 2, got {bits}")
    rows = _channel_rows(weight.detach(), granularity)
    max_abs = _step_shaped(rows.abs().amax(1), weight, granularity)
    levels = max_code(bits - 1)
    codes = quantize_codes(weight.detach(), max_abs.clamp(min=torch.finfo(torch.float32).tiny), bits - 1)
    return codes, (max_abs / levels).to(torch.float32)


def ternary_codes(weight: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """TWN (Li et al. 2016): codes in {-1, 0, 1} beyond ``0.7 mean|W|``, step the mean magnitude there
    (over the layer, or per output channel with ``granularity`` ``channel``)."""
    magnitude = _channel_rows(weight.detach().abs(), granularity)
    keep = magnitude > 0.7 * magnitude.mean(1, keepdim=True)
    step = _step_shaped((magnitude * keep).sum(1) / keep.sum(1).clamp(min=1), weight, granularity)
    codes = (torch.sign(weight.detach()) * keep.reshape(weight.shape)).to(torch.int32)
    return codes, step.to(torch.float32)


def place_values(bits: int, device=None) -> torch.Tensor:
    """``dw / db_i`` of Eq. 5 in units of the step, LSB first: ``1, 2, ..., 2^(bits-2), -2^(bits-1)``."""
    values = 2.0 ** torch.arange(bits, dtype=torch.float32, device=device)
    values[-1] = -values[-1]
    return values


def bit_gradients(grad_wq: torch.Tensor, step: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Eq. 6-7: the ``(d, bits)`` matrix of ``dL/db_i = dL/dW^q * dW^q/db_i``, LSB first."""
    return grad_wq.reshape(-1, 1) * step * place_values(bits, grad_wq.device)


def normalized_bit_gradient(
    grad_wq: torch.Tensor, weight: torch.Tensor, q_max: int, granularity: str = "tensor"
) -> torch.Tensor:
    """NBG of one step: row sums of ``|bit_gradients|`` at ``q_max`` bits, averaged over the weights.

    Closed form of ``bit_gradients(grad, S, q_max).abs().sum(1).mean()`` with
    ``S = max|W| / (2^(q_max-1) - 1)`` (each weight's own channel's ``S`` per channel):
    ``sum_i |2^i| = 2^q_max - 1`` factors out.
    """
    if granularity == "tensor":
        step = weight.detach().abs().max() / max_code(q_max - 1)
        return grad_wq.detach().abs().mean() * step * max_code(q_max)
    rows = _channel_rows(weight.detach(), granularity)
    steps = rows.abs().amax(1, keepdim=True) / max_code(q_max - 1)  # (C, 1)
    return (_channel_rows(grad_wq.detach().abs(), granularity) * steps).mean() * max_code(q_max)


# -- configuration ----------------------------------------------------------------------------------
@dataclass
class BMPQConfig(MethodConfig):
    """BMPQ hyperparameters; defaults from the paper (Sec. III-IV) unless marked *ours*.

    Args:
        target_bits: average two's complement bits per weight (sign included), weighted by
            parameters, over every quantized layer including the edges; the memory budget
            ``C``. Default 3 unless ``budget_bytes`` is given.
        budget_bytes: the budget as bytes of weight codes (``sum params * bits / 8``) instead.
        bits: support bit widths ``S_q`` (paper: 2 and 4).
        edge_bits: bits of the first and last layer, outside the integer program (paper: 16), unless the
            layer selection's ``--edge-bits N`` (every method's option) is given: it replaces this field, so
            on the command line ``--edge-bits`` sets it and ``--set edge_bits=VALUE`` reaches the field;
            ``None`` puts them in the program like every other layer.
        warmup_epochs: epochs at the largest support width before the first assignment
            (``None``, *ours*: one interval).
        interval: epochs between assignments (paper: 20 of 200; ``None``, *ours*: a tenth of the
            search, at least 1).
        ternary: 2-bit layers use ternary weights (TWN), as the paper does.
        act_follow_weights: quantize each layer's input at its weight bits with PACT (the
            last layer's input stays FP); ``--act-bits N`` sets a fixed width instead.
        tie_shared_inputs: *ours*: layers reading the same tensor share one width.
        ties: extra tie groups, each a glob or a list of globs (``["layer1.*", ["fc1", "fc2"]]``).
    """

    # 2: under --budget-on stored the budget also pays for what the file stores besides the codes (version 1
    # counted the codes alone, so steps per output channel went over a stored-bits ceiling)
    version: int = 2
    target_bits: float | None = None
    budget_bytes: float | None = None
    bits: list[int] = field(default_factory=lambda: [2, 4])
    edge_bits: int | None = 16
    warmup_epochs: int | None = None
    interval: int | None = None
    ternary: bool = True
    act_follow_weights: bool = True
    tie_shared_inputs: bool = True
    ties: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.target_bits is not None and self.budget_bytes is not None:
            raise MpqError("give BMPQ --target-bits or --budget-bytes, not both")
        if self.target_bits is None and self.budget_bytes is None:
            self.target_bits = 3.0
        super().__post_init__()
        if self.budget_bytes is not None and not self.budget_bytes > 0:
            raise MpqError(f"--budget-bytes must be positive, got {self.budget_bytes}")
        if isinstance(self.bits, str):
            try:
                self.bits = [int(b) for b in self.bits.replace(" ", "").split(",") if b]
            except ValueError:
                raise MpqError(f"--bits expects widths like 2,4, got {self.bits!r}") from None
        if isinstance(self.bits, int):
            self.bits = [self.bits]
        self.bits = sorted({int(b) for b in self.bits})
        if not self.bits or not all(2 <= b <= MAX_WIDTH for b in self.bits):
            raise MpqError(f"BMPQ support widths (--bits) must be in 2..{MAX_WIDTH}, got {self.bits}")
        if self.edge_bits is not None and not 2 <= int(self.edge_bits) <= MAX_WIDTH:
            raise MpqError(f"--edge-bits must be in 2..{MAX_WIDTH}, got {self.edge_bits}")
        if self.warmup_epochs is not None and int(self.warmup_epochs) < 1:
            raise MpqError("BMPQ needs --warmup-epochs >= 1: the first assignment needs sensitivities")
        if self.interval is not None and int(self.interval) < 1:
            raise MpqError(f"--interval must be >= 1 epoch, got {self.interval}")
        if isinstance(self.ties, str):
            self.ties = [self.ties]
        if not all(
            isinstance(t, str) or (isinstance(t, list) and all(isinstance(p, str) for p in t)) for t in self.ties
        ):
            raise MpqError('BMPQ ties must be globs or lists of globs, e.g. \'["layer1.*", ["fc1", "fc2"]]\'')


# -- the weight quantizer -----------------------------------------------------------------------------
class BMPQWeight(WeightQuantizer):
    """An FP32 latent weight computing at ``bits`` bits (Eq. 3-4, ternary at 2), with NBG recording."""

    def __init__(self, weight: torch.Tensor, bits: int, q_max: int, ternary: bool, granularity: str = "tensor"):
        super().__init__(weight.shape)
        self.weight = nn.Parameter(weight.detach().clone())
        self.q_max = q_max
        self.ternary = ternary
        self.granularity = granularity
        self.register_host_buffer("width", int(bits), device=weight.device)
        # sums of the per-step NBG and the number of steps, since the last epoch boundary
        self.register_buffer("nbg_sum", torch.zeros((), dtype=torch.float64, device=weight.device))
        self.register_buffer("nbg_steps", torch.zeros((), dtype=torch.int64, device=weight.device))
        self.recording = True

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ternary={self.ternary and self.bits == 2}"

    @property
    def bits(self) -> int:
        return self.host("width")

    def set_bits(self, bits: int) -> None:
        self.set_host("width", int(bits))

    def codes_and_step(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bits == 2 and self.ternary:
            return ternary_codes(weight, self.granularity)
        return fixed_point_codes(weight, self.bits, self.granularity)

    def train_weight(self) -> torch.Tensor:
        codes, step = self.codes_and_step(self.weight)
        quantized = self.weight + (codes.to(self.weight.dtype) * step - self.weight).detach()  # STE
        if self.recording and quantized.requires_grad:
            quantized.register_hook(self._record_bit_gradient)
        return quantized

    def _record_bit_gradient(self, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self.nbg_sum += normalized_bit_gradient(grad, self.weight, self.q_max, self.granularity).to(torch.float64)
            self.nbg_steps += 1

    def take_epoch_nbg(self) -> float | None:
        """The mean NBG of the steps since the last call (``None`` if none), and reset."""
        steps = int(self.nbg_steps)
        value = float(self.nbg_sum) / steps if steps else None
        self.nbg_sum.zero_()
        self.nbg_steps.zero_()
        return value

    def exact_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes_and_step(self.weight)

    def nominal_bits(self) -> int:
        return self.bits


# -- the method -----------------------------------------------------------------------------------
@register("bmpq")
class BMPQ(Method):
    """Bit-gradient sensitivity (ENBG) and an integer program re-assign widths during QAT from scratch."""

    config_class = BMPQConfig
    bits_convention = BITS_CONVENTIONS["bmpq"]
    # Sec. IV-A: SGD from lr 0.1 (cosine here instead of steps at 80 and 140 of 200), batch 128.
    training_defaults = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine"}
    # --recipe checkpoint: measured from the trained resnet20 reference (benchmarks/results/checkpoint_lr.md)
    checkpoint_defaults = {"optimizer": "sgd", "lr": 0.003, "weight_decay": 5e-4, "schedule": "cosine"}
    # and weights only: the paper's PACT inputs at each layer's weight bits (a from-scratch recipe) held a one-epoch
    # search from the resnet20 reference at 66.84 % hold-out against 85.86 weights only (docs/methods/bmpq.md)
    checkpoint_fields = {"act_follow_weights": False}
    finetune_defaults = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4, "schedule": "cosine"}

    def __init__(self, config: BMPQConfig, selection=None):
        super().__init__(config, selection)
        self.edges: set[str] = set()
        self.last_layer: str | None = None
        self.user_ties: list[list[str]] = []
        self.traced_ties: list[list[str]] | None = None
        self.history: list[dict] = []  # one record per assignment (and one for the end of the search)
        self.epoch_nbgs: dict[str, list[float]] = {}  # per layer, the epoch NBGs since the last assignment
        self.last_assigned_epoch = -1
        self.assigned_at_end = False
        self._epochs = 0
        self._steps_per_epoch = 1
        self._trace: tuple[list, list] | None = None
        # a search too short for the epoch schedule assigns every tenth of its steps instead (on_step_end)
        self._step = 0
        self._assign_steps: set[int] = set()

    # -- building ----------------------------------------------------------------------------
    def make_weight_quantizer(self, name, layer, fixed_bits):
        if fixed_bits is not None:
            if not 2 <= fixed_bits <= MAX_WIDTH:
                raise MpqError(f"--fix-bits {name}={fixed_bits}: BMPQ widths are two's complement, 2..{MAX_WIDTH}")
            bits = fixed_bits
        elif name in self.edges:
            bits = int(self.config.edge_bits)
        else:
            bits = max(self.config.bits)
        return BMPQWeight(layer.weight, bits, max(self.config.bits), self.config.ternary, self.config.granularity)

    def prepare(self, model: nn.Module, loss_probe=None) -> None:
        """Wrap the layers (edges at ``edge_bits``, the rest at the largest width) and quantize activations."""
        everything = list(quantizable_layers(model))
        if self.selection.edge_bits is not None:
            # the shared --edge-bits replaces edge_bits: the selection fixes the same two layers (fixed_widths)
            if not 2 <= self.selection.edge_bits <= MAX_WIDTH:
                raise MpqError(
                    f"--edge-bits {self.selection.edge_bits}: BMPQ widths are two's complement, 2..{MAX_WIDTH}"
                )
        elif everything and self.config.edge_bits is not None:
            self.edges = {everything[0], everything[-1]} - {n for n in everything if self.selection.is_fp(n)}
        self.last_layer = everything[-1] if everything else None
        super().prepare(model, loss_probe)
        self.user_ties = self._resolve_user_ties()
        if self.config.act_bits is None and self.config.act_follow_weights:
            for name, layer in self.layers.items():
                if name != self.last_layer:  # the last layer reads a plain ReLU output (Sec. III-D)
                    q = layer.weight_quantizer
                    layer.act_quantizer = PACT(q.bits).to(q.weight.device)
        self.epoch_nbgs = {name: [] for name in self.layers}
        self._check_budget()

    def _resolve_user_ties(self) -> list[list[str]]:
        groups = []
        for entry in self.config.ties:
            patterns = [entry] if isinstance(entry, str) else list(entry)
            for p in patterns:
                if not any(fnmatch.fnmatchcase(n, p) for n in self.layers):
                    raise MpqError(f"BMPQ tie pattern {p!r} matches no quantized layer")
            groups.append([n for n in self.layers if any(fnmatch.fnmatchcase(n, p) for p in patterns)])
        return groups

    @property
    def params(self) -> dict[str, int]:
        return {name: layer.params for name, layer in self.layers.items()}

    @property
    def budget_bits(self) -> float:
        """``C`` of Eq. 9 in bits of weight codes. Under ``--budget-on stored`` the ceiling is on what the file
        stores, so each layer's other stored bits come off it first: its float32 steps (one, or one per output
        channel) and up to 7 bits of byte padding. The program's widths then keep the file's stored bits under
        the ceiling whatever the codes turn out to be (a layer's codes never need more than its width)."""
        if self.config.budget_bytes is not None:
            budget = 8.0 * self.config.budget_bytes
        else:
            budget = self.config.target_bits * sum(self.params.values())
        if self.config.budget_on == "stored":
            budget -= sum(self._stored_overhead_bits(name) for name in self.layers)
        return budget

    def _stored_overhead_bits(self, name: str) -> int:
        steps = self.layers[name].weight_quantizer.shape[0] if self.config.granularity == "channel" else 1
        return 32 * steps + 7

    def fixed_widths(self) -> dict[str, int]:
        """Layers outside the integer program: the edges and ``--fix-bits``."""
        return {
            n: q.bits
            for n, q in self.quantizers().items()
            if n in self.edges or self.selection.fixed_bits(n) is not None
        }

    def ties(self) -> list[list[str]]:
        return [*(self.traced_ties or []), *self.user_ties]

    def _check_budget(self) -> None:
        """An infeasible budget is an error before any training, not after the warm-up."""
        assign_bits({}, self.params, self.config.bits, self.budget_bits, self.fixed_widths(), self.user_ties)

    # -- training hooks ---------------------------------------------------------------------------
    def _resolve_schedule(self, epochs: int) -> tuple[int, int]:
        interval = int(self.config.interval) if self.config.interval is not None else max(1, round(epochs / 10))
        warmup = int(self.config.warmup_epochs) if self.config.warmup_epochs is not None else interval
        return warmup, interval

    def on_epoch_start(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        self._epochs = epochs
        if self.phase is not Phase.SEARCH:
            return
        self._close_epoch()
        if self.config.tie_shared_inputs and self.traced_ties is None and self._trace is None:
            self._start_tie_trace()
        warmup, interval = self._resolve_schedule(epochs)
        if epoch >= warmup and (epoch - warmup) % interval == 0 and epoch > self.last_assigned_epoch:
            self.assign(epoch)
        # *ours*: the paper's schedule in epochs (warm-up and interval a tenth of 200) gives a run of fewer epochs
        # than its warm-up no assignment while it trains, so its scheme would be assigned at the end, untrained
        # (MobileNetV2, one epoch from a trained reference: 12 % top-1). Such a run keeps the paper's proportions
        # in steps: an assignment at every tenth of its steps, each from the NBG of the tenth before it.
        schedule_unset = self.config.interval is None and self.config.warmup_epochs is None
        total = epochs * steps_per_epoch
        # the k-th tenth's end, k = 1..9: the last one leaves a tenth of the run to train under the scheme
        in_epoch = schedule_unset and warmup >= epochs
        self._assign_steps = {round(k * total / 10) for k in range(1, 10)} - {0, total} if in_epoch else set()
        self._steps_per_epoch = steps_per_epoch
        self._step = epoch * steps_per_epoch

    def on_step_end(self) -> None:
        if self._trace is not None:
            self._finish_tie_trace()
        if self.phase is not Phase.SEARCH or not self._assign_steps:
            return
        self._step += 1
        if self._step in self._assign_steps:
            self._close_epoch()  # the NBG window since the last assignment
            self.assign(round(self._step / self._steps_per_epoch, 3))  # "epoch": the epochs trained so far

    def _close_epoch(self) -> None:
        # each rank recorded the bit gradients of its own batches: ENBG is their mean over every rank's steps
        quantizers = list(self.quantizers().values())
        distributed.all_reduce_sum([q.nbg_sum for q in quantizers])
        distributed.all_reduce_sum([q.nbg_steps for q in quantizers])
        for name, q in self.quantizers().items():
            value = q.take_epoch_nbg()
            if value is not None:
                self.epoch_nbgs.setdefault(name, []).append(value)

    def _start_tie_trace(self) -> None:
        """Record which layers receive the same input object in the next training forward pass."""
        seen: list[tuple[str, torch.Tensor]] = []  # the tensors are held so that no id is reused meanwhile

        def hook(name):
            def record(module, args):
                if module.training and args:
                    seen.append((name, args[0]))

            return record

        handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in self.layers.items()]
        self._trace = (handles, seen)

    def _finish_tie_trace(self) -> None:
        handles, seen = self._trace
        for h in handles:
            h.remove()
        self._trace = None
        by_input: dict[int, list[str]] = {}
        for name, tensor in seen:
            by_input.setdefault(id(tensor), [])
            if name not in by_input[id(tensor)]:
                by_input[id(tensor)].append(name)
        self.traced_ties = [names for names in by_input.values() if len(names) > 1]

    def enbg(self) -> dict[str, float]:
        """ENBG per layer: the mean of the epoch NBGs collected since the last assignment (0 if none)."""
        return {
            n: (sum(v) / len(v) if v else 0.0)
            for n, v in ((name, self.epoch_nbgs.get(name, [])) for name in self.layers)
        }

    @torch.no_grad()
    def assign(self, epoch: int | float | None) -> dict[str, int]:
        """Solve Eq. 8-9 with the current ENBG and apply the widths (weights and activations)."""
        sensitivity = self.enbg()
        widths = assign_bits(
            sensitivity, self.params, self.config.bits, self.budget_bits, self.fixed_widths(), self.ties()
        )
        before = self.layer_bits()
        for name, bits in widths.items():
            self._set_layer_bits(name, bits)
        self.history.append(
            {
                "epoch": epoch,
                "enbg": sensitivity,
                "bits_before": before,
                "bits": widths,
                "avg_bits": self.average_bits(),
                "epochs_measured": {n: len(v) for n, v in self.epoch_nbgs.items()},
            }
        )
        self.epoch_nbgs = {name: [] for name in self.layers}
        if isinstance(epoch, int):  # the epoch schedule's; an in-epoch assignment's is a fraction, for the report
            self.last_assigned_epoch = epoch
        return widths

    def _set_layer_bits(self, name: str, bits: int) -> None:
        layer = self.layers[name]
        layer.weight_quantizer.set_bits(bits)
        if isinstance(layer.act_quantizer, PACT) and self.config.act_bits is None:
            layer.act_quantizer.bits = bits

    # -- end of search, fine-tuning ---------------------------------------------------------------
    def finalize(self) -> FinalizeResult:
        if self.phase is Phase.SEARCH:
            self._close_epoch()
            if self._trace is not None:
                self._finish_tie_trace()
            if not any(h["epoch"] is not None for h in self.history) or self._weight_bits() > self.budget_bits * (
                1 + 1e-12
            ):
                self.assign(None)  # too short for an assignment during training: assign now, untrained
                self.assigned_at_end = True
            else:  # the last interval's sensitivities, for the report; the scheme stays
                self.history.append(
                    {
                        "epoch": "end",
                        "enbg": self.enbg(),
                        "bits_before": self.layer_bits(),
                        "bits": self.layer_bits(),
                        "avg_bits": self.average_bits(),
                        "epochs_measured": {n: len(v) for n, v in self.epoch_nbgs.items()},
                    }
                )
        for q in self.quantizers().values():
            q.recording = False
        self.phase = Phase.FINAL
        total = sum(self.params.values())
        met = self._weight_bits() <= self.budget_bits
        if self.config.budget_on == "stored" and self.config.target_bits is not None:  # and as the file measures it
            met = met and self.budget_average() <= self.config.target_bits + AVERAGE_SLACK
        return FinalizeResult(
            budget_met=met,
            facts={
                "budget_bits": self.budget_bits,
                "budget_avg_bits": self.budget_bits / total,
                "weight_bits": self._weight_bits(),
                "assignments": sum(1 for h in self.history if h["epoch"] != "end"),
                "assigned_at_end": self.assigned_at_end,
            },
        )

    def _weight_bits(self) -> int:
        return sum(self.layers[n].params * b for n, b in self.layer_bits().items())

    def start_finetune(self) -> None:
        for q in self.quantizers().values():
            q.recording = False
        self.phase = Phase.FINETUNE

    def report_notes(self) -> list[str]:
        """Per assignment, each layer's ENBG and the width it got (markdown)."""
        if not self.history:
            return []
        columns = list(self.history)
        header = ["layer", "params", *[self._column_title(h) for h in columns]]
        lines = [
            "## BMPQ assignments",
            "",
            "ENBG (x1e3) and the width each assignment gave (two's complement bits, sign included); "
            "`fixed` layers are outside the integer program. Budget: "
            f"{self.budget_bits / sum(self.params.values()):.4f} average bits "
            f"({self.budget_bits / 8:,.0f} bytes of weight codes).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        fixed = self.fixed_widths()
        for name in self.layers:
            cells = [f"`{name}`" + (" (fixed)" if name in fixed else ""), f"{self.layers[name].params:,}"]
            for h in columns:
                value = h["enbg"].get(name, 0.0)
                cells.append(f"{value * 1e3:.4g} / {h['bits'][name]}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("| average bits | | " + " | ".join(f"{h['avg_bits']:.4f}" for h in columns) + " |")
        ties = [t for t in self.ties() if len(t) > 1]
        if ties:
            lines += ["", "Tied (one width each): " + "; ".join(", ".join(f"`{n}`" for n in t) for t in ties) + "."]
        if self.assigned_at_end:
            lines += [
                "",
                "The search was too short for an assignment during training (warm-up "
                "plus one interval): the widths were assigned at its end and never trained under.",
            ]
        return ["\n".join(lines)]

    @staticmethod
    def _column_title(record: dict) -> str:
        if record["epoch"] == "end":
            return "end of search (not re-assigned)"
        if record["epoch"] is None:
            return "at the end"
        if isinstance(record["epoch"], float):  # an in-epoch assignment of a short search
            return f"after {record['epoch']:g} epochs"
        return f"epoch {record['epoch']}"

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "phase": self.phase.value,
            "history": self.history,
            "epoch_nbgs": self.epoch_nbgs,
            "traced_ties": self.traced_ties,
            "last_assigned_epoch": self.last_assigned_epoch,
            "assigned_at_end": self.assigned_at_end,
        }

    def load_state_dict(self, state: dict) -> None:
        self.phase = Phase(state["phase"])
        self.history = state.get("history", [])
        self.epoch_nbgs = {name: list(state.get("epoch_nbgs", {}).get(name, [])) for name in self.layers}
        self.traced_ties = state.get("traced_ties")
        self.last_assigned_epoch = int(state.get("last_assigned_epoch", -1))
        self.assigned_at_end = bool(state.get("assigned_at_end", False))
        for layer in self.layers.values():
            q = layer.weight_quantizer
            q.recording = self.phase is Phase.SEARCH
            if isinstance(layer.act_quantizer, PACT) and self.config.act_bits is None:
                layer.act_quantizer.bits = q.bits


__all__ = [
    "BMPQ",
    "BMPQConfig",
    "BMPQWeight",
    "bit_gradients",
    "fixed_point_codes",
    "normalized_bit_gradient",
    "place_values",
    "ternary_codes",
]
