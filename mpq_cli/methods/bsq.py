"""BSQ: bit-level sparsity quantization (Yang, Duan, Chen, Li; ICLR 2021).

Each quantized layer holds a scale ``s`` and continuous bit planes ``W_p^(b)``,
``W_n^(b)`` of shape ``(*weight.shape, capacity)`` (LSB first, :mod:`mpq_cli.quant.bits`),
of which the first ``n`` (the layer's precision) are active. Its weight is Eq. 2-3::

    W = s / (2^n - 1) * Round[ sum_b (W_p^(b) - W_n^(b)) * 2^b ]

with a straight-through round, so each plane receives ``2^b / (2^n - 1)`` times the
gradient of ``W_q`` (Eq. 3); the sum over bits is one contraction over the last axis.
Planes are clamped to [0, 2] after every step (Sec. 3.1). The loss adds the bit-level
group Lasso (Eq. 4) re-weighted by each layer's memory (Eq. 5)::

    alpha * sum_l (#Para_l * #Bit_l / #Para_total) * sum_b || [W_p^(b); W_n^(b)] ||_2

Every ``requant_every`` epochs and at the end the planes are re-quantized (Sec. 3.3):
the integer codes ``Round[sum_b (W_p^(b) - W_n^(b)) 2^b]`` lose their all-zero MSBs
(scale unchanged) and all-zero LSBs (scale doubled per bit), ``s' = s 2^k (2^n' - 1) /
(2^n - 1)``, and are split again by sign into 0/1 planes. The model function does not
change; precision may go from 0 to ``n + 1`` bits.

Decisions where the paper or its public code leaves room (see docs/methods/bsq.md):

- No clamp of the normalised sum to [-1, 1] (the public code clamps, which would make
  the paper's precision growth impossible); planes are capped at ``max_bits``. A layer
  that would outgrow it is rounded onto its ``max_bits`` best bits (the one case where
  a re-quantization changes the function; the report counts it).
- The [0, 2] clamp applies to bit planes only (the public code also clamps BatchNorm and
  PACT parameters). Layers with ``--fix-bits`` are clamped to [0, 1] and not
  regularised, so their precision never changes.
- Budget mode (*ours*, ``--target-bits B``): every ``controller_every`` steps the bits
  each layer would have after a re-quantization are measured and ``alpha`` is scaled by
  ``exp(controller_gain * clip((avg - B) / B, -1, 1))``. At ``project_at`` of the search
  the scheme is re-quantized, moved into ``[B - tol, B]`` by the loss-aware budget step
  (:func:`mpq_cli.budget.budget_step`) if needed, and fixed; the remaining steps train the
  planes under it without the regulariser. Without ``--target-bits`` alpha is fixed
  (the paper's open loop) and the run reports where it landed.
- Fine-tuning (``mpq finetune``): quantization-aware training of a latent FP weight
  with a straight-through round at the fixed precision and the BSQ scale, as DoReFa-Net
  trains (Sec. 3.3, App. A), without DoReFa's tanh transform so the codes stay on BSQ's
  symmetric grid.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..budget import AVERAGE_SLACK, trial
from ..errors import MpqError
from ..quant.act import PACT
from ..quant.bits import (
    bit_values,
    canonicalize_codes,
    canonicalize_rows,
    linear_plane_sum,
    plane_square_norms,
    round_to_bits,
    to_bit_planes,
)
from ..quant.primitives import fake_quantize, max_code, per_channel_max, quantize_codes, ste_round
from .base import FinalizeResult, Method, MethodConfig, Phase, WeightQuantizer, register


@dataclass
class BSQConfig(MethodConfig):
    """BSQ hyperparameters; defaults from the paper (Sec. 3, App. A) unless marked *ours*.

    Args:
        target_bits: ``None``: the paper's open loop with a fixed ``alpha``; a number
            (*ours*): budget mode, the run ends in ``[target_bits - budget_tolerance, target_bits]``.
        init_bits: precision of the initial quantization of every layer (App. A: 8).
        init_bits_by_layer: glob -> initial bits, first match wins (App. A.2, ImageNet:
            ``{"conv1": 8, "*": 6}``).
        max_bits: *ours*: bit planes kept per layer, the most a layer can grow to
            (the public code caps at 8).
        alpha: group-Lasso strength (Eq. 5; Table 1: 3e-3 ... 2e-2 over 350 epochs; short runs need more).
        requant_every: epochs between re-quantizations (App. A.1: 100 of 350; A.2: 10 of 90).
        budget_tolerance: *ours*: width of the budget window below ``target_bits``.
        budget_span: *ours*: the budget step probes each layer's options within this many bits of
            its learned bits (all of them when those cannot reach the window; 0: always all).
        controller_every: *ours*: steps between two alpha updates in budget mode.
        controller_gain: *ours*: alpha is multiplied by ``exp(gain)`` when the projected bits are above
            the target and have not fallen over the last ``controller_window`` updates, by
            ``exp(-2 gain)`` when they are below the window.
        controller_window: *ours*: updates over which a fall of the projected bits holds alpha.
        project_at: *ours*: fraction of the search after which budget mode fixes the scheme.
        scale_lr: *ours*: the scales' learning rate relative to the other parameters'. The group
            Lasso shrinks planes and a freely learning scale undoes it by growing (W = s W_q); with the
            paper's small alpha over 350 epochs this hardly matters, with the alpha a short run needs it
            diverged at lr 0.1 in our measurements. Fine-tuning keeps it too: a scale's gradient sums
            over every weight of its layer, and at full rate one run's 1-bit layer collapsed to zero.
    """

    version: int = 1
    target_bits: float | None = None
    init_bits: int = 8
    init_bits_by_layer: dict[str, int] = field(default_factory=dict)
    max_bits: int = 8
    alpha: float = 5e-3
    requant_every: float = 1.0
    budget_tolerance: float = 0.1
    budget_span: int = 2
    controller_every: int = 10
    controller_gain: float = 0.1
    controller_window: int = 5
    project_at: float = 0.75
    scale_lr: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.max_bits <= 16:
            raise MpqError(f"max_bits must be in 1..16, got {self.max_bits}")
        low = 0 if self.allow_zero_bits else 1  # a layer starting at 0 bits is all zeros: a collapse
        for bits in [self.init_bits, *self.init_bits_by_layer.values()]:
            if not low <= int(bits) <= self.max_bits:
                raise MpqError(f"initial bits {bits} must be in {low}..max_bits ({self.max_bits})")
        if self.target_bits is not None and self.target_bits > self.max_bits:
            raise MpqError(f"--target-bits {self.target_bits} exceeds BSQ's max_bits {self.max_bits}")
        if (
            min(self.alpha, self.scale_lr, self.budget_tolerance, self.budget_span) < 0
            or self.requant_every <= 0
            or min(self.controller_every, self.controller_window) < 1
        ):
            raise MpqError(
                "BSQ needs alpha, scale_lr, budget_tolerance, budget_span >= 0, "
                "requant_every > 0, controller_every >= 1"
            )
        if not 0.0 < self.project_at <= 1.0:
            raise MpqError("project_at must be in (0, 1]")

    def initial_bits(self, name: str) -> int:
        for pattern, bits in self.init_bits_by_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return int(bits)
        return self.init_bits


class BSQWeight(WeightQuantizer):
    """One layer's bit representation (Eq. 2), and the latent weight its fine-tuning trains."""

    def __init__(self, weight: torch.Tensor, bits: int, capacity: int, fixed: bool, granularity: str = "tensor"):
        super().__init__(weight.shape)
        device = weight.device
        self.capacity = capacity
        self.granularity = granularity
        self.planes_pos = nn.Parameter(torch.zeros(*weight.shape, capacity, device=device))  # W_p^(b), (*shape, cap)
        self.planes_neg = nn.Parameter(torch.zeros(*weight.shape, capacity, device=device))  # W_n^(b), (*shape, cap)
        max_abs = per_channel_max(weight, granularity)  # 0-d, or (C, 1, ..., 1): one scale per output channel
        self.scale = nn.Parameter(torch.ones_like(max_abs))  # s
        self.latent = nn.Parameter(weight.detach().clone(), requires_grad=False)  # fine-tuning's FP weight
        self.register_buffer("bit_values", bit_values(capacity, device))  # 2^b
        self.register_host_buffer("precision", int(bits), device=device)  # n
        self.register_host_buffer("fixed", bool(fixed), device=device)
        self.register_host_buffer("finetuning", False, device=device)
        self.load_codes(quantize_codes(weight.detach(), max_abs, bits), max_abs / max(max_code(bits), 1), bits)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, capacity={self.capacity}"

    @property
    def bits(self) -> int:
        return self.host("precision")

    def active(self) -> torch.Tensor:
        """``(capacity,)`` 1 for the planes below the precision, else 0."""
        return (torch.arange(self.capacity, device=self.bit_values.device) < self.precision).to(self.bit_values.dtype)

    def plane_sum(self) -> torch.Tensor:
        """``sum_b (W_p^(b) - W_n^(b)) 2^b`` over the active planes (before rounding)."""
        return linear_plane_sum(self.planes_pos, self.planes_neg, self.bit_values * self.active())

    def step(self) -> torch.Tensor:
        return self.scale / max(max_code(self.bits), 1)

    def train_weight(self) -> torch.Tensor:
        if self.host("finetuning"):
            return fake_quantize(self.latent, self.scale.abs() + 1e-12, self.bits)
        return ste_round(self.plane_sum()) * self.step()

    def exact_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.host("finetuning"):
            scale = self.scale.detach().abs() + 1e-12
            codes = quantize_codes(self.latent.detach(), scale, self.bits)
            return codes, (scale / max(max_code(self.bits), 1)).to(torch.float32)
        codes = torch.round(self.plane_sum().detach()).to(torch.int32)
        return codes, self.step().detach().to(torch.float32)

    def nominal_bits(self) -> int:
        return self.bits

    @torch.no_grad()
    def load_codes(self, codes: torch.Tensor, step: torch.Tensor, bits: int) -> None:
        """Hold exactly ``codes * step`` at ``bits`` precision: codes split by sign into 0/1 planes."""
        if bits > self.capacity or (codes.numel() and int(codes.abs().max()) > max_code(bits)):
            raise ValueError(f"codes do not fit {bits} bits of a {self.capacity}-plane layer")
        pos, neg = to_bit_planes(codes, self.capacity)
        self.planes_pos.copy_(pos.float())
        self.planes_neg.copy_(neg.float())
        self.set_host("precision", bits)
        self.scale.copy_(step.reshape(self.scale.shape) * max(max_code(bits), 1))

    @torch.no_grad()
    def clamp_planes(self) -> None:
        high = 1.0 if self.host("fixed") else 2.0
        self.planes_pos.clamp_(0.0, high).mul_(self.active())
        self.planes_neg.clamp_(0.0, high).mul_(self.active())

    @torch.no_grad()
    def requantize(self) -> dict:
        """Sec. 3.3: exact codes, drop all-zero MSBs and LSBs, re-split; the function is unchanged."""
        codes, step = self.exact_codes()
        bits_before = self.bits
        if self.host("fixed"):  # planes in [0, 1]: the codes fit the fixed precision
            self.load_codes(codes, step, bits_before)
            return {"bits_before": bits_before, "bits_after": bits_before, "rounded": False}
        if self.granularity == "channel":
            # each channel drops its own all-zero LSBs (its scale doubled per bit); the layer keeps the
            # precision its widest channel needs: with one channel, exactly the per-layer rule
            reduced, shifts, bits = canonicalize_rows(codes)
            step = step * torch.pow(2.0, shifts.to(step)).reshape(step.shape)
        else:
            reduced, shift, bits = canonicalize_codes(codes)
            step = step * 2**shift
        rounded = bits > self.capacity
        if rounded:  # would outgrow its planes: keep the best `capacity` bits
            weights = step.reshape(-1).pow(2) if self.granularity == "channel" else None
            reduced, extra = round_to_bits(reduced, self.capacity, bits, row_weights=weights)
            reduced, step, bits = reduced >> extra, step * 2**extra, self.capacity
        self.load_codes(reduced.to(torch.int32), step, bits)
        return {"bits_before": bits_before, "bits_after": bits, "rounded": rounded}

    @torch.no_grad()
    def bits_after_requantization(self) -> int:
        """The precision :meth:`requantize` would give now, computed on the layer's device."""
        if self.host("fixed"):
            return self.bits
        codes = self.exact_codes()[0].to(torch.int64)
        if self.granularity == "channel":
            return min(canonicalize_rows(codes)[2], self.capacity)
        nonzero = codes != 0
        if not bool(nonzero.any()):
            return 0
        lowest_bit = int(torch.where(nonzero, codes & -codes, torch.full_like(codes, 1 << 40)).min())
        shift = lowest_bit.bit_length() - 1
        return min((int(codes.abs().max()) >> shift).bit_length(), self.capacity)

    @torch.no_grad()
    def start_finetune(self) -> None:
        """Latent weight = the exact weight; from here on it trains (the planes do not)."""
        codes, step = self.exact_codes()
        self.latent.copy_(codes.float() * step)
        self.set_host("finetuning", True)
        self.latent.requires_grad_(True)
        self.planes_pos.requires_grad_(False)
        self.planes_neg.requires_grad_(False)

    def group_lasso(self) -> torch.Tensor:
        """Eq. 4 with one group per layer: the L2 norm of each active bit plane (both signs), summed."""
        squares = plane_square_norms(self.planes_pos, self.planes_neg)  # (cap,)
        return (torch.sqrt(squares + 1e-8) * self.active()).sum()


