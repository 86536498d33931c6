"""Symmetric linear quantization, written once for every method.

Conventions used across mpq: an ``n``-bit layer stores integer ``codes`` in
``[-(2**n - 1), 2**n - 1]`` (``n`` magnitude bits plus a sign, as BSQ and CSQ count
bits) and a float ``step``: one for the layer (granularity ``tensor``) or one per output
channel (``channel``: the weight's first axis, for Conv2d and Linear alike); the weight is
exactly ``codes.to(float32) * step``. For a layer whose scale is ``s`` (the largest
representable magnitude), ``step = s / (2**n - 1)``.

A step is held in one of two shapes: 0-d (per tensor), or, per channel, ``(C, 1, ..., 1)`` inside a
quantizer (it multiplies the weight as it is) and ``(C,)`` in runs and files; :func:`dequantize` takes
either.
"""

from __future__ import annotations

import math

import torch

# Candidate-by-weight elements one pass of :func:`clipping_errors` holds (float32: 64 MiB), so a large
# layer's search over many candidate steps runs in slices instead of one (candidates, weights) tensor.
_ERROR_ELEMENTS = 1 << 24
GRANULARITIES = ("tensor", "channel")


def channel_view(step: torch.Tensor, ndim: int) -> torch.Tensor:
    """``step`` shaped to multiply a weight of ``ndim`` dimensions: a 1-d step (one per output channel) becomes
    ``(C, 1, ..., 1)``; a 0-d step, or one already of that shape, is returned as it is."""
    if step.dim() == 1 and ndim > 1:
        return step.reshape(-1, *([1] * (ndim - 1)))
    return step


