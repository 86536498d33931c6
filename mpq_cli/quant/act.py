"""Activation quantization with a learnable clip (PACT, Choi et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn

from .primitives import max_code, ste_round


class PACT(nn.Module):
    """Quantize a layer's input to ``bits`` bits inside a learnable clip ``[0, alpha]``.

    Inputs that can be negative (the normalised image, a linear bottleneck) are
    detected on the first training batch and then use the symmetric clip
    ``[-alpha, alpha]`` with the same number of levels on each side; ``alpha`` starts at
    that batch's largest magnitude. With ``clip`` the clip is fixed at that value instead
    (BSQ's ReLU6-style quantization at 4 bits and above: ``clip=6``).
    """

    def __init__(self, bits: int, clip: float | None = None):
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"activation bits must be in 1..16, got {bits}")
        self.bits = bits
        self.fixed_clip = clip is not None
        self.alpha = nn.Parameter(torch.tensor(clip if clip is not None else 1.0),
                                  requires_grad=clip is None)  # clip value, PACT's alpha
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialised", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialised):
            with torch.no_grad():
                self.signed.fill_(bool(x.min() < 0))
                if not self.fixed_clip:
                    self.alpha.fill_(float(x.detach().abs().max().clamp(min=1e-3)))
                self.initialised.fill_(True)
        alpha = self.alpha.abs() + 1e-8
        lower = -alpha if bool(self.signed) else torch.zeros_like(alpha)
        clipped = torch.minimum(torch.maximum(x, lower), alpha)
        levels = max_code(self.bits) if not bool(self.signed) else max_code(self.bits - 1) or 1
        step = alpha / levels
        return ste_round(clipped / step) * step
