"""CSQ: bi-level continuous sparsification (Xiao, Yang et al., DAC 2023).

Each quantized layer holds a scale ``s``, bit logits ``m_p``/``m_n`` of shape
``(*weight.shape, n)`` and bit-mask logits ``m_B`` of shape ``(n,)``. Its weight is
Eq. (5)::

    W = s / (2^n - 1) * sum_b (f(m_p^b) - f(m_n^b)) * 2^b * f(m_B^b),   f(x) = sigmoid(beta * x)

computed for all bits at once as one contraction over the last axis. ``beta`` grows
exponentially from ``beta_start`` to ``beta_max`` over the search (Alg. 1; we step it
every batch rather than every epoch so that short runs see a smooth schedule). The
loss adds ``lambda * Delta_S * sum_layers sum_b f(m_B^b)`` (Eq. 6-7) with ``Delta_S``
the current average bits, counted from ``m_B >= 0`` and weighted by each layer's
parameters, minus the target.

Decisions where the paper or its public code leaves room (see docs/methods/csq.md):

- Start from the checkpoint's 8-bit quantization: bits map to logits ``+-c`` (the
  public code's 0/1 logits never harden), ``m_B`` starts at ``+c_B`` (all bits
  selected), and ``s`` is divided by the gate gain at ``beta_start`` so the relaxed
  model equals the 8-bit model at step 0.
- Evaluation always uses unit-step gates (exact integer codes), so every reported
  accuracy is that of an exactly quantized model, and the run keeps the codes.
- Budget guarantee: if the hard scheme ends outside ``[target - tol, target]``, a
  loss-aware step measures, layer by layer, the loss of dropping its lowest-logit
  selected bits (or adding its highest-logit unselected ones) on a few training
  batches, and an exact integer program picks the per-layer changes with the least
  summed loss that land in the window (see :mod:`mpq_cli.budget`).
- Weight decay on bit logits and the rest of the model as in the paper; none on
  ``m_B`` (the budget term alone drives it) or on ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..budget import choose_options
from ..errors import MpqError
from ..quant.bits import bit_values, to_bit_planes
from ..quant.primitives import quantize_codes
from .base import Method, MethodConfig, Phase, WeightQuantizer, register


@dataclass
class CSQConfig(MethodConfig):
    """CSQ hyperparameters; defaults from the paper (Sec. IV-A) unless marked *ours*.

    Args:
        max_bits: bit planes per layer, n (Sec. IV-A: uniform 8-bit).
        reg_strength: base regularisation strength lambda (Eq. 7; Sec. IV-C: 0.01).
        beta_start: initial temperature beta_0 (Alg. 1: 1).
        beta_max: final temperature (Sec. IV-A: 200, reached at the end of the search).
        init_bit_logit: *ours*: |logit| a 0/1 bit of the initial 8-bit codes maps to.
        init_mask_logit: *ours*: initial m_B (positive: every bit selected).
        budget_tolerance: *ours*: the final average bits lands in [target - tol, target].
    """

    version: int = 1
    target_bits: float = 3.0
    max_bits: int = 8
    reg_strength: float = 0.01
    beta_start: float = 1.0
    beta_max: float = 200.0
    init_bit_logit: float = 2.0
    init_mask_logit: float = 0.5
    budget_tolerance: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.max_bits <= 16:
            raise MpqError(f"max_bits must be in 1..16, got {self.max_bits}")
        if self.target_bits > self.max_bits:
            raise MpqError(f"--target-bits {self.target_bits} exceeds CSQ's {self.max_bits} bit planes")
        if self.beta_start <= 0 or self.beta_max < self.beta_start:
            raise MpqError("CSQ needs 0 < beta_start <= beta_max")
        if self.reg_strength < 0 or self.budget_tolerance < 0:
            raise MpqError("reg_strength and budget_tolerance must be >= 0")
        if self.init_bit_logit <= 0:
            raise MpqError("init_bit_logit must be > 0")


class CSQWeight(WeightQuantizer):
    """One layer's CSQ parameters (Eq. 5)."""

    def __init__(self, weight: torch.Tensor, cfg: CSQConfig, fixed_bits: int | None):
        super().__init__(weight.shape)
        n = cfg.max_bits
        self.n_bits = n
        max_abs = weight.detach().abs().max().clamp(min=1e-8)
        pos, neg = to_bit_planes(quantize_codes(weight.detach(), max_abs, n), n)
        c = cfg.init_bit_logit
        self.bit_logits_pos = nn.Parameter((pos.float() * 2 - 1) * c)  # m_p, (*shape, n)
        self.bit_logits_neg = nn.Parameter((neg.float() * 2 - 1) * c)  # m_n, (*shape, n)
        self.mask_logits = nn.Parameter(torch.full((n,), float(cfg.init_mask_logit), device=weight.device))  # m_B
        self.register_buffer("bit_values", bit_values(n, weight.device))  # 2^b
        self.register_buffer("fixed_mask", torch.ones(n, device=weight.device))  # q_B once the scheme is fixed
        self.register_buffer("mask_is_fixed", torch.tensor(False, device=weight.device))
        if fixed_bits is not None:
            if fixed_bits > n:
                raise MpqError(f"--fix-bits {fixed_bits} exceeds CSQ's {n} bit planes")
            # keep the top bits: the fixed layer's codes are the 8-bit codes truncated to them
            self.fixed_mask.copy_((torch.arange(n, device=weight.device) >= n - fixed_bits).float())
            self.mask_is_fixed.fill_(True)
            with torch.no_grad():
                self.mask_logits.copy_((self.fixed_mask * 2 - 1) * abs(cfg.init_mask_logit))
        beta = cfg.beta_start
        gain = torch.sigmoid(torch.tensor(beta * c)) - torch.sigmoid(torch.tensor(-beta * c))
        if fixed_bits is None:
            gain = gain * torch.sigmoid(torch.tensor(beta * cfg.init_mask_logit))
        self.scale = nn.Parameter((max_abs / gain).reshape(()))  # s
        self.temperature = beta  # beta, set by the method every step

    def extra_repr(self) -> str:
        return f"shape={self.shape}, n_bits={self.n_bits}"

    @property
    def levels(self) -> int:
        return 2 ** self.n_bits - 1

    def soft_mask(self) -> torch.Tensor:
        if bool(self.mask_is_fixed):
            return self.fixed_mask
        return torch.sigmoid(self.temperature * self.mask_logits)

    def hard_mask(self) -> torch.Tensor:
        if bool(self.mask_is_fixed):
            return self.fixed_mask
        return (self.mask_logits >= 0).to(self.fixed_mask.dtype)

    def train_weight(self) -> torch.Tensor:
        beta = self.temperature
        digits = torch.sigmoid(beta * self.bit_logits_pos) - torch.sigmoid(beta * self.bit_logits_neg)
        return torch.matmul(digits, self.bit_values * self.soft_mask()) * (self.scale / self.levels)

    def exact_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        digits = (self.bit_logits_pos >= 0).to(torch.int32) - (self.bit_logits_neg >= 0).to(torch.int32)
        weights = (self.bit_values * self.hard_mask()).to(torch.int32)
        codes = (digits * weights).sum(-1, dtype=torch.int32)
        step = (self.scale.detach() / self.levels).to(torch.float32)
        return codes, step

    def nominal_bits(self) -> int:
        return int(self.hard_mask().sum())

    def set_bit(self, bit: int, selected: bool) -> None:
        """Select or drop one bit by moving its mask logit across zero (budget step)."""
        with torch.no_grad():
            magnitude = max(abs(float(self.mask_logits[bit])), 1e-3)
            self.mask_logits[bit] = magnitude if selected else -magnitude


