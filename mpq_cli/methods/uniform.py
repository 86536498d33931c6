"""Uniform-precision baseline: every layer at ``round(target_bits)`` bits.

Quantization-aware training on an FP latent weight with a straight-through round. Bits
are counted as CSQ and BSQ count them: ``n`` magnitude bits plus a sign (codes in
``[-(2**n-1), 2**n-1]``), so a uniform 2-bit layer stores the same number of bits as a
CSQ layer with 2 selected bits. It is what a user would do instead of a mixed-precision
search, and the baseline every method is compared with, so it is the strong one the
papers compare against (config version 2):

- each layer's clip starts where it rounds the layer's weight with the least squared
  error at its own width (``quant.primitives.least_squares_scale``), not at ``max|W|``,
  which at 1 bit + sign zeroes every weight under half the largest;
- the step is learned as in LSQ (Esser et al., ICLR 2020): the step itself is the
  parameter, its gradient through the clip and the straight-through round (Eq. 3),
  scaled by ``1 / sqrt(N * Q_P)`` (Sec. 2.2; ``quant.primitives.lsq_quantize``).
- ``--granularity channel``: one step per output channel, each started at its own channel's
  least-squares clip and learned as LSQ learns a layer's (``N`` is then a channel's weights).

Runs made with version 1 (clip at ``max|W|``, the clip itself learned with the plain
straight-through gradient) load and fine-tune as they were made: ``step_init`` ``max``
and ``step_grad`` ``plain``. First and last layers at 8 bits are the shared layer
selection's ``--edge-bits 8``, which every method takes.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MpqError
from ..layers import module_paths, quantizable_layers
from ..packing.bitpack import packed_nbytes
from ..quant.primitives import (
    fake_quantize,
    least_squares_scale,
    lsq_quantize,
    max_code,
    per_channel_max,
    quantize_codes,
)
from .base import FinalizeResult, Method, MethodConfig, Phase, WeightQuantizer, register

STEP_INIT = ("mse", "max")
STEP_GRAD = ("lsq", "plain")


@dataclass
class UniformConfig(MethodConfig):
    """Uniform QAT baseline; ``target_bits`` is rounded to the layers' bits.

    Args:
        step_init: where each layer's clip (its largest code's magnitude) starts: ``mse``, the clip whose
            grid rounds the layer's weight with the least squared error at the layer's width (grid search,
            then alternating least squares; never worse than max|W|), or ``max``, max|W| (version 1).
        step_grad: how the step learns: ``lsq``, the step is the parameter with LSQ's gradient (Esser et al.
            2020, Eq. 3) scaled by 1/sqrt(weights x (2^bits - 1)) (Sec. 2.2); or ``plain`` (version 1), the
            clip is the parameter with the unscaled straight-through gradient.
    """

    version: int = 2  # 2: step_init, step_grad (version 1 runs: max, plain)
    step_init: str = "mse"
    step_grad: str = "lsq"

    @classmethod
    def from_dict(cls, d: dict) -> UniformConfig:
        """A saved config; one of version 1 keeps the behaviour it was run with."""
        version = d.get("version", cls.version) if isinstance(d, dict) else cls.version
        if isinstance(version, int) and version < 2:
            d = {"step_init": "max", "step_grad": "plain", **d}
        return super().from_dict(d)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_bits is None:
            raise MpqError("this method needs --target-bits")
        if not float(self.target_bits).is_integer():
            raise MpqError(
                f"uniform puts every layer at one width: --target-bits must be a whole number, got "
                f"{self.target_bits:g} (a mixed-precision method reaches fractional averages)"
            )
        if self.budget_on == "stored" and self.target_bits < 2:
            raise MpqError("--budget-on stored: a sign and at least one magnitude bit need --target-bits 2 or more")
        if self.step_init not in STEP_INIT:
            raise MpqError(f"--step-init must be one of {', '.join(STEP_INIT)}, got {self.step_init!r}")
        if self.step_grad not in STEP_GRAD:
            raise MpqError(f"--step-grad must be one of {', '.join(STEP_GRAD)}, got {self.step_grad!r}")


class _LatentWeight(WeightQuantizer):
    """An FP latent weight trained through a straight-through round at ``bits`` bits."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__(weight.shape)
        self.bits = bits
        self.weight = nn.Parameter(weight.detach().clone())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def nominal_bits(self) -> int:
        return self.bits

    @abstractmethod
    def learned_step(self) -> nn.Parameter:
        """The parameter that sets the grid (kept out of weight decay)."""


def _initial_clip(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    # 0-d (one clip per layer) or (C, 1, ..., 1) (one per output channel), as given
    return (weight.detach().abs().max().clamp(min=1e-8) if scale is None else scale.detach()).clone()


class UniformWeight(_LatentWeight):
    """Version 1: a learnable clip ``s`` with the plain straight-through gradient; codes
    ``round(clip(W/s) * (2^n - 1))``. ``scale``: the initial clip (default max|W|)."""

    def __init__(self, weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None):
        super().__init__(weight, bits)
        self.scale = nn.Parameter(_initial_clip(weight, scale))

    def learned_step(self) -> nn.Parameter:
        return self.scale

    def train_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.scale.abs() + 1e-12, self.bits)

    def exact_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale.detach().abs() + 1e-12
        codes = quantize_codes(self.weight.detach(), scale, self.bits)
        step = scale / max_code(self.bits) if self.bits else torch.zeros_like(scale)
        return codes, step.to(torch.float32)


