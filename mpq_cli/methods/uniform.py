"""Uniform-precision baseline: every layer at ``round(target_bits)`` bits.

Quantization-aware training with a straight-through round and a learnable
per-layer scale, on an FP latent weight. Bits are counted as CSQ and BSQ count
them: ``n`` magnitude bits plus a sign (codes in ``[-(2**n-1), 2**n-1]``), so a
uniform 2-bit layer stores the same number of bits as a CSQ layer with 2 selected
bits. It is what a user would do instead of a mixed-precision search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MpqError
from ..quant.primitives import fake_quantize, max_code, quantize_codes
from .base import FinalizeResult, Method, MethodConfig, Phase, WeightQuantizer, register


@dataclass
class UniformConfig(MethodConfig):
    """Uniform QAT baseline; ``target_bits`` is rounded to the layers' bits."""

    version: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_bits is None:
            raise MpqError("this method needs --target-bits")
        if not float(self.target_bits).is_integer():
            raise MpqError(
                f"uniform puts every layer at one width: --target-bits must be a whole number, got "
                f"{self.target_bits:g} (a mixed-precision method reaches fractional averages)"
            )


class UniformWeight(WeightQuantizer):
    """Latent FP weight, learnable scale ``s``; codes ``round(clip(W/s) * (2^n - 1))``."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__(weight.shape)
        self.bits = bits
        self.weight = nn.Parameter(weight.detach().clone())
        self.scale = nn.Parameter(weight.detach().abs().max().clamp(min=1e-8).reshape(()))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def train_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.scale.abs() + 1e-12, self.bits)

    def exact_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale.detach().abs() + 1e-12
        codes = quantize_codes(self.weight.detach(), scale, self.bits)
        step = scale / max_code(self.bits) if self.bits else torch.zeros_like(scale)
        return codes, step.to(torch.float32)

    def nominal_bits(self) -> int:
        return self.bits


@register("uniform")
class Uniform(Method):
    """Every quantized layer at the same bits (``--fix-bits`` overrides single layers)."""

    config_class = UniformConfig
    training_defaults = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0, "schedule": "cosine"}
    finetune_defaults = training_defaults

    def make_weight_quantizer(self, name, layer, fixed_bits):
        bits = int(round(self.config.target_bits)) if fixed_bits is None else fixed_bits
        return UniformWeight(layer.weight, bits)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        scales = [q.scale for q in self.quantizers().values()]
        ids = {id(p) for p in scales}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "weight_decay": weight_decay}, {"params": scales, "weight_decay": 0.0}]

    def start_finetune(self) -> None:
        self.phase = Phase.FINETUNE

    def finalize(self) -> FinalizeResult:
        self.phase = Phase.FINAL
        return FinalizeResult(budget_met=True)  # every layer at the target's whole bits (or its --fix-bits)
