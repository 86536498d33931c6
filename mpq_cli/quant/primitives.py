"""Symmetric linear quantization, written once for every method.

Conventions used across mpq: an ``n``-bit layer stores integer ``codes`` in
``[-(2**n - 1), 2**n - 1]`` (``n`` magnitude bits plus a sign, as BSQ and CSQ count
bits) and one float ``step``; the weight is exactly ``codes.to(float32) * step``.
For a layer whose scale is ``s`` (the largest representable magnitude),
``step = s / (2**n - 1)``.
"""

from __future__ import annotations

import torch


def max_code(bits: int) -> int:
    """Largest code magnitude of an ``bits``-bit sign-magnitude layer (``2**bits - 1``)."""
    if bits < 0:
        raise ValueError(f"bits must be >= 0, got {bits}")
    return (1 << bits) - 1


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass (STE)."""
    return x + (torch.round(x) - x).detach()


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Integer codes of ``weight`` on the ``bits``-bit grid spanning ``[-scale, scale]``.

    Returns an ``int32`` tensor; values beyond ``scale`` are clipped.
    """
    levels = max_code(bits)
    if levels == 0:
        return torch.zeros_like(weight, dtype=torch.int32)
    scaled = weight / scale * levels
    return torch.clamp(torch.round(scaled), -levels, levels).to(torch.int32)


def dequantize(codes: torch.Tensor, step: torch.Tensor | float) -> torch.Tensor:
    """The exact float weight of integer ``codes``: ``codes * step`` in float32.

    Every quantized forward pass and every decoder goes through this one product, so
    the evaluated model and the exported model are bit-for-bit the same. Adding +0.0
    turns the -0.0 that a zero code times a negative step gives into +0.0 (and changes
    nothing else), so a zero weight has one bit pattern however it was stored.
    """
    return codes.to(torch.float32) * step + 0.0


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through round and a learnable ``scale``.

    Gradients reach ``weight`` inside the clip range (zero outside) and reach
    ``scale`` through both the normalisation and the step (as in LSQ/PACT).
    """
    levels = max_code(bits)
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=weight.device, dtype=weight.dtype)
    if levels == 0:  # all zeros, still a function of weight and scale: zero gradients, not absent ones (DDP)
        return weight * 0.0 + scale * 0.0
    return _FakeQuantize.apply(weight, scale, levels)


class _FakeQuantize(torch.autograd.Function):
    """:func:`fake_quantize` keeping only its inputs for the backward pass.

    Autograd's graph of ``round(clamp(w / s) * L) * s / L`` with a straight-through round
    keeps about five weight-sized tensors per layer until the backward pass; the gradients
    below are recomputed from ``w`` and ``s``: ``dq/dw = 1`` strictly inside the clip range (0 at
    its bounds and beyond, as torch.clamp's gradient), ``dq/ds = round(n) / L - w / s`` inside
    and ``round(n) / L = sign(w)`` elsewhere.
    """

    @staticmethod
    def forward(ctx, weight, scale, levels):
        ctx.save_for_backward(weight, scale)
        ctx.levels = levels
        codes = torch.round(torch.clamp(weight / scale, -1.0, 1.0) * levels)
        return codes * (scale / levels)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        levels = ctx.levels
        ratio = weight / scale
        inside = ratio.abs() < 1.0  # as torch.clamp's gradient: zero at the bounds too
        grad_weight = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            codes = torch.round(torch.clamp(ratio, -1.0, 1.0) * levels)
            per_weight = codes.div_(levels).sub_(ratio.mul_(inside))
            grad_scale = (grad * per_weight).sum_to_size(scale.shape)
        return grad_weight, grad_scale, None