@register("bsq")
class BSQ(Method):
    """Bit-level group Lasso on a bit representation trained with STE, with periodic re-quantization."""

    config_class = BSQConfig
    # App. A.1: SGD, lr 0.1 (we anneal with cosine instead of one step at 5/7), momentum 0.9, weight decay 1e-4.
    training_defaults = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4, "schedule": "cosine"}
    # --recipe checkpoint: measured from the trained resnet20 reference (benchmarks/results/checkpoint_lr.md)
    checkpoint_defaults = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4, "schedule": "cosine"}
    # App. A.1: DoReFa fine-tuning from lr 0.01.
    finetune_defaults = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 1e-4, "schedule": "cosine"}

    def __init__(self, config: BSQConfig, selection=None):
        super().__init__(config, selection)
        self.alpha = config.alpha
        self._step = 0
        self._steps_per_epoch = 1
        self._total_steps = 1
        self._next_requant = 0
        self._saved_steps_per_epoch: int | None = None  # from a checkpoint, until the next epoch starts
        self._reset_optimizer = False
        self.requantizations: list[dict] = []
        self._projected_history: list[float] = []
        self.budget_changes: list[dict] = []
        self.avg_bits_before_projection: float | None = None

    @property
    def budget_mode(self) -> bool:
        return self.config.target_bits is not None

    def make_weight_quantizer(self, name, layer, fixed_bits):
        bits = self.config.initial_bits(name) if fixed_bits is None else fixed_bits
        if bits > self.config.max_bits:
            raise MpqError(f"layer {name}: {bits} bits exceed BSQ's max_bits {self.config.max_bits}")
        return BSQWeight(
            layer.weight, bits, self.config.max_bits, fixed=fixed_bits is not None, granularity=self.config.granularity
        )

    def prepare(self, model: nn.Module, loss_probe=None) -> None:
        """As every method, then the paper's activation quantization (App. A.1) when ``--act-bits`` is set:
        a fixed clip at 6 (ReLU6) for 4 bits and above, PACT below; the first and the last layer's input at 8 bits."""
        super().prepare(model, loss_probe)
        if self.config.act_bits is None:
            return
        names = list(self.layers)
        for i, name in enumerate(names):
            layer = self.layers[name]
            if i == 0:
                continue  # as set up for every method (the image at first_act_bits, clip from the data)
            bits = self.config.first_act_bits if i == len(names) - 1 else self.config.act_bits
            clip = 6.0 if bits >= 4 else None
            layer.act_quantizer = PACT(bits, clip).to(layer.weight_quantizer.scale.device)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        # App. A: weight decay on everything; frozen tensors are listed too so that the optimizer knows them when
        # fine-tuning or a resume thaws them. The scales learn at scale_lr times the rate (see BSQConfig).
        scales = {id(q.scale) for q in self.quantizers().values()}
        params = list(model.parameters())
        return [
            {"params": [p for p in params if id(p) not in scales], "weight_decay": weight_decay},
            {
                "params": [p for p in params if id(p) in scales],
                "weight_decay": weight_decay,
                "lr_scale": self.config.scale_lr,
            },
        ]

    # -- training hooks -----------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        saved, self._saved_steps_per_epoch = self._saved_steps_per_epoch, None
        if saved and saved != steps_per_epoch:  # resumed with another number of processes: steps are longer
            self._next_requant = round(self._next_requant * steps_per_epoch / saved)
        self._steps_per_epoch, self._total_steps = steps_per_epoch, epochs * steps_per_epoch
        self._step = epoch * steps_per_epoch
        if self._next_requant == 0:
            self._next_requant = self._requant_interval()

    def _requant_interval(self) -> int:
        return max(1, round(self.config.requant_every * self._steps_per_epoch))

    def regularizer(self) -> torch.Tensor | None:
        if self.phase is not Phase.SEARCH or self.alpha == 0:
            return None
        total = sum(layer.params for layer in self.layers.values())
        terms = [
            q.group_lasso() * (self.layers[n].params * q.bits / total)
            for n, q in self.quantizers().items()
            if not q.host("fixed") and q.bits > 0
        ]
        return self.alpha * torch.stack(terms).sum() if terms else None

    def on_step_end(self) -> None:
        self._step += 1
        if self.phase is Phase.FINETUNE and all(q.host("finetuning") for q in self.quantizers().values()):
            return
        for q in self.quantizers().values():
            q.clamp_planes()
        if self.phase is Phase.SEARCH and self.budget_mode:
            if self._step % self.config.controller_every == 0:
                self._update_alpha()
            if self._step >= self.config.project_at * self._total_steps:
                self.project()
                return
        if self._step >= self._next_requant and self._step < self._total_steps:
            self.requantize_all()
            self._next_requant = self._step + self._requant_interval()

    def wants_optimizer_reset(self) -> bool:
        reset, self._reset_optimizer = self._reset_optimizer, False
        return reset

    def progress(self) -> dict[str, float]:
        return {"avg_bits": self.average_bits(), "alpha": self.alpha}

    # -- re-quantization, budget controller, projection -------------------------------------------------
    def requantize_all(self) -> None:
        """Sec. 3.3 for every layer; momentum is reset afterwards (as the public code recreates its optimizer)."""
        changes = {name: q.requantize() for name, q in self.quantizers().items()}
        self.requantizations.append(
            {
                "step": self._step,
                "avg_bits": self.average_bits(),
                "rounded_layers": [n for n, c in changes.items() if c["rounded"]],
                "bits": {n: c["bits_after"] for n, c in changes.items()},
            }
        )
        self._reset_optimizer = True

    def _projected_average_bits(self) -> float:
        total = sum(layer.params for layer in self.layers.values())
        return sum(q.bits_after_requantization() * self.layers[n].params for n, q in self.quantizers().items()) / total

    def _update_alpha(self) -> None:
        """Raise alpha while the projected bits sit above the target and stopped falling; lower it below.

        Bits answer alpha with a lag (planes shrink before a bit of the codes clears), so
        alpha is held while the projected average is still falling: growing it then would
        overshoot and crush the weights.
        """
        target, tol, gain = self.search_target(), self.config.budget_tolerance, self.config.controller_gain
        projected = self._projected_average_bits()
        if projected > target + AVERAGE_SLACK:
            if not (self._projected_history and projected < max(self._projected_history)):
                self.alpha *= math.exp(gain)
        elif projected < target - tol - AVERAGE_SLACK:
            self.alpha *= math.exp(-2 * gain)
        self._projected_history = [*self._projected_history, projected][-self.config.controller_window :]

    def project(self) -> None:
        """Budget mode: re-quantize, move into the window, fix every layer's precision."""
        self.requantize_all()
        self.avg_bits_before_projection = self.average_bits()
        self.budget_changes = self._meet_budget()
        for q in self.quantizers().values():
            q.set_host("fixed", True)
        self.phase = Phase.FINETUNE
        self._reset_optimizer = True

    @torch.no_grad()
    def _meet_budget(self) -> list[dict]:
        """Move the scheme into the window at the least measured loss: per layer, its continuous plane
        sum rounded onto each number of bits it really uses (:func:`mpq_cli.budget.budget_step`)."""

        def relaxed_codes(q: BSQWeight, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
            """The layer's continuous plane sum rounded onto ``bits`` bits of the finest lattice (step / 2^e)."""
            extra = self.config.max_bits - q.bits
            fine = torch.round(q.plane_sum().detach() * 2**extra).to(torch.int64)
            weights = q.step().detach().reshape(-1).pow(2) if q.granularity == "channel" else None
            rounded, shift = round_to_bits(fine, bits, self.config.max_bits, row_weights=weights)
            return (rounded >> shift).to(torch.int32), q.step().detach() * 2.0 ** (shift - extra)

        def apply(name: str, bits: int):
            q = self.layers[name].weight_quantizer
            return trial(q, lambda: q.load_codes(*relaxed_codes(q, bits), bits))

        quantizers = self.quantizers()
        # an option must use its bits: codes that fit fewer would only pad the nominal count
        candidates = {
            n: [
                b
                for b in range(self.config.max_bits + 1)
                if b == 0 or canonicalize_codes(relaxed_codes(q, b)[0])[2] == b
            ]
            for n, q in quantizers.items()
            if not q.host("fixed")
        }
        return self._budget_step({n: q.bits for n, q in quantizers.items()}, candidates, apply)

    # -- end of search, fine-tuning ------------------------------------------------------------------
    def finalize(self) -> FinalizeResult:
        """The final re-quantization (Sec. 3.3); in budget mode the window is guaranteed."""
        info: dict = {"alpha_final": self.alpha}
        if self.phase is Phase.SEARCH:
            self.requantize_all()
            if self.budget_mode:
                self.avg_bits_before_projection = self.average_bits()
                self.budget_changes = self._meet_budget()
        elif self.phase is Phase.FINETUNE and not any(q.host("finetuning") for q in self.quantizers().values()):
            self.requantize_all()  # planes trained under a fixed scheme: binarise them
        self.phase = Phase.FINAL
        after = self.average_bits()
        info["rounded_layers"] = sorted({n for r in self.requantizations for n in r["rounded_layers"]})
        info["zero_layers"] = [n for n, q in self.quantizers().items() if q.bits == 0]
        if not self.budget_mode:
            return FinalizeResult(facts=info)
        target = self.config.target_bits
        before = self.avg_bits_before_projection
        return FinalizeResult(
            budget_met=self.budget_average()
            <= target + AVERAGE_SLACK,  # a ceiling; the step aims for the window under it
            avg_bits_before_budget_step=before if before is not None else after,
            budget_changes=self.budget_changes,
            facts=info,
        )

    def start_finetune(self) -> None:
        for q in self.quantizers().values():
            q.start_finetune()
        self.phase = Phase.FINETUNE
        self.budget_changes, self.avg_bits_before_projection = [], None
        self._reset_optimizer = True

    def state_dict(self) -> dict:
        return {
            "phase": self.phase.value,
            "alpha": self.alpha,
            "step": self._step,
            "projected_history": self._projected_history,
            "next_requant": self._next_requant,
            "steps_per_epoch": self._steps_per_epoch,
            "requantizations": self.requantizations,
            "budget_changes": self.budget_changes,
            "avg_bits_before_projection": self.avg_bits_before_projection,
        }

    def load_state_dict(self, state: dict) -> None:
        self.phase = Phase(state["phase"])
        self.alpha = float(state.get("alpha", self.config.alpha))
        self._step = int(state.get("step", 0))
        self._next_requant = int(state.get("next_requant", 0))
        self._saved_steps_per_epoch = state.get("steps_per_epoch")
        self._projected_history = list(state.get("projected_history", []))
        self.requantizations = state.get("requantizations", [])
        self.budget_changes = state.get("budget_changes", [])
        self.avg_bits_before_projection = state.get("avg_bits_before_projection")
        for q in self.quantizers().values():
            finetuning = q.host("finetuning")
            q.latent.requires_grad_(finetuning)
            q.planes_pos.requires_grad_(not finetuning)
            q.planes_neg.requires_grad_(not finetuning)
