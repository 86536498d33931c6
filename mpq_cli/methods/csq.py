"""CSQ: bi-level continuous sparsification (Xiao, Yang et al., DAC 2023).

Each quantized layer holds a scale ``s``, bit logits ``m_p``/``m_n`` of shape
``(*weight.shape, n)`` and bit-mask logits ``m_B`` of shape ``(n,)``. Its weight is
Eq. (5)::

    W = s / (2^n - 1) * sum_b (f(m_p^b) - f(m_n^b)) * 2^b * f(m_B^b),   f(x) = sigmoid(beta * x)

computed for all bits at once as one contraction over the last axis. ``beta`` grows
exponentially from ``beta_start`` to ``beta_max``, stepped every batch rather than every
epoch so that short runs see a smooth schedule: by default (``ramp_to_projection``, Alg. 1)
over the search stage, reaching ``beta_max`` at the projection, and again over the rest; or
one ramp over the whole run, rewound at the projection (see the field). The
loss adds ``lambda * Delta_S * sum_layers sum_b f(m_B^b)`` (Eq. 6-7) with ``Delta_S``
the current average bits, counted from ``m_B >= 0`` and weighted by each layer's
parameters, minus the target.

Decisions where the paper or its public code leaves room (see docs/methods/csq.md):

- Start from the checkpoint's 8-bit quantization: bits map to logits ``+-c`` (the
  public code's 0/1 logits never harden), ``m_B`` starts at ``+c_B`` (all bits
  selected), ``s = max|W|``.
- Gate-gain normalisation: Eq. (5)'s relaxed weight is divided by ``g(beta)``, the
  value the gates give an unmoved bit (``tanh(beta c / 2) * sigmoid(beta c_B)``), which
  tends to 1 as beta grows. This only reparametrises ``s`` by a known factor, and it
  makes the relaxed and the exact (unit-step) model agree whenever the logits sit at
  ``+-c`` (at the start of fine-tuning; at the start and after the projection too
  without the residuals below), instead of the relaxed model being shrunk by ``g``.
- Evaluation always uses unit-step gates (exact integer codes), so every reported
  accuracy is that of an exactly quantized model, and the run keeps the codes.
- Budget guarantee: at ``project_at`` of the search, if the hard scheme lies outside
  ``[target - tol, target]``, a loss-aware step measures, layer by layer, the probe loss
  of rounding the layer's relaxed weight onto 0..n contiguous bits, and an exact
  integer program picks the per-layer bit counts with the least summed loss that land
  in the window (see :mod:`mpq_cli.budget`). The scheme is
  then fixed and the rest of the search is the second stage: since config version 7 each
  layer's contiguous selected bits train as a uniform grid in LSQ's form (a latent weight,
  a learned step: ``fixed_scheme_training``), since version 8 restarted from the checkpoint's
  weights (``second_stage_start``); before, Alg. 1's fine-tuning stage (logits
  restart from the exact codes, beta rewinds and rises to beta_max again).
- Residuals across restarts: re-made logits put each weight's rounding residual into
  its lowest selected bit, so the relaxed model does not jump at the projection and a
  weight near a rounding threshold has a logit near 0 (a latent weight's position).
- Preconditioned bit logits (the bit-logit form of a fixed scheme): a logit's gradient is the
  weight's times ``kappa_b beta f'(beta m)`` with ``kappa_b = s 2^b / ((2^n - 1) g)``,
  1e-7..1e-5 in lenet5's FC layer, where the paper's SGD never flips a bit in a short search
  from a checkpoint. Once a layer's scheme is fixed its logit gradients are divided by
  ``kappa_b^2``: at a logit's start its weight then moves as plain SGD moves a latent weight,
  and bits still harden with beta.
- Weight decay on bit logits and the rest of the model as in the paper; none on
  ``m_B`` (the budget term alone drives it) or on ``s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..budget import AVERAGE_SLACK, trial
from ..errors import MpqError
from ..packing.encodings import plan_codes
from ..quant.bits import bit_values, gated_plane_sum, round_to_bits, to_bit_planes
from ..quant.primitives import least_squares_scale, lsq_quantize, max_code, per_channel_max, quantize_codes
from .base import FinalizeResult, Method, MethodConfig, Phase, WeightQuantizer, register

PRECONDITION = ("none", "fixed", "always")
FIXED_SCHEME_TRAINING = ("bits", "lsq")
SECOND_STAGE_START = ("search", "checkpoint")


@dataclass
class CSQConfig(MethodConfig):
    """CSQ hyperparameters; defaults from the paper (Sec. IV-A) unless marked *ours*.

    Args:
        max_bits: bit planes per layer, n (Sec. IV-A: uniform 8-bit).
        reg_strength: base regularisation strength lambda (Eq. 7; Sec. IV-C: 0.01).
        mask_lr: *ours*: the mask logits' peak learning rate under SGD, whatever ``--lr`` is (it follows
            the schedule's shape; ``None``: ``--lr``). lambda = 0.01 is tuned to the paper's lr 0.1; at a
            fine-tuning lr of 0.002 the regulariser moved MobileNetV2's masks by about 0.02 in 100 steps,
            so no bit was dropped before the budget step (benchmarks/results/cifar10.md).
        beta_start: initial temperature beta_0 (Alg. 1: 1).
        beta_max: final temperature (Sec. IV-A: 200, reached at the end of the search).
        init_bit_logit: *ours*: |logit| a 0/1 bit of the initial 8-bit codes maps to (1.0: bits
            still flip in a short run; ahead of 0.25 over three seeds, benchmarks/csq_vs_uniform.py).
        init_mask_logit: *ours*: initial m_B (positive: every bit selected).
        budget_tolerance: *ours*: the final average bits lands in [target - tol, target].
        budget_span: *ours*: the budget step probes each layer's options within this many bits of
            its learned bits (all of them when those cannot reach the window; 0: always all).
        reg_weighting: ``paper``: Eq. 7's plain sum of R(m_B) over layers; ``size`` (*ours*):
            each layer's R weighted by its share of the parameters (times the number of
            layers, so lambda keeps its scale), i.e. by what its bits cost in the average.
        project_at: *ours*: fraction of the search after which the scheme is projected into
            the budget window and fixed; the remaining steps train the bits under it (as
            Alg. 1's fine-tuning does), so the budget step's damage is trained away.
            1.0 projects only at the very end. 0.25 since config version 7 (0.5 before): with the LSQ
            second stage, 85.47 % mean hold-out over seeds 0-2 of the evidence protocol against 84.63 for
            version 6 (0.5, bit logits), every seed ahead; 0.25 with the bit-logit stage scored 84.54 (seed 1).
        ramp_to_projection: Alg. 1's schedule (the default since config version 6): beta reaches beta_max when
            the search stage ends (the projection step), so the scheme is fixed from nearly hard gates, then
            rewinds and ramps again over the rest. ``false`` (*ours*, the default before version 6): one ramp
            over the whole run, rewound at the projection, which comes at beta = beta_max^project_at (about 14)
            with many gates still soft. In 2 x 100-step resnet20 searches that was 0.4-0.9 points ahead (two
            seeds), but in the evidence protocol's 2 x 352 steps the masks crossed zero together early, hovered
            there while the soft model trained on, and the projection found a noise scheme with layers at
            0 bits (10 % hold-out; seeds 0 and 1), where Alg. 1's ramp hardened the gates first and the same
            seed-1 search ended at 85.46 % hold-out (docs/methods/csq.md, "Two-epoch searches").
        carry_residual: *ours*: when logits are re-made from codes (the start, the projection), the
            lowest selected bit's logits carry the rounding residual, so the relaxed weight stays the
            weight the codes were rounded from and near-threshold weights sit near a flip.
        precondition: *ours*: divide each bit logit's gradient by kappa_b^2, the squared worth of
            its bit in the weight, so that bits move as a latent weight would under SGD: ``none`` (the
            paper's plain gradient), ``fixed`` (once a layer's scheme is fixed: after the projection,
            in fine-tuning, --fix-bits layers) or ``always``.
        straight_through_masks: *ours*, off by default: the search's forward pass uses the hard bit masks
            ``m_B >= 0`` (the scheme the exact model and the file will hold) and their gradient is the
            sigmoid's (a straight-through estimator); Eq. 6-7's regulariser stays on the sigmoid gates. Eq. 5's
            soft masks move a layer's bits together as one scale, which batch norm undoes, so the loss cannot
            resist the regulariser there; with the hard forward a dropped bit costs its loss at once. Measured
            (resnet20, 2 x 352 steps, seed 1): the scheme came from the masks (2.44 bits before the budget
            step), but the hard forward trained worse: 80.80 % hold-out against 85.46 with Alg. 1's ramp, and
            whole residual branches went to 0 bits.
        contiguous_bits: *ours*: when the scheme is fixed (the projection, or the end of a search
            that was not projected), a layer whose mask selects non-contiguous bits (``{0, 7}``:
            2 nominal bits whose codes need 8 magnitude bits as integers) is re-rounded from its
            relaxed weight onto as many contiguous bits, so that every layer stores its nominal
            bits plus a sign and a budget met in nominal bits is met in the file.
        fixed_scheme_training: how a layer trains once its scheme is fixed (after the projection, in
            ``mpq finetune``, ``--fix-bits`` and ``--edge-bits`` layers): ``bits``, Alg. 1's second stage (the
            bit logits under a rewound beta ramp, the mask fixed), or ``lsq`` (*ours*): the layer's ``k``
            contiguous selected bits become a ``k``-bit uniform grid whose step is ``s 2^low / (2^n - 1)``, and
            a latent weight starting at the relaxed weight (its codes unchanged) trains through a
            straight-through round with that step learned as in LSQ (Esser et al. 2020), as ``uniform`` trains.
            The scheme, and every weight the file can hold, are the same; only the second stage's
            parametrisation differs. ``lsq`` since config version 7 (docs/methods/csq.md, "The second stage").
        second_stage_start: *ours*, with ``fixed_scheme_training=lsq`` (the bit-logit form ignores it): where a
            layer's latent weight starts when its scheme is fixed. ``search`` (the default, from scratch): the
            relaxed weight the search ended with (its codes unchanged at the switch; version 7). ``checkpoint``
            (what ``--recipe checkpoint``, the default from trained weights, sets since version 8): the weight the
            layer was loaded with, its step set by least-squares clipping at the layer's fixed bits (uniform's
            start; ``--fix-bits`` and ``--edge-bits`` layers from the start too): the search chooses the scheme,
            the second stage trains from the checkpoint under it, as uniform trains under a transplanted scheme.
            Evidence protocol, seeds 0-2, hold-out: 86.06 / 86.10 / 86.46 % against version 7's 85.28 / 86.02 /
            85.12, every seed ahead (docs/methods/csq.md, "Where the second stage starts").
    """

    # 2: carry_residual, precondition; 3: contiguous_bits; 4: mask_lr; 5: ramp_to_projection;
    # 6: straight_through_masks, ramp_to_projection on; 7: fixed_scheme_training lsq, project_at 0.25;
    # 8: second_stage_start checkpoint under --recipe checkpoint; 9: budget_probe screen
    version: int = 9
    target_bits: float = 3.0
    max_bits: int = 8
    reg_strength: float = 0.01
    mask_lr: float | None = 0.1
    beta_start: float = 1.0
    beta_max: float = 200.0
    init_bit_logit: float = 1.0
    init_mask_logit: float = 0.5
    budget_tolerance: float = 0.1
    budget_span: int = 2
    reg_weighting: str = "paper"
    project_at: float = 0.25
    ramp_to_projection: bool = True
    carry_residual: bool = True
    precondition: str = "fixed"
    contiguous_bits: bool = True
    straight_through_masks: bool = False
    fixed_scheme_training: str = "lsq"
    second_stage_start: str = "search"
    budget_probe: str = "screen"

    @classmethod
    def from_dict(cls, d: dict) -> CSQConfig:
        """A saved config; one of version 1 keeps the behaviour it was run with."""
        version = d.get("version", cls.version)
        if isinstance(version, int) and version < 2:
            d = {"carry_residual": False, "precondition": "none", **d}
        if isinstance(version, int) and version < 3:
            d = {"contiguous_bits": False, **d}
        if isinstance(version, int) and version < 4:
            d = {"mask_lr": None, **d}
        if isinstance(version, int) and version < 5:
            d = {"ramp_to_projection": False, **d}
        if isinstance(version, int) and version < 6:
            d = {"straight_through_masks": False, "ramp_to_projection": False, **d}
        if isinstance(version, int) and version < 7:
            d = {"fixed_scheme_training": "bits", "project_at": 0.5, **d}
        if isinstance(version, int) and version < 8:
            d = {"second_stage_start": "search", **d}
        if isinstance(version, int) and version < 9:
            d = {"budget_probe": "exact", **d}
        return super().from_dict(d)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_bits is None:
            raise MpqError("this method needs --target-bits")
        if not 0.0 < self.project_at <= 1.0:
            raise MpqError("project_at must be in (0, 1]")
        if self.precondition not in PRECONDITION:
            raise MpqError(f"precondition must be one of {', '.join(PRECONDITION)}")
        if self.reg_weighting not in ("paper", "size"):
            raise MpqError("reg_weighting must be 'paper' or 'size'")
        if not 1 <= self.max_bits <= 16:
            raise MpqError(f"max_bits must be in 1..16, got {self.max_bits}")
        if self.target_bits > self.max_bits:
            raise MpqError(f"--target-bits {self.target_bits} exceeds CSQ's {self.max_bits} bit planes")
        if self.beta_start <= 0 or self.beta_max < self.beta_start:
            raise MpqError("CSQ needs 0 < beta_start <= beta_max")
        if self.reg_strength < 0 or self.budget_tolerance < 0 or self.budget_span < 0:
            raise MpqError("reg_strength, budget_tolerance and budget_span must be >= 0")
        if self.mask_lr is not None and not self.mask_lr > 0:
            raise MpqError(f"mask_lr must be > 0 (or null: --lr), got {self.mask_lr}")
        if self.init_bit_logit <= 0:
            raise MpqError("init_bit_logit must be > 0")
        if not isinstance(self.ramp_to_projection, bool):
            raise MpqError(f"ramp_to_projection must be true or false, got {self.ramp_to_projection!r}")
        if not isinstance(self.straight_through_masks, bool):
            raise MpqError(f"straight_through_masks must be true or false, got {self.straight_through_masks!r}")
        if not isinstance(self.carry_residual, bool):
            raise MpqError(f"carry_residual must be true or false, got {self.carry_residual!r}")
        if self.fixed_scheme_training not in FIXED_SCHEME_TRAINING:
            raise MpqError(
                f"fixed_scheme_training must be one of {', '.join(FIXED_SCHEME_TRAINING)}, "
                f"got {self.fixed_scheme_training!r}"
            )
        if self.second_stage_start not in SECOND_STAGE_START:
            raise MpqError(
                f"second_stage_start must be one of {', '.join(SECOND_STAGE_START)}, got {self.second_stage_start!r}"
            )
        if self.fixed_scheme_training == "lsq" and not self.contiguous_bits:
            raise MpqError("fixed_scheme_training=lsq needs contiguous_bits=true (a uniform grid of contiguous bits)")


class CSQWeight(WeightQuantizer):
    """One layer's CSQ parameters (Eq. 5)."""

    def __init__(self, weight: torch.Tensor, cfg: CSQConfig, fixed_bits: int | None):
        super().__init__(weight.shape)
        n = self.n_bits = cfg.max_bits
        self.granularity = cfg.granularity
        self.init_bit_logit, self.init_mask_logit = cfg.init_bit_logit, cfg.init_mask_logit
        self.straight_through_masks = cfg.straight_through_masks
        device = weight.device
        self.bit_logits_pos = nn.Parameter(torch.zeros(*weight.shape, n, device=device))  # m_p, (*shape, n)
        self.bit_logits_neg = nn.Parameter(torch.zeros(*weight.shape, n, device=device))  # m_n, (*shape, n)
        self.mask_logits = nn.Parameter(torch.zeros(n, device=device))  # m_B, (n,)
        max_abs = per_channel_max(weight, cfg.granularity)  # 0-d, or (C, 1, ..., 1): one s per output channel
        self.scale = nn.Parameter(torch.ones_like(max_abs))  # s
        self.register_buffer("bit_values", bit_values(n, device))  # 2^b
        self.register_buffer("fixed_mask", torch.ones(n, device=device))  # q_B once the scheme is fixed
        self.register_host_buffer("mask_is_fixed", False, device=device)
        self.temperature = cfg.beta_start  # beta, set by the method every step
        self.precondition = False  # divide the bit logits' gradients by kappa_b^2; set by the method
        self.trains_latent_when_fixed = cfg.fixed_scheme_training == "lsq"
        self.latent_from_checkpoint = self.trains_latent_when_fixed and cfg.second_stage_start == "checkpoint"
        if self.trains_latent_when_fixed:  # the second stage's LSQ form (frozen until the scheme is fixed)
            self.latent = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
            self.latent_step = nn.Parameter(torch.ones_like(max_abs), requires_grad=False)
            self.register_host_buffer("latent_bits", -1, device=device)  # -1: the bit-logit form; k: LSQ's, k bits
        codes = quantize_codes(weight.detach(), max_abs, n)
        target = weight.detach().float() if cfg.carry_residual else None
        self.load_codes(
            codes, (max_abs / self.levels).float(), torch.ones(n, device=device), fixed=False, target=target
        )
        if fixed_bits is not None:
            if fixed_bits > n:
                raise MpqError(f"--fix-bits {fixed_bits} exceeds CSQ's {n} bit planes")
            self.load_codes(*self.requantized(fixed_bits), fixed=True, target=target)
            self.to_latent(target)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, n_bits={self.n_bits}"

    @property
    def levels(self) -> int:
        return 2**self.n_bits - 1

    def latent_form_bits(self) -> int | None:
        """``k`` when the layer trains in the LSQ form (``fixed_scheme_training=lsq``, scheme fixed), else None."""
        if not self.trains_latent_when_fixed or self.host("latent_bits") < 0:
            return None
        return self.host("latent_bits")

    @torch.no_grad()
    def to_latent(self, target: torch.Tensor | None = None) -> None:
        """With ``fixed_scheme_training=lsq``, move a fixed layer into the LSQ form: its ``k`` contiguous selected
        bits from ``low`` hold codes ``c 2^low``, ``|c| <= 2^k - 1``, i.e. a ``k``-bit grid with step
        ``s 2^low / (2^n - 1)``. The latent weight starts at ``target`` (the relaxed weight the codes came from),
        clipped to 0.49 of that step around the codes, so the exact codes do not change at the switch. With
        ``second_stage_start=checkpoint`` the latent keeps what it holds until the switch, the checkpoint's weight,
        and the step is its least-squares clip at ``k`` bits. A layer at 0 bits keeps the bit form: it has nothing
        to train (every code 0)."""
        if not self.trains_latent_when_fixed or not self.host("mask_is_fixed") or self.latent_form_bits() is not None:
            return
        selected = torch.nonzero(self.fixed_mask).flatten().tolist()
        if not selected:
            return
        low, bits = selected[0], len(selected)
        if selected[-1] - low + 1 != bits:
            raise MpqError("fixed_scheme_training=lsq met a layer whose bits are not contiguous")
        if self.latent_from_checkpoint:  # the latent has not trained yet: it holds the weight the layer was loaded with
            clip = least_squares_scale(self.latent, bits, granularity=self.granularity)
            self.latent_step.copy_(clip.reshape(self.scale.shape) / max_code(bits))
            self.set_host("latent_bits", bits)
            self.train_form()
            return
        codes, step = self.exact_codes()
        unit = (step * 2**low).reshape(self.scale.shape)  # the k-bit grid's step, 0-d or per output channel
        base = torch.div(codes, 2**low, rounding_mode="trunc").to(unit.dtype) * unit  # exact: codes are multiples
        latent = base
        if target is not None:
            half = 0.49 * unit
            latent = base + torch.minimum(torch.maximum(target.to(base) - base, -half), half)
        self.latent.copy_(latent)
        self.latent_step.copy_(unit)
        self.set_host("latent_bits", bits)
        self.train_form()

    def train_form(self) -> None:
        """Let only the current form's parameters train (the form is saved in ``latent_bits``; a loaded state
        dict restores it, not ``requires_grad``)."""
        latent = self.latent_form_bits() is not None
        for p in (self.bit_logits_pos, self.bit_logits_neg, self.scale):
            p.requires_grad_(not latent)
        if self.trains_latent_when_fixed:
            self.latent.requires_grad_(latent)
            self.latent_step.requires_grad_(latent)

    def soft_mask(self) -> torch.Tensor:
        if self.host("mask_is_fixed"):
            return self.fixed_mask
        soft = torch.sigmoid(self.temperature * self.mask_logits)
        if self.straight_through_masks:  # forward: the hard mask; backward: the sigmoid's gradient
            return soft + ((self.mask_logits >= 0).to(soft.dtype) - soft).detach()
        return soft

    def hard_mask(self) -> torch.Tensor:
        if self.host("mask_is_fixed"):
            return self.fixed_mask
        return (self.mask_logits >= 0).to(self.fixed_mask.dtype)

    def gate_gain(self, masked: bool = True) -> float:
        """What the gates multiply an unmoved bit by at the current temperature.

        ``sigmoid(beta c) - sigmoid(-beta c) = tanh(beta c / 2)`` for a bit at its initial
        logit ``+-c``, times ``sigmoid(beta m_B0)`` for a soft mask still being searched (not with
        ``masked=False``: the weight without the mask). It tends to 1 as beta grows.
        """
        beta = self.temperature
        gain = math.tanh(beta * self.init_bit_logit / 2)
        if masked and not self.host("mask_is_fixed") and not self.straight_through_masks:
            gain /= 1 + math.exp(-beta * self.init_mask_logit)
        return gain

    def bit_weights(self) -> torch.Tensor:
        """``kappa_b``: what one bit of each position is worth in the relaxed weight, shape ``(n,)``.

        ``dW/dm^b = kappa_b * beta * f'(beta m^b)``, so a bit logit's gradient is the
        weight's gradient times ``kappa_b = s 2^b / ((2^n - 1) g(beta))``. Per output channel
        (``--granularity channel``) each channel's ``s``: shape ``(C, 1, ..., 1, n)``, which
        multiplies the logits ``(*shape, n)`` channel by channel.
        """
        scale = self.scale.detach().abs().clamp(min=1e-12)
        return scale.unsqueeze(-1) * self.bit_values / (self.levels * self.gate_gain())

    @torch.no_grad()
    def precondition_grads(self) -> None:
        """Divide the bit logits' gradients by ``kappa_b^2`` in place (when ``precondition`` is on). Run
        after gradient clipping, which so measures the loss's own gradients: clipping the
        preconditioned ones, ~100x the rest, scaled every other parameter down by ~1e-4."""
        if not self.precondition or self.latent_form_bits() is not None:  # LSQ's form: its bit logits do not train
            return
        # kappa_b^2 can be ~1e-4 (a 2-bit FC layer) to ~1e-10 (the low bits of 8): floor it far below either
        inverse = self.bit_weights().pow(2).clamp(min=1e-24).reciprocal()
        for logits in (self.bit_logits_pos, self.bit_logits_neg):
            if logits.grad is not None:
                logits.grad.mul_(inverse)

    def train_weight(self, masked: bool = True) -> torch.Tensor:
        """Eq. 5's relaxed weight; with ``masked=False`` every bit plane selected (what the bit logits still
        hold where the mask dropped their planes). In the LSQ form, the latent weight's straight-through round."""
        bits = self.latent_form_bits()
        if bits is not None:
            return lsq_quantize(self.latent, self.latent_step.abs() + 1e-12, bits)
        mask = self.soft_mask() if masked else torch.ones_like(self.fixed_mask)
        gain = self.gate_gain(masked)
        if self.scale.dim():
            # per output channel, Eq. 5 with s_c: the plane sum in units of s, then times each channel's s
            plane_weights = self.bit_values * mask / (self.levels * gain)
            units = gated_plane_sum(self.bit_logits_pos, self.bit_logits_neg, plane_weights, self.temperature)
            return units * self.scale
        step = self.scale / (self.levels * gain)
        plane_weights = self.bit_values * mask * step  # (n,): what each relaxed digit is worth
        return gated_plane_sum(self.bit_logits_pos, self.bit_logits_neg, plane_weights, self.temperature)

    def exact_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        bits = self.latent_form_bits()
        if bits is not None:  # as LSQWeight: the codes its training steps used, on the k-bit grid
            step = self.latent_step.detach().abs() + 1e-12
            return quantize_codes(self.latent.detach(), step * max_code(bits), bits), step.to(torch.float32)
        digits = (self.bit_logits_pos >= 0).to(torch.int32) - (self.bit_logits_neg >= 0).to(torch.int32)
        weights = (self.bit_values * self.hard_mask()).to(torch.int32)
        codes = (digits * weights).sum(-1, dtype=torch.int32)
        step = (self.scale.detach() / self.levels).to(torch.float32)
        return codes, step

    def nominal_bits(self) -> int:
        return int(self.hard_mask().sum())

    @torch.no_grad()
    def load_codes(
        self,
        codes: torch.Tensor,
        step: torch.Tensor,
        mask: torch.Tensor,
        fixed: bool,
        target: torch.Tensor | None = None,
    ) -> None:
        """Re-initialise the logits so that the layer holds exactly ``codes * step`` with ``mask``.

        Bits map to logits ``+-c`` and ``s = step * (2^n - 1)``; with the gate-gain
        normalisation of :meth:`train_weight` the relaxed weight then equals the exact
        one at every temperature until the logits move.

        With ``target`` (the weight the codes were rounded from), the rounding residual
        ``target - codes * step`` goes into the logits of the lowest selected bit instead:
        the relaxed weight at the current temperature equals ``target`` (clipped to 0.49 of
        a step around the codes, and to what one digit can express: with ``beta * c <= 1``,
        as at the default restart, all of that), the unit-step codes stay ``codes``, and a
        weight near a threshold its lowest bit decides has that bit's logit near 0, one
        small move from rounding the other way, as a latent weight sits under
        straight-through training.
        """
        pos, neg = to_bit_planes(codes, self.n_bits)
        c = self.init_bit_logit
        logits_pos = (pos.float() * 2 - 1) * c
        logits_neg = (neg.float() * 2 - 1) * c
        selected = torch.nonzero(mask.bool()).flatten()
        step = step.reshape(self.scale.shape).to(logits_pos)  # 0-d, or (C, 1, ..., 1) per output channel
        if target is not None and len(selected) and bool((step > 0).all()):
            low = int(selected[0])  # the lowest selected bit: its digit carries the residual
            unit = step * 2**low
            residual = ((target.to(logits_pos) - codes.to(logits_pos) * step) / unit).clamp(-0.49, 0.49)
            digit = (pos[..., low].float() - neg[..., low].float()) + residual  # wanted relaxed digit, in (-1.5, 1.5)
            beta = self.temperature
            gain = math.tanh(beta * c / 2)  # sigmoid(beta c) - sigmoid(-beta c): an unmoved bit's digit
            floor = 1 / (1 + math.exp(beta * c))  # sigmoid(-beta c): the digit of a logit at -c
            # sigmoid(beta m_p) - sigmoid(beta m_n) = gain * digit with the other logit of the pair left at -c
            p = (floor + gain * digit.clamp(min=0)).clamp(1e-6, 1 - 1e-6)
            n = (floor + gain * (-digit).clamp(min=0)).clamp(1e-6, 1 - 1e-6)
            logits_pos[..., low] = torch.logit(p) / beta
            logits_neg[..., low] = torch.logit(n) / beta
        self.bit_logits_pos.copy_(logits_pos)
        self.bit_logits_neg.copy_(logits_neg)
        self.fixed_mask.copy_(mask.float())
        self.set_host("mask_is_fixed", fixed)
        sign = torch.where(mask.bool(), 1.0, -1.0).to(self.mask_logits.device)
        self.mask_logits.copy_(sign * abs(self.init_mask_logit))
        self.mask_logits.requires_grad_(not fixed)
        self.scale.copy_(step * self.levels)

    @torch.no_grad()
    def requantized(
        self, bits: int, relaxed: bool = False, masked: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, step, mask)``: the layer rounded onto ``bits`` contiguous bits of its lattice.

        The source is the exact weight, or with ``relaxed`` the relaxed weight of Eq. 5 at
        the current temperature (which carries what the soft bits learned); ``masked=False`` (with
        ``relaxed``) reads every plane, the mask ignored: a layer whose mask dropped every bit has a
        relaxed weight of about 0 at a high beta, but its bit logits still hold a weight. The block of
        bits is placed where the rounding error (squared, clipping included) is least, at
        or below the highest bit the codes use; dropped low bits are rounded, not truncated.
        """
        codes, step = self.exact_codes()
        if relaxed:
            limit = self.levels
            codes = torch.clamp(torch.round(self.train_weight(masked) / step), -limit, limit).to(torch.int32)
        mask = torch.zeros(self.n_bits, device=codes.device)
        # per output channel, a channel's error in codes counts by its squared step (the error in weights)
        weights = step.reshape(-1).pow(2) if step.dim() else None
        new_codes, shift = round_to_bits(codes, bits, self.n_bits, row_weights=weights)
        mask[shift : shift + bits] = 1
        return new_codes.to(torch.int32), step, mask


@register("csq")
class CSQ(Method):
    """Bi-level continuous sparsification with a budget-aware bit-mask regulariser."""

    config_class = CSQConfig
    # Sec. IV-A: SGD, lr 0.1, cosine annealing, momentum 0.9, weight decay 5e-4 (CIFAR).
    training_defaults = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine"}
    # --recipe checkpoint: 0.003 (benchmarks/results/checkpoint_lr.md). 0.01 tied it in one-epoch resnet20 searches
    # and led it by 4.9 points in one-epoch MobileNetV2 ones (checkpoint_lr_mobilenet_v2.md); two-epoch resnet20
    # searches (the evidence protocol, 2 bits) collapsed layers to all-zero codes at both rates (0.01 seed 0,
    # 0.003 seed 1), a fault of the one-ramp beta schedule, not of the rate (issue 31): with Alg. 1's ramp (config
    # version 6) the seed-1 search at 0.003 ended at 85.46 % hold-out. 0.01 is not yet re-measured under it
    checkpoint_defaults = {"optimizer": "sgd", "lr": 0.003, "weight_decay": 5e-4, "schedule": "cosine"}
    # from trained weights the second stage restarts from them under the searched scheme (config version 8); from
    # scratch the loaded weights are random, so the search's own weights carry on (``search``, the field's default)
    checkpoint_fields = {"second_stage_start": "checkpoint"}
    finetune_defaults = checkpoint_defaults  # fine-tuning starts from a trained state too

    def __init__(self, config: CSQConfig, selection=None):
        super().__init__(config, selection)
        self._step = 0
        self._total_steps = 1
        self._ramp_start = 0  # step at which the current beta ramp began (0, or the projection step)
        self._steps_per_epoch = 1
        self._saved_steps_per_epoch: int | None = None  # from a checkpoint, until the next epoch starts
        self._reset_optimizer = False
        self.budget_changes: list[dict] = []
        self.avg_bits_before_projection: float | None = None
        self.made_contiguous: list[str] = []  # layers re-rounded onto contiguous bits when the scheme was fixed

    def make_weight_quantizer(self, name, layer, fixed_bits):
        return CSQWeight(layer.weight, self.config, fixed_bits)

    def searchable(self) -> dict[str, CSQWeight]:
        return {n: q for n, q in self.quantizers().items() if not q.host("mask_is_fixed")}

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        masks = {id(q.mask_logits) for q in self.quantizers().values()}
        steps = {id(q.latent_step) for q in self.quantizers().values() if q.trains_latent_when_fixed}
        no_decay = masks | steps | {id(q.scale) for q in self.quantizers().values()}
        params = list(model.parameters())  # frozen masks included: they thaw on --resume of a search
        groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay}]
        if self.config.mask_lr is None:  # the layout runs before mask_lr saved their optimizer in
            return [*groups, {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
        return [
            *groups,
            {"params": [p for p in params if id(p) in no_decay - masks], "weight_decay": 0.0},
            {"params": [p for p in params if id(p) in masks], "weight_decay": 0.0, "sgd_peak_lr": self.config.mask_lr},
        ]

    # -- temperature schedule (Alg. 1) ------------------------------------------------------
    @property
    def beta(self) -> float:
        cfg = self.config
        span = max(self._ramp_end() - self._ramp_start, 1)
        progress = min(max(self._step - self._ramp_start, 0) / span, 1.0)
        return cfg.beta_start * (cfg.beta_max / cfg.beta_start) ** progress

    def _ramp_end(self) -> int:
        """The step at which the current ramp reaches beta_max: the search's last step before the
        projection (Alg. 1's search stage ends with hard gates), or the run's last step."""
        if self.phase is Phase.SEARCH and self.config.ramp_to_projection and self.config.project_at < 1.0:
            return math.ceil(self.config.project_at * self._total_steps) - 1
        return self._total_steps - 1

    def _apply_beta(self) -> None:
        beta = self.beta
        mode = self.config.precondition
        for q in self.quantizers().values():
            q.temperature = beta
            q.precondition = mode == "always" or (mode == "fixed" and q.host("mask_is_fixed"))

    def on_epoch_start(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        saved, self._saved_steps_per_epoch = self._saved_steps_per_epoch, None
        if saved and saved != steps_per_epoch:  # resumed with another number of processes: steps are longer
            self._ramp_start = round(self._ramp_start * steps_per_epoch / saved)
        self._steps_per_epoch = steps_per_epoch
        self._total_steps = epochs * steps_per_epoch
        self._step = epoch * steps_per_epoch
        self._apply_beta()

    def on_step_end(self) -> None:
        self._step += 1
        if (
            self.phase is Phase.SEARCH
            and self.config.project_at < 1.0
            and self._step >= self.config.project_at * self._total_steps
        ):
            self.project()
        self._apply_beta()

    def wants_optimizer_reset(self) -> bool:
        """True once after the logits were re-initialised (their momentum is stale)."""
        reset, self._reset_optimizer = self._reset_optimizer, False
        return reset

    def project(self) -> None:
        """Meet the budget now, fix the scheme, and restart the bits from the exact codes (Alg. 1 stage 2)."""
        self._require_probe()
        self.avg_bits_before_projection = self.average_bits()
        relaxed = None
        if self.config.carry_residual:
            # what the soft bits learned, carried across the restart as residuals. A layer whose mask dropped
            # every bit has a masked weight of about 0; the budget step lifts it from its bit logits (mask
            # ignored), so that is its target too, or its restart would pull every weight toward 0
            with torch.no_grad():
                relaxed = {name: q.train_weight(masked=q.nominal_bits() > 0) for name, q in self.quantizers().items()}
        self.made_contiguous = self._make_contiguous()
        self.budget_changes = self._meet_budget()
        self._ramp_start = self._step
        self._restart_fixed(relaxed)
        self.phase = Phase.FINETUNE

    def _restart_fixed(self, targets: dict[str, torch.Tensor] | None = None) -> None:
        """Fix every layer's scheme and map its exact codes back to logits at the ramp's first beta
        (with ``targets``, each layer's residual to its target weight goes into its lowest bit)."""
        self._apply_beta()
        for name, q in self.quantizers().items():
            if q.latent_form_bits() is not None:  # already in the LSQ form (mpq finetune of such a run): train on
                continue
            target = None if targets is None else targets[name]
            codes, step = q.exact_codes()
            q.load_codes(codes, step, q.hard_mask(), fixed=True, target=target)
            q.to_latent(target)
        self._reset_optimizer = True

    def progress(self) -> dict[str, float]:
        return {"avg_bits": self.average_bits(), "beta": self.beta}

    # -- budget-aware regulariser (Eq. 6-7) ---------------------------------------------------
    def _average_bits_tensor(self) -> torch.Tensor:
        total = sum(layer.params for layer in self.layers.values())
        bits = [layer.weight_quantizer.hard_mask().sum() * layer.params for layer in self.layers.values()]
        return torch.stack(bits).sum() / total

    def before_optimizer_step(self) -> None:
        for q in self.quantizers().values():
            q.precondition_grads()

    def regularizer(self) -> torch.Tensor | None:
        if self.phase is not Phase.SEARCH or self.config.reg_strength == 0:
            return None
        searchable = list(self.searchable().values())
        if not searchable:
            return None
        delta_s = (self._average_bits_tensor() - self.search_target()).detach()  # Delta_S
        gates = torch.stack([torch.sigmoid(q.temperature * q.mask_logits).sum() for q in searchable])  # R(m_B)
        if self.config.reg_weighting == "size":
            sizes = torch.tensor([float(torch.Size(q.shape).numel()) for q in searchable], device=gates.device)
            gates = gates * sizes * (len(sizes) / sizes.sum())
        return self.config.reg_strength * delta_s * gates.sum()

    # -- end of search ---------------------------------------------------------------------------
    def finalize(self) -> FinalizeResult:
        """Harden every gate and make sure the budget is met; returns what the budget step did."""
        if self.phase is Phase.SEARCH:  # not projected during training (project_at = 1.0 or a short run)
            self.avg_bits_before_projection = self.average_bits()
            self.made_contiguous = self._make_contiguous()
            self.budget_changes = self._meet_budget()
        self.phase = Phase.FINAL
        after = self.average_bits()
        target = self.config.target_bits
        # target_bits is a ceiling (the budget step aims for the window below it, and lands there whenever a
        # choice can): met in nominal bits, and in what the file stores by the same count (magnitude bits and a sign)
        stored = self.budget_average() if self.config.budget_on == "stored" else None
        met = (
            stored <= target + AVERAGE_SLACK
            if stored is not None
            else after <= target + AVERAGE_SLACK and self._stored_code_bits() <= target + 1 + AVERAGE_SLACK
        )
        before = self.avg_bits_before_projection if self.avg_bits_before_projection is not None else after
        return FinalizeResult(
            budget_met=met,
            avg_bits_before_budget_step=before,
            budget_changes=self.budget_changes,
            facts={"made_contiguous": self.made_contiguous},
        )

    @torch.no_grad()
    def _stored_code_bits(self) -> float:
        """Bits per weight the packed file stores for the codes (fields and code tables, not the steps),
        averaged over quantized weights."""
        total = bits = 0
        for q in self.quantizers().values():
            codes = q.exact_codes()[0]
            plan = plan_codes(codes)
            bits += plan.width * codes.numel() + 32 * (plan.table.numel() if plan.table is not None else 0)
            total += codes.numel()
        return bits / max(total, 1)

    @torch.no_grad()
    def _make_contiguous(self) -> list[str]:
        """Re-round every searchable layer whose hard mask has gaps onto as many contiguous bits
        (``contiguous_bits``); returns the layers changed."""
        if not self.config.contiguous_bits:
            return []
        changed = []
        for name, q in self.searchable().items():
            selected = torch.nonzero(q.hard_mask()).flatten().tolist()
            if selected and selected[-1] - selected[0] + 1 != len(selected):
                q.load_codes(*q.requantized(len(selected), relaxed=True), fixed=False)
                changed.append(name)
        return changed

    @torch.no_grad()
    def _meet_budget(self) -> list[dict]:
        """Move the hard scheme into ``[target - tol, target]`` at the least measured loss.

        Options per searchable layer: leave it, or round its relaxed weight onto 0..n
        contiguous bits (:func:`mpq_cli.budget.budget_step`).
        """

        def apply(name: str, bits: int):
            q = self.layers[name].weight_quantizer
            masked = q.nominal_bits() > 0  # from 0 bits (a layer that may be at 0), as a lift: from its bit logits
            return trial(
                q,
                lambda: q.load_codes(*q.requantized(bits, relaxed=True, masked=masked), fixed=True),
                lambda: q.mask_logits.requires_grad_(True),
            )

        def lift(name: str, bits: int) -> None:  # a layer at 0 bits: from what its bit logits hold, mask ignored
            q = self.layers[name].weight_quantizer
            q.load_codes(*q.requantized(bits, relaxed=True, masked=False), fixed=True)

        current = {n: q.nominal_bits() for n, q in self.quantizers().items()}
        candidates = {n: range(q.n_bits + 1) for n, q in self.searchable().items()}
        return self._budget_step(current, candidates, apply, lift)

    # -- fine-tuning (Alg. 1, optional second stage) ----------------------------------------------
    def start_finetune(self) -> None:
        """Fix q_B = I(m_B >= 0), rewind beta, train only s, m_p, m_n (from the exact codes)."""
        self._step = self._ramp_start = 0
        self._restart_fixed()
        self.phase = Phase.FINETUNE
        self.budget_changes, self.avg_bits_before_projection = [], None

    def state_dict(self) -> dict:
        return {
            "phase": self.phase.value,
            "step": self._step,
            "total_steps": self._total_steps,
            "ramp_start": self._ramp_start,
            "steps_per_epoch": self._steps_per_epoch,
            "budget_changes": self.budget_changes,
            "avg_bits_before_projection": self.avg_bits_before_projection,
            "made_contiguous": self.made_contiguous,
        }

    def load_state_dict(self, state: dict) -> None:
        self.phase = Phase(state["phase"])
        self._step = int(state.get("step", 0))
        self._total_steps = int(state.get("total_steps", 1))
        self._ramp_start = int(state.get("ramp_start", 0))
        self._saved_steps_per_epoch = state.get("steps_per_epoch")
        self.budget_changes = state.get("budget_changes", [])
        self.avg_bits_before_projection = state.get("avg_bits_before_projection")
        self.made_contiguous = list(state.get("made_contiguous", []))
        for q in self.quantizers().values():
            q.mask_logits.requires_grad_(not q.host("mask_is_fixed"))
            q.train_form()
        self._apply_beta()
