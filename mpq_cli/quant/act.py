"""Activation quantization with a learnable clip (PACT, Choi et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from .host import HostMirrored
from .primitives import max_code


class PACT(HostMirrored):
    """Quantize a layer's input to ``bits`` bits inside a learnable clip ``[0, alpha]``.

    Inputs that can be negative (the normalised image, a linear bottleneck) are
    detected on the first training batch and then use the symmetric clip
    ``[-alpha, alpha]`` with the same number of levels on each side; ``alpha`` starts at
    that batch's largest magnitude. With ``clip`` the clip is fixed at that value instead
    (BSQ's ReLU6-style quantization at 4 bits and above: ``clip=6``).
    """

    kind = "pact"  # how a run directory and a packed file name this quantizer

    def __init__(self, bits: int, clip: float | None = None):
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"activation bits must be in 1..16, got {bits}")
        self.bits = bits
        self.fixed_clip = clip is not None
        self.alpha = nn.Parameter(
            torch.tensor(clip if clip is not None else 1.0), requires_grad=clip is None
        )  # clip value, PACT's alpha
        self.register_host_buffer("signed", False)
        self.register_host_buffer("initialised", False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.host("initialised"):
            with torch.no_grad():  # once, on the first batch (in training, every rank's first batch)
                seen = torch.stack([x.detach().abs().max().float(), (x.detach().min() < 0).float()])
                distributed.all_reduce_max([seen])  # every rank's first batch: one clip everywhere
                self.set_host("signed", bool(seen[1] > 0))
                if not self.fixed_clip:
                    self.alpha.copy_(seen[0].clamp(min=1e-3))
                self.set_host("initialised", True)
        signed = self.host("signed")
        alpha = self.alpha.abs() + 1e-8
        levels = max_code(self.bits) if not signed else max_code(self.bits - 1) or 1
        return _ClipRound.apply(x, alpha, signed, levels)


class _ClipRound(torch.autograd.Function):
    """``round(clip(x) / step) * step`` with ``step = alpha / levels`` and PACT's gradients (Eq. 3).

    The clip is ``[0, alpha]``, or ``[-alpha, alpha]`` when ``signed``. The rounding passes the
    gradient unchanged, so ``dy/dx = 1`` inside the clip (``0 <= x < alpha``; signed
    ``-alpha < x < alpha``) and ``dy/dalpha`` comes from the clip alone: 1 where ``x >= alpha``,
    -1 where ``x <= -alpha`` when signed, with no term from the step's dependence on alpha
    (that term is LSQ's, not PACT's). The backward pass needs only which region each input
    fell in, kept as one byte per input instead of the float tensors autograd's own graph of
    the clip and the straight-through round holds (an activation-sized float each).
    """

    @staticmethod
    def forward(ctx, x, alpha, signed, levels):
        lower = -alpha if signed else torch.zeros_like(alpha)
        clipped = torch.minimum(torch.maximum(x, lower), alpha)
        step = alpha / levels
        # region: 0 inside, 1 at or above alpha, 2 below the clip
        region = (x >= alpha).to(torch.uint8)
        region += (x <= lower if signed else x < lower).to(torch.uint8) * 2
        ctx.save_for_backward(region)
        ctx.signed = signed
        return torch.round(clipped / step) * step

    @staticmethod
    def backward(ctx, grad):
        (region,) = ctx.saved_tensors
        grad_x = grad * (region == 0) if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad = grad.float()  # summed in fp32: under --amp a bf16 sum of a whole activation loses alpha's gradient
            grad_alpha = (grad * (region == 1)).sum()
            if ctx.signed:
                grad_alpha = grad_alpha - (grad * (region == 2)).sum()
        return grad_x, grad_alpha, None, None


class BasisActivation(HostMirrored):
    """ALQ's activation quantizer (Qu et al. 2020, Sec. 4): ``x ~ x_ref + D gamma``.

    ``D`` is in ``{-1, +1}^(N x bits)`` and ``gamma > 0``, so an input takes the nearest
    of ``2^bits`` levels ``x_ref + b^T gamma`` (a binary search over the sorted levels).
    ``gamma`` and the reference ``x_ref`` follow a running average of the least-squares
    fit on each training batch (initialised by a greedy sketch of the first batch);
    in training the gradient passes straight through inside the levels' range and is
    zero outside it, as PACT's clip does. Evaluation returns the levels themselves, the
    same function the packed-file loader runs.
    """

    kind = "basis"

    def __init__(self, bits: int, momentum: float = 0.9, sample: int = 1 << 16):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"basis activation bits must be in 1..8, got {bits}")
        self.bits, self.momentum, self.sample = bits, momentum, sample
        self.register_buffer("gamma", torch.zeros(bits))
        self.register_buffer("x_ref", torch.zeros(()))
        self.register_host_buffer("initialised", False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def patterns(self) -> torch.Tensor:
        """``(2^bits, bits)`` rows of ``{-1, +1}``."""
        index = torch.arange(1 << self.bits, device=self.gamma.device)
        return ((index.unsqueeze(1) >> torch.arange(self.bits, device=self.gamma.device)) & 1).float() * 2 - 1

    def levels(self) -> torch.Tensor:
        """The ``2^bits`` values an input can take, ascending."""
        return torch.sort(self.x_ref + self.patterns() @ self.gamma).values

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.levels()
        midpoints = (levels[1:] + levels[:-1]) / 2
        return levels[torch.searchsorted(midpoints, x.float().contiguous())].to(x.dtype)

    @torch.no_grad()
    def _fit(self, x: torch.Tensor) -> None:
        from .alq import sketch

        flat = x.detach().float().reshape(-1)
        if flat.numel() > self.sample:  # a strided sample keeps the fit cheap on large maps
            flat = flat[:: flat.numel() // self.sample][: self.sample]
        if not self.host("initialised"):
            mean = flat.mean()
            _, coords, _ = sketch((flat - mean).unsqueeze(0), self.bits, sigma=0.0)
            self.gamma.copy_(coords[0])
            self.x_ref.copy_(mean)
            distributed.all_reduce_mean([self.gamma, self.x_ref])  # every rank's fit: one quantizer everywhere
            self.set_host("initialised", True)
            return
        levels_pm = self.patterns()  # rows b; value x_ref + b^T gamma
        values = self.x_ref + levels_pm @ self.gamma
        order = torch.argsort(values)
        ordered = values[order]
        nearest = order[torch.searchsorted((ordered[1:] + ordered[:-1]) / 2, flat.contiguous())]
        design = torch.cat([levels_pm[nearest], torch.ones_like(flat).unsqueeze(1)], 1)  # (N, bits + 1)
        gram = design.T @ design + 1e-6 * torch.eye(self.bits + 1, device=flat.device)
        solution = torch.linalg.solve_ex(gram, design.T @ flat)[0]  # positive definite; _ex does not sync
        gamma, x_ref = solution[:-1].abs(), solution[-1:]  # a negative gamma is its basis flipped
        distributed.all_reduce_mean([gamma, x_ref])
        self.gamma.mul_(self.momentum).add_(gamma, alpha=1 - self.momentum)
        self.x_ref.mul_(self.momentum).add_(x_ref[0], alpha=1 - self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.host("initialised"):
            self._fit(x)
        quantized = self.quantize(x)
        if not self.training:
            return quantized
        levels = self.levels()
        clipped = torch.clamp(x, levels[0], levels[-1])
        return clipped + (quantized - clipped).detach()