class LSQWeight(_LatentWeight):
    """A learned step ``s`` with LSQ's gradient (Sec. 2.1-2.2, Eq. 3); codes ``round(clip(W/s, -L, L))``,
    ``L = 2^n - 1``. ``scale``: the initial clip ``s * L`` (default max|W|)."""

    def __init__(self, weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None):
        super().__init__(weight, bits)
        self.step = nn.Parameter(_initial_clip(weight, scale) / max(max_code(bits), 1))  # s, LSQ Eq. 1

    def learned_step(self) -> nn.Parameter:
        return self.step

    def train_weight(self) -> torch.Tensor:
        return lsq_quantize(self.weight, self.step.abs() + 1e-12, self.bits)

    def exact_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step.detach().abs() + 1e-12
        # divided by the scale lsq_quantize's forward divides by: the codes the training steps used
        codes = quantize_codes(self.weight.detach(), step * max_code(self.bits), self.bits)
        return codes, (step if self.bits else torch.zeros_like(step)).to(torch.float32)


@register("uniform")
class Uniform(Method):
    """Every quantized layer at the same bits, its step learned as in LSQ from the least-squares clip
    (``--fix-bits`` and ``--edge-bits`` fix single layers)."""

    config_class = UniformConfig
    training_defaults = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0, "schedule": "cosine"}
    # --recipe checkpoint: the best mean hold-out top-1 over the trained resnet20 and MobileNetV2 references
    # (benchmarks/results/checkpoint_lr*.md): 0.003 ties 0.01 on resnet20 and leads it by 1.6 points on MobileNetV2
    checkpoint_defaults = {"optimizer": "sgd", "lr": 0.003, "weight_decay": 0.0, "schedule": "cosine"}
    finetune_defaults = training_defaults

    def prepare(self, model: nn.Module, loss_probe=None) -> None:
        self.selection = self.selection.with_edges(model)  # the stored ceiling counts the edges' fixed bits
        self.width = int(round(self.config.target_bits))
        if self.config.budget_on == "stored":
            self.width = self._widest_under_stored_ceiling(model)
        super().prepare(model, loss_probe)

    def _widest_under_stored_ceiling(self, model: nn.Module) -> int:
        """The most magnitude bits whose file, every free layer's codes at full width (a sign on top, fields
        padded to whole bytes, a 4-byte step per layer or per output channel), stays within ``target_bits``
        stored bits per weight: an upper bound on what the file stores, so the ceiling holds (uniform has one
        width: the slack left is what a whole bit more would pass)."""
        paths, candidates = module_paths(model), quantizable_layers(model)
        layers = {n: m.weight.numel() for n, m in candidates.items() if not self.selection.is_fp(*paths[id(m)])}
        fixed = {n: self.selection.fixed_bits(*paths[id(candidates[n])]) for n in layers}
        ceiling = self.config.target_bits * sum(layers.values())

        steps = {n: m.weight.shape[0] if self.config.granularity == "channel" else 1 for n, m in candidates.items()}

        def stored(name: str, bits: int) -> int:
            return 8 * (packed_nbytes(layers[name], bits + 1) + 4 * steps[name]) if bits else 0

        for width in range(int(round(self.config.target_bits)) - 1, 0, -1):
            used = sum(stored(name, width if fixed[name] is None else fixed[name]) for name in layers)
            if used <= ceiling:
                return width
        return 1  # even 1 bit is over: the run says so (budget_met false)

    def make_weight_quantizer(self, name, layer, fixed_bits):
        bits = self.width if fixed_bits is None else fixed_bits
        granularity = self.config.granularity
        if self.config.step_init == "mse":
            scale = least_squares_scale(layer.weight, bits, granularity=granularity)
        else:
            scale = per_channel_max(layer.weight, granularity)
        quantizer = LSQWeight if self.config.step_grad == "lsq" else UniformWeight
        return quantizer(layer.weight, bits, scale)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        scales = [q.learned_step() for q in self.quantizers().values()]
        ids = {id(p) for p in scales}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "weight_decay": weight_decay}, {"params": scales, "weight_decay": 0.0}]

    def start_finetune(self) -> None:
        self.phase = Phase.FINETUNE

    def finalize(self) -> FinalizeResult:
        self.phase = Phase.FINAL
        if self.config.budget_on == "stored":
            return FinalizeResult(budget_met=self.budget_average() <= self.config.target_bits + 1e-9)
        # every layer at the target's whole bits; a --fix-bits override is the user's own choice and may put
        # the average above them (bits_under_budget then says by how much)
        return FinalizeResult(budget_met=True)