@register("csq")
class CSQ(Method):
    """Bi-level continuous sparsification with a budget-aware bit-mask regulariser."""

    config_class = CSQConfig
    # Sec. IV-A: SGD, lr 0.1, cosine annealing, momentum 0.9, weight decay 5e-4 (CIFAR).
    training_defaults = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine"}
    finetune_defaults = training_defaults

    def __init__(self, config: CSQConfig, selection=None):
        super().__init__(config, selection)
        self._step = 0
        self._total_steps = 1

    def make_weight_quantizer(self, name, layer, fixed_bits):
        return CSQWeight(layer.weight, self.config, fixed_bits)

    def searchable(self) -> dict[str, CSQWeight]:
        return {n: q for n, q in self.quantizers().items() if not bool(q.mask_is_fixed)}

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        no_decay = {id(q.mask_logits) for q in self.quantizers().values()}
        no_decay |= {id(q.scale) for q in self.quantizers().values()}
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]

    # -- temperature schedule (Alg. 1) ------------------------------------------------------
    @property
    def beta(self) -> float:
        cfg = self.config
        progress = min(self._step / max(self._total_steps - 1, 1), 1.0)
        return cfg.beta_start * (cfg.beta_max / cfg.beta_start) ** progress

    def _apply_beta(self) -> None:
        beta = self.beta
        for q in self.quantizers().values():
            q.temperature = beta

    def on_epoch_start(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        self._total_steps = epochs * steps_per_epoch
        self._step = epoch * steps_per_epoch
        self._apply_beta()

    def on_step_end(self) -> None:
        self._step += 1
        self._apply_beta()

    def progress(self) -> dict[str, float]:
        return {"avg_bits": self.average_bits(), "beta": self.beta}

    # -- budget-aware regulariser (Eq. 6-7) ---------------------------------------------------
    def _average_bits_tensor(self) -> torch.Tensor:
        total = sum(layer.params for layer in self.layers.values())
        bits = [layer.weight_quantizer.hard_mask().sum() * layer.params for layer in self.layers.values()]
        return torch.stack(bits).sum() / total

    def regularizer(self) -> torch.Tensor | None:
        if self.phase is not Phase.SEARCH or self.config.reg_strength == 0:
            return None
        searchable = list(self.searchable().values())
        if not searchable:
            return None
        delta_s = (self._average_bits_tensor() - self.config.target_bits).detach()  # Delta_S
        gates = torch.stack([torch.sigmoid(q.temperature * q.mask_logits).sum() for q in searchable]).sum()
        return self.config.reg_strength * delta_s * gates

    # -- end of search ---------------------------------------------------------------------------
    def finalize(self, loss_probe) -> dict:
        """Harden every gate and meet the budget; returns what the budget step did."""
        self.phase = Phase.FINAL
        before = self.average_bits()
        changes = self._meet_budget(loss_probe)
        after = self.average_bits()
        target, tol = self.config.target_bits, self.config.budget_tolerance
        met = target - tol - 1e-9 <= after <= target + 1e-9
        return {"avg_bits_before_budget_step": before, "budget_changes": changes, "budget_met": met}

    @torch.no_grad()
    def _meet_budget(self, loss_probe) -> list[dict]:
        """Move the hard scheme into ``[target - tol, target]`` at the least measured loss.

        For every searchable layer alone we measure the probe loss after dropping its
        1, 2, ... lowest-logit selected bits and after adding its 1, 2, ...
        highest-logit unselected bits; an exact integer program then picks one option
        per layer, assuming the layers' loss changes add up.
        """
        target, tol = self.config.target_bits, self.config.budget_tolerance
        avg = self.average_bits()
        if target - tol - 1e-9 <= avg <= target + 1e-9:
            return []
        base_loss = loss_probe()
        searchable = self.searchable()
        names = list(self.layers)
        options, bit_sets = [], []
        for name in names:
            q = self.layers[name].weight_quantizer
            current = q.nominal_bits()
            if name not in searchable:
                options.append([(current, 0.0)])
                bit_sets.append([None])
                continue
            saved = q.mask_logits.detach().clone()
            selected = (saved >= 0).nonzero().flatten()
            unselected = (saved < 0).nonzero().flatten()
            drop_order = selected[saved[selected].argsort()].tolist()
            add_order = unselected[saved[unselected].argsort(descending=True)].tolist()
            layer_options, layer_sets = [(current, 0.0)], [None]
            for order, selecting in ((drop_order, False), (add_order, True)):
                for k in range(1, len(order) + 1):
                    for bit in order[:k]:
                        q.set_bit(bit, selecting)
                    layer_options.append((q.nominal_bits(), loss_probe() - base_loss))
                    layer_sets.append(q.mask_logits.detach().clone())
                    q.mask_logits.copy_(saved)
            options.append(layer_options)
            bit_sets.append(layer_sets)
        params = [self.layers[n].params for n in names]
        picks = None
        for low in (target - tol, 0.0):  # if the window cannot be met, at least stay under the target
            try:
                picks = choose_options(options, params, low, target)
                break
            except MpqError:
                continue
        if picks is None:
            return []
        changes = []
        for name, pick, opts, sets in zip(names, picks, options, bit_sets):
            if sets[pick] is None:
                continue
            q = self.layers[name].weight_quantizer
            before = q.nominal_bits()
            q.mask_logits.copy_(sets[pick])
            changes.append({"layer": name, "bits_before": before, "bits_after": q.nominal_bits(),
                            "probe_loss_change_alone": opts[pick][1]})
        final_loss = loss_probe()
        for change in changes:
            change["probe_loss_before"], change["probe_loss_after"] = base_loss, final_loss
        return changes

    # -- fine-tuning (Alg. 1, optional second stage) ----------------------------------------------
    def start_finetune(self) -> None:
        """Fix q_B = I(m_B >= 0), rewind beta, train only s, m_p, m_n."""
        for q in self.quantizers().values():
            q.fixed_mask.copy_(q.hard_mask())
            q.mask_is_fixed.fill_(True)
            q.mask_logits.requires_grad_(False)
        self.phase = Phase.FINETUNE
        self._step = 0

    def state_dict(self) -> dict:
        return {"phase": self.phase.value, "step": self._step, "total_steps": self._total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.phase = Phase(state["phase"])
        self._step = int(state.get("step", 0))
        self._total_steps = int(state.get("total_steps", 1))
        if self.phase is not Phase.SEARCH:
            for q in self.quantizers().values():
                if bool(q.mask_is_fixed):
                    q.mask_logits.requires_grad_(False)
        self._apply_beta()
