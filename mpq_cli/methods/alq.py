"""ALQ: adaptive loss-aware quantization into multi-bit binary bases (Qu et al., CVPR 2020).

Every quantized layer is split into groups (rows of the permuted weight,
:mod:`mpq_cli.quant.basis`); group ``g`` holds ``I_g`` sign bases and coordinates and its
weights are ``w_g = B_g alpha_g``. There is no full-precision shadow weight and no
straight-through estimator: the model computes with ``w_g`` itself and the loss
gradient with respect to it drives three steps, each an AMSGrad quadratic model
``g^T dw + dw^T H dw / 2`` with ``H = sqrt(v_hat)`` (Sec. 3.1):

- initialisation by structured sketching (Alg. 1): greedy sign bases with
  least-squares coordinates until the relative residual is below ``sigma`` or a group
  has ``max_bits`` bases;
- Step 1, pruning in the alpha domain (Alg. 2): over one epoch, each step removes the
  coordinates whose removal the model says costs least (Eq. 13), chosen from each
  layer's cheapest ``top_k`` by one global sort, until the round's target ``M^r``;
- Step 2, optimising the bases with the speed-up (Alg. 3: per weight the nearest of
  the ``2^I_g`` values towards ``w - g/H``, then the coordinates by Eq. 23) and then
  the coordinates alone (Alg. 4, AMSGrad in the alpha domain with an L2 term), a
  negative coordinate flipping its basis.

The rounds follow Alg. 5 with the schedule ``M^r`` geometric from the sketch's size to
``--target-bits`` (each round prunes at most ``prune_ratio``; the paper prunes a fixed
share per round). Biases and BatchNorm train with the engine's Adam.

Decisions where the paper leaves room (docs/methods/alq.md):

- Bits are bases per weight averaged over the layer and weighted by parameters, as
  the paper counts them; the schedule is therefore in weight-bits (a coordinate of a
  group of ``n`` weights is ``n`` bits), not in a count of coordinates, so that LeNet's
  groups of 25 and 400 weights are not priced alike. A round removes the shortest
  prefix of the sorted offers that reaches its target, so it ends at or below it.
- The coordinates and the per-group widths are stored and counted in the file (the
  paper's storage counts a look-up table of widths; its code counts neither).
- ``H`` in Eq. 23 is divided by its mean over the group before the solve, so the
  ``lambda = 1e-6`` ridge is relative to the group's curvature (the solution is
  otherwise unchanged by a scale of ``H``).
- The epochs of a run are shared out: per round one pruning epoch, then the rest a
  third on bases and two thirds on coordinates (the paper: 10 and 20), the remainder
  of the division going to the last round. Learning rates drop tenfold halfway
  through each block (Appendix B.2). A search of one or two epochs (*ours*) is planned
  the same way over slots of steps, three per round ``--prune-ratio`` needs, so that
  each round prunes at most that share and the model trains bases and coordinates
  after it within the search.
- Moments restart at the start of each block, since the bases they were taken on
  have changed.
- ``--act-bits N`` quantizes the input of every quantized layer but the first (the
  image) to ``x_ref + D gamma`` with ``N`` bases (Sec. 4,
  :class:`~mpq_cli.quant.act.BasisActivation`); ``gamma`` and ``x_ref`` follow a running
  average (momentum 0.9) of each training batch's least-squares fit, and the gradient
  passes straight through inside the levels' range. The first layer's input stays FP
  (``--first-act-bits`` does not apply).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MpqError
from ..layers import quantizable_layers
from ..quant import alq
from ..quant.act import BasisActivation
from ..quant.basis import BasisForm, from_groups, nominal_basis_bits, to_groups
from ..scheme import BITS_CONVENTIONS
from .base import FinalizeResult, Method, MethodConfig, Phase, WeightQuantizer, register

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


# -- grouping ----------------------------------------------------------------------------------------------
def parse_structure(text: str) -> tuple[str, int]:
    """``channel``, ``kernel``, ``pixel`` or ``subchannel:N`` (``subchannel`` alone: N = 2)."""
    m = re.fullmatch(r"(channel|kernel|pixel|subchannel)(?::(\d+))?", text.strip())
    if not m or (m.group(2) is not None and m.group(1) != "subchannel"):
        raise MpqError(f"unknown ALQ group structure {text!r}; use channel, kernel, pixel or subchannel:N")
    parts = int(m.group(2)) if m.group(2) else 2
    if parts < 1:
        raise MpqError(f"subchannel:N needs N >= 1, got {parts}")
    return m.group(1), parts


def group_layout(shape: tuple[int, ...], structure: str, parts: int = 2) -> tuple[tuple[int, ...], int]:
    """``(perm, groups)`` that make each group a row of ``to_groups(weight, perm, groups)``.

    channel: ``w[c]``; kernel: ``w[c, d]`` (convolutions); pixel: ``w[c, :, y, x]``, the
    input channels at one kernel position (convolutions); subchannel:N: each ``w[c]``
    cut into ``N`` equal slices.
    """
    out = shape[0]
    identity = tuple(range(len(shape)))
    if structure == "channel":
        return identity, out
    if structure == "subchannel":
        per_channel = math.prod(shape[1:])
        if per_channel % parts:
            raise MpqError(f"subchannel:{parts} does not divide the {per_channel} weights per output channel")
        return identity, out * parts
    if len(shape) != 4:
        raise MpqError(f"group structure {structure!r} needs a convolution weight, got shape {list(shape)}")
    if structure == "kernel":
        return identity, out * shape[1]
    return (0, 2, 3, 1), out * shape[2] * shape[3]  # pixel


def default_structure(model: nn.Module, layer: nn.Module, first_conv: bool, last: bool) -> tuple[str, int]:
    """The paper's structures: LeNet5 kernel, kernel, subchannel(2), channel (App. C.1); otherwise
    the first convolution channel-wise, the others pixel-wise, linear layers subchannel(2)."""
    shape = tuple(layer.weight.shape)
    if type(model).__name__ == "LeNet5":
        if isinstance(layer, nn.Conv2d):
            return "kernel", 1
        return ("channel", 1) if last else ("subchannel", 2)
    if isinstance(layer, nn.Conv2d):
        if first_conv or shape[1] < 8:  # pixel groups of a few input channels would be tiny
            return "channel", 1
        return "pixel", 1
    return ("subchannel", 2) if shape[1] % 2 == 0 else ("channel", 1)


# -- the weight ----------------------------------------------------------------------------------------------
class ALQWeight(WeightQuantizer):
    """One layer as binary bases; buffers only (nothing for the engine's optimizer).

    Training returns ``w_hat = B alpha`` as a leaf tensor so that the backward pass leaves
    ``dL/dw_hat`` on it (``last_weight.grad``): the method's steps read it there.
    """

    weight_form = "basis"

    def __init__(
        self,
        weight: torch.Tensor,
        perm: tuple[int, ...],
        groups: int,
        max_bits: int,
        sigma: float,
        fixed: bool,
        structure: str = "custom",
    ):
        super().__init__(tuple(weight.shape))
        self.perm, self.groups, self.fixed, self.structure = tuple(perm), groups, fixed, structure
        rows = to_groups(weight.detach().float(), self.perm, groups)
        signs, coords, active = alq.sketch(rows, max_bits, sigma)
        self.register_buffer("signs", signs)
        self.register_buffer("coords", coords)
        self.register_buffer("active", active)
        # AMSGrad moments: in the weight domain for the basis step, in the alpha domain for the others
        for name, like in (
            ("w_m", rows),
            ("w_v", rows),
            ("w_vmax", rows),
            ("a_m", coords),
            ("a_v", coords),
            ("a_vmax", coords),
        ):
            self.register_buffer(name, torch.zeros_like(like))
        self.register_buffer("w_t", torch.zeros((), dtype=torch.float32, device=weight.device))
        self.register_buffer("a_t", torch.zeros((), dtype=torch.float32, device=weight.device))
        self.last_weight: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.signs.shape[2]

    def train_weight(self) -> torch.Tensor:
        with torch.no_grad():
            weight = from_groups(alq.rows_of(self.signs, self.coords, self.active), self.shape, self.perm)
        self.last_weight = weight.requires_grad_(True)
        return self.last_weight

    def exact_basis(self) -> BasisForm:
        return BasisForm(self.signs, self.coords * self.active, self.active.sum(1), self.perm)

    def exact_codes(self):
        raise TypeError("ALQ weights are binary bases, not integer codes; use exact_basis()")

    def forward(self) -> torch.Tensor:
        if self.training:
            return self.train_weight()
        return self.exact_basis().weight(self.shape)

    def nominal_bits(self) -> float:
        return nominal_basis_bits(self.active.sum(1), self.group_size)

    def weight_bits(self) -> torch.Tensor:
        """Bases times group size: this layer's share of the schedule's ``M`` (a tensor, no sync)."""
        return self.active.sum() * self.group_size

    # -- AMSGrad pieces ----------------------------------------------------------------------------------
    def reset_moments(self) -> None:
        for name in ("w_m", "w_v", "w_vmax", "a_m", "a_v", "a_vmax", "w_t", "a_t"):
            getattr(self, name).zero_()

    def grad_rows(self) -> torch.Tensor | None:
        if self.last_weight is None or self.last_weight.grad is None:
            return None
        return to_groups(self.last_weight.grad.float(), self.perm, self.groups)

    def _amsgrad(self, prefix: str, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the moments; returns bias-corrected ``(m_hat, H = sqrt(v_hat) + eps)``."""
        m, v, vmax, t = (getattr(self, f"{prefix}_{s}") for s in ("m", "v", "vmax", "t"))
        t.add_(1)
        m.mul_(BETA1).add_(grad, alpha=1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        torch.maximum(vmax, v, out=vmax)
        m_hat = m / (1 - BETA1**t)
        return m_hat, (vmax / (1 - BETA2**t)).sqrt() + EPS

    def alpha_grad(self, grad_rows: torch.Tensor, decay: float) -> torch.Tensor:
        """Eq. 14: ``dL/dalpha = B^T dL/dw_hat`` (plus the L2 term), zero on inactive slots."""
        g = torch.einsum("gpe,ge->gp", alq.plus_minus(self.signs), grad_rows) + decay * self.coords
        return g * self.active

    @torch.no_grad()
    def basis_step(self, lr: float) -> None:
        """Alg. 3 for this layer from the gradient of the last backward pass."""
        grad = self.grad_rows()
        if grad is None:
            return
        m_hat, hessian = self._amsgrad("w", grad)
        w_hat = to_groups(self.last_weight.detach(), self.perm, self.groups)  # the forward's weight, not recomputed
        target = w_hat - lr * m_hat / hessian
        relative = hessian / hessian.mean(1, keepdim=True)  # the ridge is relative to the group's curvature
        signs, coords = alq.basis_step(self.signs, self.coords, self.active, target, relative)
        self.signs.copy_(signs)
        self.coords.copy_(coords)

    @torch.no_grad()
    def coordinate_step(self, lr: float, decay: float) -> None:
        """Alg. 4 (Eq. 21) for this layer, then flips for negative coordinates."""
        grad = self.grad_rows()
        if grad is None:
            return
        m_hat, hessian = self._amsgrad("a", self.alpha_grad(grad, decay))
        coords = (self.coords - lr * m_hat / hessian) * self.active
        flipped = coords < 0
        signs, coords = alq.flip_negative(self.signs, coords)
        self.signs.copy_(signs)
        self.coords.copy_(coords)
        # a flip negates the coordinate and so its gradient: the first moment follows (the second moments
        # are squares), so the step continues as AMSGrad on the unflipped parametrisation would
        torch.where(flipped, -self.a_m, self.a_m, out=self.a_m)

    @torch.no_grad()
    def pruning_increments(self, lr: float) -> torch.Tensor | None:
        """Eq. 13 per coordinate from the alpha-domain moments (updated here, alpha unchanged)."""
        grad = self.grad_rows()
        if grad is None:
            return None
        m_hat, hessian = self._amsgrad("a", self.alpha_grad(grad, 0.0))
        return alq.pruning_increment(self.coords, lr * m_hat, hessian)

    @torch.no_grad()
    def prune(self, mask: torch.Tensor) -> None:
        active = self.active & ~mask
        signs, coords, active, *moments = alq.compact(
            self.signs, self.coords * active, active, self.a_m, self.a_v, self.a_vmax
        )
        for name, value in (
            ("signs", signs),
            ("coords", coords),
            ("active", active),
            ("a_m", moments[0]),
            ("a_v", moments[1]),
            ("a_vmax", moments[2]),
        ):
            getattr(self, name).copy_(value)


# -- the method ----------------------------------------------------------------------------------------------
@dataclass
class ALQConfig(MethodConfig):
    """ALQ's settings (defaults: the paper's LeNet5/VGG settings, Appendix C).

    Args:
        target_bits: average bases per weight at the end, weighted by parameters (may be below 1).
        max_bits: ``I_max``, the most bases a group gets in the sketch (``None``: the paper's 6 for
            mpq's built-in small-image models, 8 for torchvision and user models, ImageNet-sized).
        sigma: the sketch stops a group at this relative residual ``||eps||^2 / ||w||^2``.
        prune_ratio: the largest share of the weight-bits one pruning round removes (paper: 0.4 LeNet/VGG).
        rounds: pruning rounds (``None``: as many as ``prune_ratio`` needs, at most one per 3 epochs).
        top_k: share of each layer's coordinates offered to the global sort per step (paper: 0.5-1 %).
        basis_lr: AMSGrad learning rate of the basis step (paper: 1e-3).
        coord_lr: AMSGrad learning rate of the coordinate step and of the pruning model (paper: 1e-4).
        coord_decay: the L2 term on the coordinates (the paper gives no value).
        basis_share: share of each round's recovery epochs spent on bases (paper: 10 of 30).
        groups: override of the group structures: ``STRUCT`` for every layer, or a comma list of
            ``GLOB=STRUCT``; STRUCT is channel, kernel, pixel or subchannel:N.
    """

    target_bits: float | None = 1.0
    max_bits: int | None = None
    sigma: float = 1e-6
    prune_ratio: float = 0.4
    rounds: int | None = None
    top_k: float = 0.01
    basis_lr: float = 1e-3
    coord_lr: float = 1e-4
    coord_decay: float = 1e-4
    basis_share: float = 1 / 3
    groups: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_bits is None:
            raise MpqError("ALQ needs --target-bits (average bases per weight, e.g. 1 or 0.7)")
        if self.budget_on != "nominal":
            # its file stores each group's coordinates and width beside the sign bits: the count a pruning
            # round would have to foresee for every candidate; not built
            raise MpqError("ALQ caps its bases per weight only (--budget-on nominal); its report gives the stored bits")
        if self.granularity != "tensor":
            # its groups already carry their own coordinates (finer than a channel's step); no step to split
            raise MpqError(
                "ALQ's binary bases have a coordinate per group and basis, no step: --granularity channel "
                "is for the integer-code methods (uniform, CSQ, BSQ, BMPQ)"
            )
        if self.act_bits is not None and not 1 <= self.act_bits <= 8:
            raise MpqError(f"ALQ --act-bits must be in 1..8 (2^bits activation levels), got {self.act_bits}")
        if self.max_bits is not None and not 1 <= self.max_bits <= 16:
            raise MpqError(f"--max-bits must be in 1..16 (the packed format's planes), got {self.max_bits}")
        if not 0 < self.prune_ratio < 1:
            raise MpqError(f"--prune-ratio must be in (0, 1), got {self.prune_ratio}")
        if self.rounds is not None and self.rounds < 1:
            raise MpqError(f"--rounds must be >= 1, got {self.rounds}")
        if not 0 < self.top_k <= 1:
            raise MpqError(f"--top-k is a share of each layer's coordinates in (0, 1], got {self.top_k}")
        if not 0 < self.basis_share < 1:
            raise MpqError(f"--basis-share must be in (0, 1), got {self.basis_share}")
        if self.sigma < 0 or self.basis_lr <= 0 or self.coord_lr <= 0 or self.coord_decay < 0:
            raise MpqError("--sigma and --coord-decay must be >= 0, learning rates > 0")
        for _glob, structure in self.group_overrides():
            parse_structure(structure)

    def group_overrides(self) -> list[tuple[str, str]]:
        """``[(glob, structure)]`` from ``groups`` (a bare structure applies to every layer)."""
        if not self.groups:
            return []
        out = []
        for item in self.groups.split(","):
            glob, sep, structure = item.strip().rpartition("=")
            out.append((glob if sep else "*", structure))
        return out


def plan_epochs(epochs: int, rounds: int, basis_share: float) -> list[tuple[int, str]]:
    """Per epoch ``(round, kind)``, kind ``prune``, ``basis`` or ``coord``: each round one pruning
    epoch, then its other epochs split ``basis_share`` : rest (each at least one when there are two)."""
    base, extra = divmod(epochs, rounds)
    plan = []
    for r in range(rounds):
        n = base + (extra if r == rounds - 1 else 0)
        recovery = n - 1
        basis = min(recovery, max(1, round(basis_share * recovery))) if recovery >= 1 else 0
        if recovery >= 2:
            basis = min(basis, recovery - 1)
        plan += [(r, "prune")] + [(r, "basis")] * basis + [(r, "coord")] * (recovery - basis)
    return plan


@register("alq")
class ALQ(Method):
    """ALQ (Qu et al., CVPR 2020): multi-bit binary bases per group, loss-aware pruning of bases to the target."""

    config_class = ALQConfig
    config: ALQConfig
    bits_convention = BITS_CONVENTIONS["alq"]
    # Biases and BatchNorm: Adam (the public code; the paper's LeNet baseline settings).
    training_defaults = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "cosine"}
    # --recipe checkpoint: measured from the trained resnet20 reference (benchmarks/results/checkpoint_lr.md)
    checkpoint_defaults = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "cosine"}
    finetune_defaults = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "cosine"}

    def __init__(self, config: ALQConfig, selection=None):
        super().__init__(config, selection)
        self.initial_weight_bits = 0
        self.history: list[dict] = []  # one record per pruning round
        self.plan: list[tuple[int, str]] = []
        self.rounds = 0
        self._kind = "coord"
        self._block_steps = 1
        self._block_step = 0
        # the plan's unit: an epoch, or for a search of fewer epochs than a round needs (prune, bases,
        # coordinates), a share of one (on_step_end moves to the next slot at its first step)
        self._slots_per_epoch = 1
        self._slot_starts: list[int] = [0]  # steps into the epoch where each of its slots starts
        self._slot_steps: list[int] = [1]
        self._epoch_step = 0
        self._epoch = 0
        self._prune: dict | None = None
        self._model: nn.Module | None = None
        self._first_conv: str | None = None
        self._last_layer: str | None = None
        self.max_bits = 6

    # -- building --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, loss_probe=None) -> None:
        self._model = model
        builtin = type(model).__module__.startswith("mpq_cli.models")
        self.max_bits = self.config.max_bits or (6 if builtin else 8)
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        self._first_conv = convs[0] if convs else None
        self._last_layer = list(quantizable_layers(model))[-1] if quantizable_layers(model) else None
        super().prepare(model, loss_probe)
        self.initial_weight_bits = self.weight_bits()  # a sketch already within the target only trains
        self._model = None
        fixed = sum(int(q.weight_bits()) for q in self.quantizers().values() if q.fixed)
        if self.target_weight_bits() < fixed:  # refused before any training
            raise MpqError(
                f"--target-bits {self.config.target_bits} is below what the --fix-bits layers alone take "
                f"({fixed / self.total_params():.4f} average bits)"
            )

    def make_weight_quantizer(self, name, layer, fixed_bits):
        structure, parts = default_structure(self._model, layer, name == self._first_conv, name == self._last_layer)
        for glob, text in self.config.group_overrides():
            if fnmatch.fnmatchcase(name, glob):
                structure, parts = parse_structure(text)
        perm, groups = group_layout(tuple(layer.weight.shape), structure, parts)
        if fixed_bits is not None and not 0 <= fixed_bits <= 16:
            raise MpqError(f"--fix-bits {name}={fixed_bits}: ALQ bases per group must be in 0..16")
        max_bits = self.max_bits if fixed_bits is None else fixed_bits
        label = structure if structure != "subchannel" else f"subchannel:{parts}"
        return ALQWeight(
            layer.weight,
            perm,
            groups,
            max_bits,
            self.config.sigma if fixed_bits is None else 0.0,
            fixed_bits is not None,
            label,
        )

    def make_act_quantizer(self, name, first):
        """Sec. 4: every layer's input but the image, at one global ``act_bits``, as binary bases."""
        if self.config.act_bits is None or first:
            return None
        return BasisActivation(self.config.act_bits)

    def param_groups(self, model, weight_decay):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers.values())

    def weight_bits(self) -> int:
        return int(sum(q.weight_bits() for q in self.quantizers().values()))

    def target_weight_bits(self) -> int:
        return math.floor(self.config.target_bits * self.total_params())

    def prunable(self) -> dict[str, ALQWeight]:
        return {n: q for n, q in self.quantizers().items() if not q.fixed}

    def round_targets(self) -> list[int]:
        """``M^r`` in weight-bits: geometric from the sketch to the target over the rounds."""
        start, end = self.initial_weight_bits, self.target_weight_bits()
        if start <= end or self.rounds == 0:
            return [start] * self.rounds
        ratio = (end / start) ** (1 / self.rounds)
        targets = [math.floor(start * ratio ** (r + 1)) for r in range(self.rounds)]
        targets[-1] = end
        return targets

    def _resolve_rounds(self, epochs: int) -> int:
        if self.config.rounds is not None:
            if self.config.rounds > epochs:
                raise MpqError(f"--rounds {self.config.rounds} needs at least as many epochs (--epochs {epochs})")
            return self.config.rounds
        return max(1, min(self._needed_rounds(epochs), epochs // 3 if epochs >= 3 else 1))

    def _needed_rounds(self, epochs: int) -> int:
        """The rounds ``--prune-ratio`` needs from the sketch to the target (none past the target)."""
        start, end = self.initial_weight_bits, self.target_weight_bits()
        if start <= end:
            return 1
        if end <= 0:
            return max(1, epochs // 3)
        return max(1, math.ceil(math.log(end / start) / math.log(1 - self.config.prune_ratio) - 1e-9))

    # -- training hooks ------------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        # *ours*: a search of fewer epochs than one round's prune, bases and coordinates (3) splits each epoch into
        # slots, so that a one-epoch search from a trained model still recovers after it prunes (pruning the whole
        # epoch from the 8-basis sketch to 2 bases left MobileNetV2 at 17 % top-1). The paper's runs are epochs.
        # as many slots as the rounds --prune-ratio needs take (prune, bases, coordinates each), a slot a step at least
        per = math.ceil(3 * self._needed_rounds(3) / epochs)
        short = self.phase == Phase.SEARCH and epochs < 3 and self.config.rounds is None
        self._slots_per_epoch = per if short and steps_per_epoch >= per else 1
        slots = epochs * self._slots_per_epoch
        per = self._slots_per_epoch
        self._slot_starts = [round(i * steps_per_epoch / per) for i in range(per)]
        self._slot_steps = [
            (self._slot_starts[i + 1] if i + 1 < per else steps_per_epoch) - self._slot_starts[i] for i in range(per)
        ]
        if self.phase == Phase.FINETUNE:
            basis = min(epochs - 1, max(1, round(self.config.basis_share * epochs))) if epochs > 1 else 1
            kinds = ["basis"] * basis + ["coord"] * (epochs - basis)
            self.plan = [(0, k) for k in kinds]
        elif not self.plan or len(self.plan) != slots:
            self.rounds = self._resolve_rounds(slots)
            self.plan = plan_epochs(slots, self.rounds, self.config.basis_share)
        self._epoch, self._epoch_step = epoch, 0
        self._start_slot(epoch * per)

    def _start_slot(self, slot: int) -> None:
        """Set up the plan's ``slot`` (an epoch, or a share of one in a short search): its kind, its block's
        length for the lr halving, and for a pruning slot the round's target."""
        round_, kind = self.plan[slot]
        steps = self._slot_steps[slot % self._slots_per_epoch]
        first, last = slot, slot  # the block: consecutive slots of one kind (a pruning slot is its own)
        if kind != "prune":
            while first > 0 and self.plan[first - 1] == (round_, kind):
                first -= 1
            while last + 1 < len(self.plan) and self.plan[last + 1] == (round_, kind):
                last += 1
        length = [self._slot_steps[i % self._slots_per_epoch] for i in range(len(self.plan))]
        self._block_steps = sum(length[first : last + 1])  # in steps: slots of one epoch may differ by one
        self._block_step = sum(length[first:slot])  # also right when resumed inside a block
        if slot == first:
            for q in self.quantizers().values():
                q.reset_moments()
        self._kind = kind
        self._prune = None
        if kind == "prune" and self.phase == Phase.SEARCH:
            target = self.round_targets()[round_]
            start = self.weight_bits()
            self._prune = {
                "round": round_,
                "start": start,
                "target": min(start, target),
                "removed": 0,
                "steps": steps,
                "step": 0,
                "bits_before": self.average_bits(),
            }

    def _lr(self, base: float) -> float:
        """Tenfold lower in the second half of a block (Appendix B.2)."""
        return base * (0.1 if self._block_step >= self._block_steps / 2 else 1.0)

    def distributed_gradients(self) -> list[torch.Tensor]:
        """The weights ``B alpha`` this step computed with: the basis, coordinate and pruning steps read
        their ``.grad`` and run their own AMSGrad, so under torchrun it must be every rank's mean."""
        return [q.last_weight for q in self.quantizers().values() if q.last_weight is not None]

    def on_step_end(self) -> None:
        if self.phase not in (Phase.SEARCH, Phase.FINETUNE):
            return
        quantizers = self.quantizers()
        if self._kind == "basis":
            lr = self._lr(self.config.basis_lr)
            for q in quantizers.values():
                q.basis_step(lr)
        elif self._kind == "coord":
            lr = self._lr(self.config.coord_lr)
            for q in quantizers.values():
                q.coordinate_step(lr, self.config.coord_decay)
        elif self._prune is not None:
            self._prune_step()
        self._block_step += 1
        for q in quantizers.values():
            q.last_weight = None
        self._epoch_step += 1
        slot = self._slot_starts.index(self._epoch_step) if self._epoch_step in self._slot_starts[1:] else None
        if slot is not None:  # a short search's next share of this epoch
            self._start_slot(self._epoch * self._slots_per_epoch + slot)

    def _prune_step(self) -> None:
        """Alg. 2, one iteration: remove coordinates until this step's share of the round is gone."""
        state = self._prune
        state["step"] += 1
        due = round((state["start"] - state["target"]) * state["step"] / state["steps"])
        prunable = self.prunable()
        increments, actives, sizes, layers = [], [], [], []
        lr = self.config.coord_lr
        for name, q in prunable.items():
            inc = q.pruning_increments(lr)
            if inc is None:
                continue
            increments.append(inc)
            actives.append(q.active)
            sizes.append(q.group_size)
            layers.append(name)
        quota = due - state["removed"]
        if quota > 0 and layers:  # an earlier step may have removed more than its share already
            masks = alq.select_pruned(increments, actives, sizes, quota, self.config.top_k)
            for name, mask, size in zip(layers, masks, sizes, strict=True):
                count = int(mask.sum())
                if count:
                    prunable[name].prune(mask)
                    state["removed"] += count * size
        if state["step"] == state["steps"]:
            self._close_round()  # every scheduled round is recorded, whether or not its last step pruned

    def _close_round(self) -> None:
        state = self._prune
        self.history.append(
            {
                "round": state["round"] + 1,
                "bits_before": state["bits_before"],
                "bits_after": self.average_bits(),
                "target_bits": state["target"] / self.total_params(),
                "layers": {n: q.nominal_bits() for n, q in self.quantizers().items()},
            }
        )

    # -- results ---------------------------------------------------------------------------------------------
    def pruned_channels(self) -> dict[str, tuple[int, int]]:
        """Per layer ``(output channels whose weights are all zero, output channels)``."""
        out = {}
        for name, q in self.quantizers().items():
            with torch.no_grad():
                weight = q.exact_basis().weight(q.shape).reshape(q.shape[0], -1)
            out[name] = (int((weight == 0).all(1).sum()), q.shape[0])
        return out

    def finalize(self) -> FinalizeResult:
        if self._prune is not None and self._prune["step"] < self._prune["steps"]:
            self._close_round()  # a run stopped inside a pruning epoch still reports it
        self.phase = Phase.FINAL
        avg = self.average_bits()
        pruned = self.pruned_channels()
        return FinalizeResult(
            budget_met=avg <= self.config.target_bits + 1e-12,
            facts={
                "initial_bits": self.initial_weight_bits / max(self.total_params(), 1),
                "rounds": len(self.history),
                "pruned_channels": sum(p for p, _ in pruned.values()),
                "output_channels": sum(c for _, c in pruned.values()),
            },
        )

    def start_finetune(self) -> None:
        self.phase = Phase.FINETUNE
        self.plan = []

    def report_notes(self) -> list[str]:
        names = list(self.layers)
        quantizers = self.quantizers()
        pruned = self.pruned_channels()
        lines = [
            "## ALQ groups and pruned channels",
            "",
            "| layer | structure | groups | weights per group | bits | groups without a basis | "
            "pruned output channels |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in names:
            q = quantizers[name]
            empty = int((q.active.sum(1) == 0).sum())
            lines.append(
                f"| {name} | {q.structure} | {q.groups:,} | {q.group_size} | "
                f"{q.nominal_bits():.3f} | {empty:,} | {pruned[name][0]} of {pruned[name][1]} |"
            )
        notes = ["\n".join(lines)]
        if self.history:
            head = "| round | target bits | bits before | bits after | " + " | ".join(names) + " |"
            rows = [head, "|" + "---|" * (4 + len(names))]
            for h in self.history:
                rows.append(
                    f"| {h['round']} | {h['target_bits']:.4f} | {h['bits_before']:.4f} | "
                    f"{h['bits_after']:.4f} | " + " | ".join(f"{h['layers'][n]:.3f}" for n in names) + " |"
                )
            notes.append(
                "## ALQ pruning rounds\n\nAverage bases per weight before and after each pruning "
                f"round (initial sketch: {self.initial_weight_bits / max(self.total_params(), 1):.4f}); "
                "per layer after the round.\n\n" + "\n".join(rows)
            )
        return notes

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "initial_weight_bits": self.initial_weight_bits,
            "history": self.history,
            "rounds": self.rounds,
            "plan": [list(p) for p in self.plan],
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.initial_weight_bits = int(state.get("initial_weight_bits", self.initial_weight_bits))
        self.history = list(state.get("history", []))
        self.rounds = int(state.get("rounds", 0))
        self.plan = [tuple(p) for p in state.get("plan", [])]
