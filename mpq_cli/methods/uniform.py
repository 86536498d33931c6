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
from ..layers import module_paths, quantizable_layers
from ..packing.bitpack import packed_nbytes
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
        if self.budget_on == "stored" and self.target_bits < 2:
            raise MpqError("--budget-on stored: a sign and at least one magnitude bit need --target-bits 2 or more")


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

    def prepare(self, model: nn.Module, loss_probe=None) -> None:
        self.width = int(round(self.config.target_bits))
        if self.config.budget_on == "stored":
            self.width = self._widest_under_stored_ceiling(model)
        super().prepare(model, loss_probe)

    def _widest_under_stored_ceiling(self, model: nn.Module) -> int:
        """The most magnitude bits whose file, every free layer's codes at full width (a sign on top, fields
        padded to whole bytes, a 4-byte step), stays within ``target_bits`` stored bits per weight: an
        upper bound on what the file stores, so the ceiling holds (uniform has one width: the slack left is
        what a whole bit more would pass)."""
        paths, candidates = module_paths(model), quantizable_layers(model)
        layers = {n: m.weight.numel() for n, m in candidates.items() if not self.selection.is_fp(*paths[id(m)])}
        fixed = {n: self.selection.fixed_bits(*paths[id(candidates[n])]) for n in layers}
        ceiling = self.config.target_bits * sum(layers.values())

        def stored(n: int, bits: int) -> int:
            return 8 * (packed_nbytes(n, bits + 1) + 4) if bits else 0

        for width in range(int(round(self.config.target_bits)) - 1, 0, -1):
            used = sum(stored(n, width if fixed[name] is None else fixed[name]) for name, n in layers.items())
            if used <= ceiling:
                return width
        return 1  # even 1 bit is over: the run says so (budget_met false)

    def make_weight_quantizer(self, name, layer, fixed_bits):
        return UniformWeight(layer.weight, self.width if fixed_bits is None else fixed_bits)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        scales = [q.scale for q in self.quantizers().values()]
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