def step_rows(weight: torch.Tensor, granularity: str) -> int:
    """How many steps a layer of this weight has: 1 per tensor, ``weight.shape[0]`` per channel."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    return weight.shape[0] if granularity == "channel" else 1


def per_channel_max(weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """``max|W|`` (at least 1e-8) over the layer (0-d) or over each output channel (``(C, 1, ..., 1)``)."""
    magnitude = weight.detach().abs()
    if granularity == "tensor":
        return magnitude.max().clamp(min=1e-8)
    rows = magnitude.reshape(weight.shape[0], -1).amax(1).clamp(min=1e-8)
    return rows.reshape(weight.shape[0], *([1] * (weight.dim() - 1)))


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
    """The exact float weight of integer ``codes``: ``codes * step`` in float32 (a 1-d ``step`` is one per
    output channel, the codes' first axis).

    Every quantized forward pass and every decoder goes through this one product, so
    the evaluated model and the exported model are bit-for-bit the same. Adding +0.0
    turns the -0.0 that a zero code times a negative step gives into +0.0 (and changes
    nothing else), so a zero weight has one bit pattern however it was stored.
    """
    if torch.is_tensor(step):
        step = channel_view(step, codes.dim())
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


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged in the forward pass, its gradient multiplied by ``scale`` (LSQ's ``gradscale``)."""
    return _GradScale.apply(x, scale)


class _GradScale(torch.autograd.Function):
    # a Function rather than LSQ's ``x * g + (x - x * g).detach()``, whose forward can differ from x by an ulp
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def lsq_quantize(weight: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with a learned step as LSQ defines it (Esser et al., ICLR 2020, Sec. 2.1-2.2).

    ``round(clip(w / step, -L, L)) * step`` with ``L = 2**bits - 1`` (the sign-magnitude codes every mpq
    layer stores: LSQ's ``Q_N = Q_P = L``). The round passes gradients straight through, so
    ``dq/dw = 1`` strictly inside the clip range and 0 outside; ``dq/dstep = round(w/step) - w/step``
    inside and ``-L`` / ``L`` below / above it (Eq. 3), and the step's gradient is multiplied by
    ``g = 1 / sqrt(N * L)`` for ``N`` weights per step (Sec. 2.2: the layer's weights, or a channel's when
    ``step`` is one per output channel, shaped ``(C, 1, ..., 1)``). Written as :func:`fake_quantize`
    of the scale ``step * L`` (whose gradient is that of the step divided by ``L``), so the forward pass
    computes the codes exactly as :func:`quantize_codes` of that scale does.
    """
    levels = max_code(bits)
    if levels == 0:
        return fake_quantize(weight, step, 0)
    g = 1.0 / math.sqrt(weight.numel() / max(step.numel(), 1) * levels)
    return fake_quantize(weight, grad_scale(step, g) * levels, bits)


def clipping_errors_rows(values: torch.Tensor, steps: torch.Tensor, levels: int) -> torch.Tensor:
    """:func:`clipping_errors` for each row of ``values`` ``(R, S)`` against its own candidate steps ``(R, K)``:
    shape ``(R, K)``, in slices of at most ``_ERROR_ELEMENTS`` elements."""
    rows = values.reshape(values.shape[0], 1, -1)
    per_pass = max(1, _ERROR_ELEMENTS // max(rows.numel(), 1))
    errors = []
    for chunk in steps.to(values.dtype).split(per_pass, dim=1):
        chunk = chunk.unsqueeze(-1)  # (R, k, 1)
        grid = torch.clamp(torch.round(rows / chunk), -levels, levels) * chunk
        errors.append((grid - rows).pow(2).sum(-1))
    return torch.cat(errors, 1) if errors else values.new_zeros(values.shape[0], 0)


def clipping_errors(values: torch.Tensor, steps: torch.Tensor, levels: int) -> torch.Tensor:
    """Squared error of rounding ``values`` onto each candidate grid, clipping included: shape ``(K,)``.

    Candidate ``k`` is the grid ``steps[k] * {-levels, ..., levels}``; its error is
    ``sum((clamp(round(v / steps[k]), -levels, levels) * steps[k] - v) ** 2)`` over every value, in
    ``values``' dtype. Candidates are measured in slices of at most ``_ERROR_ELEMENTS`` elements.
    """
    flat = values.reshape(1, -1)
    per_pass = max(1, _ERROR_ELEMENTS // max(flat.shape[1], 1))
    errors = []
    for chunk in steps.to(values.dtype).reshape(-1, 1).split(per_pass):
        grid = torch.clamp(torch.round(flat / chunk), -levels, levels) * chunk
        errors.append((grid - flat).pow(2).sum(1))
    return torch.cat(errors) if errors else values.new_zeros(0)


def least_squares_scale(
    weight: torch.Tensor,
    bits: int,
    candidates: int = 100,
    sample: int = 1 << 16,
    iterations: int = 10,
    granularity: str = "tensor",
) -> torch.Tensor:
    """The clip ``s`` (largest magnitude of the ``bits``-bit grid) that least-squares rounds ``weight``, for
    the whole layer (``granularity`` ``tensor``) or for each output channel on its own (``channel``).

    Minimises ``||W - dequantize(quantize_codes(W, s, bits), s / L)||^2``, clipping included (per channel:
    each channel's own error, which sums to the layer's):

    1. a grid search over ``candidates`` clips ``max|W| * k / candidates`` (``k = 1..candidates``), then
       20 more within one grid step of the best, measured on at most ``sample`` weights (every
       ``ceil(N / sample)``-th of each row, at least one: evenly spread, no random draw, so a large layer
       costs what a small one does);
    2. the better of that clip and ``max|W|`` on every weight;
    3. alternating least squares from there: the step that fits the codes best,
       ``<W, codes> / <codes, codes>``, then the codes of that step, until the codes stop changing or
       ``iterations`` rounds. Each round lowers the error or leaves it (the step is optimal for the codes,
       the rounded codes for the step),

    so the result is never worse than ``max|W|``, the clip that keeps every weight unclipped. Every step is
    computed for all channels at once.

    Returns a float32 tensor on ``weight``'s device, 0-d per tensor and ``(C, 1, ..., 1)`` per channel:
    ``max|W|`` (at least 1e-8) at 0 bits or for a zero weight (channel).
    """
    count = step_rows(weight, granularity)
    rows = weight.detach().float().reshape(count, -1)
    scale = _least_squares_rows(rows, bits, candidates, sample, iterations)
    if granularity == "tensor":
        return scale.reshape(())
    return scale.reshape(count, *([1] * (weight.dim() - 1)))


def _least_squares_rows(w: torch.Tensor, bits: int, candidates: int, sample: int, iterations: int) -> torch.Tensor:
    """:func:`least_squares_scale` of each row of ``w`` ``(R, M)``: shape ``(R,)``."""
    top = w.abs().amax(1).clamp(min=1e-8) if w.numel() else w.new_full((w.shape[0],), 1e-8)
    levels = max_code(bits)
    if levels == 0 or not bool(w.any()):
        return top
    spread = w[:, :: min(w.shape[1], -(-w.numel() // sample))]
    fractions = torch.arange(1, candidates + 1, device=w.device, dtype=torch.float32) / candidates
    best = fractions[clipping_errors_rows(spread, top[:, None] * fractions / levels, levels).argmin(1)]  # (R,)
    finer = (best[:, None] + torch.arange(-10, 11, device=w.device) / (10 * candidates)).clamp(min=1e-6)
    picked = clipping_errors_rows(spread, top[:, None] * finer / levels, levels).argmin(1, keepdim=True)
    best = finer.gather(1, picked).squeeze(1)
    steps = torch.stack([top * best, top], 1) / levels  # (R, 2)
    step = steps.gather(1, clipping_errors_rows(w, steps, levels).argmin(1, keepdim=True)).squeeze(1)
    codes = quantize_codes(w, step[:, None] * levels, bits)
    for _ in range(iterations):
        c = codes.float()
        norm = c.pow(2).sum(1)
        if not bool((norm > 0).any()):
            break
        # a row whose codes are all zero keeps its step (no fit exists)
        fitted = torch.where(norm > 0, (w * c).sum(1) / norm.clamp(min=1e-30), step)
        again = quantize_codes(w, fitted[:, None] * levels, bits)
        step = fitted
        if torch.equal(again, codes):
            break
        codes = again
    zero = ~w.any(1)
    return torch.where(zero, top, step * levels)
