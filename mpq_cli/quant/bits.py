"""Bit-plane representation of integer codes, shared by the bit-level methods (CSQ, BSQ).

Layout: a code tensor of shape ``S`` becomes positive and negative planes of shape
``(*S, n_bits)``; index ``b`` of the last axis is the bit of value ``2**b`` (LSB
first, so the index *is* the exponent). A code is ``sum_b (pos_b - neg_b) * 2**b``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import numpy as np
import torch
from torch import nn

from .primitives import clipping_errors, clipping_errors_rows


def bit_values(n_bits: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[1, 2, 4, ..., 2**(n_bits-1)]``, shape ``(n_bits,)``."""
    return torch.pow(2.0, torch.arange(n_bits, device=device, dtype=torch.float64)).to(dtype)


def to_bit_planes(codes: torch.Tensor, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split integer ``codes`` into positive and negative magnitude bit planes.

    Args:
        codes: integer tensor with ``|codes| <= 2**n_bits - 1``.
        n_bits: number of planes.

    Returns:
        ``(pos, neg)``, each ``bool`` of shape ``(*codes.shape, n_bits)``; at most one
        of them is non-zero for each weight.
    """
    codes = codes.to(torch.int64)
    if codes.numel() and int(codes.abs().max()) > (1 << n_bits) - 1:
        raise ValueError(f"codes exceed {n_bits} magnitude bits")
    shifts = torch.arange(n_bits, device=codes.device)
    pos = (codes.clamp(min=0).unsqueeze(-1) >> shifts) & 1
    neg = ((-codes).clamp(min=0).unsqueeze(-1) >> shifts) & 1
    return pos.bool(), neg.bool()


def from_bit_planes(pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes ``sum_b (pos_b - neg_b) * mask_b * 2**b`` (``int64``).

    ``pos``/``neg`` are 0/1 (bool or integer) planes of shape ``(*S, n_bits)``;
    ``mask`` is an optional 0/1 selection of shape ``(n_bits,)``.
    """
    n_bits = pos.shape[-1]
    weights = torch.ones(n_bits, dtype=torch.int64, device=pos.device) << torch.arange(n_bits, device=pos.device)
    if mask is not None:
        weights = weights * mask.to(torch.int64)
    digits = pos.to(torch.int64) - neg.to(torch.int64)
    return (digits * weights).sum(-1)


def canonicalize_codes(codes: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Remove the power-of-two factor all codes share and count the bits left.

    A layer whose selected bits are ``{5, 6, 7}`` holds codes that are multiples of
    32; dividing them out gives the same weights with ``step * 32`` and 3 magnitude
    bits. Non-contiguous selections (e.g. bits ``{0, 3}``) keep their true cost:
    ``ceil(log2(max|code| + 1))`` magnitude bits.

    Returns:
        ``(codes // 2**shift, shift, magnitude_bits)``; an all-zero tensor gives
        ``(codes, 0, 0)``.
    """
    codes = codes.to(torch.int64)
    if codes.numel() == 0:
        return codes, 0, 0
    flat = codes.detach().cpu().reshape(-1).numpy()  # NumPy: integer reductions here are much faster than torch's
    # the lowest set bit of the OR of all codes is the lowest set bit any code has (negatives included)
    combined = int(np.bitwise_or.reduce(flat))
    if combined == 0:
        return codes, 0, 0
    shift = (combined & -combined).bit_length() - 1
    reduced = codes >> shift if shift else codes
    # arithmetic shift of negatives is exact here because every code is a multiple of 2**shift
    magnitude_bits = max(-int(flat.min()), int(flat.max())).bit_length() - shift
    return reduced, shift, magnitude_bits


def canonicalize_rows(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`canonicalize_codes` for each output channel (the first axis) on its own, on the codes' device.

    A channel whose codes all share the factor ``2**k`` is divided by it (its step is then multiplied by it:
    the weights are unchanged). Returns ``(reduced codes, shifts (C,) int64, magnitude_bits)``, the
    magnitude bits being the most any channel needs; an all-zero channel keeps shift 0.
    """
    rows = codes.to(torch.int64).reshape(codes.shape[0], -1)
    nonzero = rows != 0
    lowest = torch.where(nonzero, rows & -rows, torch.full_like(rows, 1 << 40)).amin(1)
    shifts = torch.where(nonzero.any(1), torch.log2(lowest.double()).round().to(torch.int64), 0)
    reduced = rows >> shifts[:, None]  # exact: every code of a row is a multiple of its 2**shift
    magnitude_bits = int(reduced.abs().max()).bit_length() if reduced.numel() else 0
    return reduced.reshape(codes.shape), shifts, magnitude_bits


def round_to_bits(
    codes: torch.Tensor, bits: int, max_bits: int, row_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Round integer ``codes`` onto ``bits`` contiguous bits: ``(new_codes, shift)``.

    ``new_codes`` are multiples of ``2**shift`` with ``|new_codes| <= (2**bits - 1) * 2**shift``;
    the block of bits (its ``shift``) is the one with the least squared error, clipping
    included, among those whose top bit stays at or below the highest bit the codes use
    (and below ``max_bits``). Dropped low bits are rounded, not truncated. With ``row_weights``
    (one per output channel: each channel's squared step, when each has its own), a channel's
    squared error in codes is weighted by it, so the block is the one with the least error in the
    weights themselves.
    """
    if bits == 0:
        return torch.zeros_like(codes), 0
    top = max(int(codes.abs().max()).bit_length() - 1, bits - 1)
    shifts = torch.arange(
        0, min(max(top - bits + 1, 0), max(max_bits - bits, 0)) + 1, device=codes.device, dtype=torch.float64
    )
    limit = 2**bits - 1
    # the block with the least squared error: clipping a few large weights can beat a coarse step
    if row_weights is None:
        best = int(clipping_errors(codes.double(), torch.pow(2.0, shifts), limit).argmin())
    else:
        rows = codes.double().reshape(row_weights.numel(), -1)
        errors = clipping_errors_rows(rows, torch.pow(2.0, shifts).expand(rows.shape[0], -1), limit)
        best = int((errors * row_weights.to(errors).reshape(-1, 1)).sum(0).argmin())
    scale = 2.0 ** int(shifts[best])
    return (torch.clamp(torch.round(codes.double() / scale), -limit, limit) * scale).to(codes.dtype), int(shifts[best])


class _GatedPlanes(torch.autograd.Function):
    """``sum_b (sigmoid(beta p_b) - sigmoid(beta n_b)) * w_b``, saving nothing but its inputs.

    Autograd's own graph of this expression keeps both sigmoid outputs and their
    difference, three tensors of shape ``(*S, n_bits)`` per layer, until the backward
    pass; here the backward recomputes the sigmoids from the logits (parameters, kept
    anyway), so a step holds no per-bit activation.
    """

    @staticmethod
    def forward(ctx, pos, neg, plane_weights, beta):
        ctx.save_for_backward(pos, neg, plane_weights)
        ctx.beta = beta
        digits = torch.sigmoid(pos * beta).sub_(torch.sigmoid(neg * beta))
        return torch.matmul(digits, plane_weights)

    @staticmethod
    def backward(ctx, grad):
        pos, neg, plane_weights = ctx.saved_tensors
        beta = ctx.beta
        grad = grad.to(pos.dtype)  # bf16 under --amp (the forward's matmul ran in autocast); the logits are fp32
        gate_pos = torch.sigmoid(pos * beta)
        gate_neg = torch.sigmoid(neg * beta)
        grad_weights = None
        if ctx.needs_input_grad[2]:
            digits = (gate_pos - gate_neg).reshape(-1, pos.shape[-1])
            grad_weights = torch.matmul(grad.reshape(-1), digits)
        # d/dp_b = grad * w_b * beta * s(1 - s): one outer product, then sigmoid's own backward kernel
        outer = grad.unsqueeze(-1) * (plane_weights * beta)
        grad_pos = torch.ops.aten.sigmoid_backward(outer, gate_pos) if ctx.needs_input_grad[0] else None
        grad_neg = torch.ops.aten.sigmoid_backward(outer, gate_neg).neg_() if ctx.needs_input_grad[1] else None
        return grad_pos, grad_neg, grad_weights, None


class _LinearPlanes(torch.autograd.Function):
    """``sum_b (p_b - n_b) * w_b`` with ``w`` constant, without keeping ``p - n`` for the backward pass."""

    @staticmethod
    def forward(ctx, pos, neg, plane_weights):
        ctx.save_for_backward(plane_weights)
        return torch.matmul(pos - neg, plane_weights)

    @staticmethod
    def backward(ctx, grad):
        (plane_weights,) = ctx.saved_tensors
        grad_pos = grad.unsqueeze(-1) * plane_weights
        return grad_pos, -grad_pos, None


class _PlaneSquares(torch.autograd.Function):
    """``sum over weights of pos_b^2 + neg_b^2`` for each plane ``b``, with a one-pass backward.

    Autograd's graph of ``pos.pow(2) + neg.pow(2)`` then a sum runs several full passes over the
    ``(*S, n_bits)`` planes each way (pow, add, sum; pow's backward as pow, mul, mul), and BSQ's group
    Lasso takes it every step on every layer: a third of a resnet18 BSQ step on a CPU. Here the forward is
    a square and a sum per tensor and the backward one multiply per tensor.
    """

    @staticmethod
    def forward(ctx, pos, neg):
        ctx.save_for_backward(pos, neg)
        # elementwise square, then one reduction per tensor: float32 under autocast too (vecdot would run
        # in bf16 there), and float32 sums of a million squares within ~1e-7 (vector_norm's were 5e-4 off)
        rows_pos, rows_neg = pos.reshape(-1, pos.shape[-1]), neg.reshape(-1, neg.shape[-1])
        return (rows_pos * rows_pos).sum(0) + (rows_neg * rows_neg).sum(0)

    @staticmethod
    def backward(ctx, grad):
        pos, neg = ctx.saved_tensors
        twice = 2 * grad  # (n_bits,): broadcast along the planes' last axis
        return (pos * twice if ctx.needs_input_grad[0] else None, neg * twice if ctx.needs_input_grad[1] else None)


def plane_square_norms(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``||pos_b||^2 + ||neg_b||^2`` for each plane ``b`` of ``(*S, n)`` planes: shape ``(n,)``."""
    return _PlaneSquares.apply(pos, neg)


_COMPILED = contextvars.ContextVar("mpq_compiled_kernels", default=False)


@contextlib.contextmanager
def compiled_kernels(enabled: bool = True):
    """Inside this block the plane sums run as ``torch.compile``'d kernels (``--compile``).

    One fused loop per layer instead of a pass per elementwise op
    (``benchmarks/step_overhead.py --compile`` times whole steps with it). The first call
    compiles (tens of seconds on a CPU), so it is off by default.
    """
    token = _COMPILED.set(enabled)
    try:
        yield
    finally:
        _COMPILED.reset(token)


def _gated_expression(pos, neg, plane_weights, beta):
    return ((torch.sigmoid(beta * pos) - torch.sigmoid(beta * neg)) * plane_weights).sum(-1)


def _linear_expression(pos, neg, plane_weights):
    return ((pos - neg) * plane_weights).sum(-1)


@functools.cache
def _compiled(expression):
    # dynamic shapes: one kernel per tensor rank, not one per layer shape
    return torch.compile(expression, dynamic=True)


def _not_parameters(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # torch.compile keeps an nn.Parameter's shape static even under dynamic=True, so the logits passed as
    # parameters cost one kernel per layer shape, and past dynamo's recompile limit (8: resnet18 has more
    # shapes) the rest of the layers ran eagerly; a view of a parameter is a plain tensor (same storage and
    # gradient), so every layer of a rank shares one dynamic kernel
    return tuple(t.view_as(t) if isinstance(t, nn.Parameter) else t for t in tensors)


def gated_plane_sum(pos: torch.Tensor, neg: torch.Tensor, plane_weights: torch.Tensor, beta: float) -> torch.Tensor:
    """CSQ's relaxed code ``sum_b (sigmoid(beta pos_b) - sigmoid(beta neg_b)) * plane_weights_b``.

    ``pos``/``neg`` are logits of shape ``(*S, n)``, ``plane_weights`` has shape ``(n,)``
    (and may require grad); the result has shape ``S``. Same values and gradients as
    the plain expression, with no ``(*S, n)`` tensor kept between forward and backward
    (under :func:`compiled_kernels`, the compiler decides what it keeps).
    """
    if _COMPILED.get():
        # beta as a tensor: a Python float would be baked into the kernel and recompiled every step
        beta_tensor = pos.new_tensor(float(beta))
        return _compiled(_gated_expression)(*_not_parameters(pos, neg, plane_weights), beta_tensor)
    return _GatedPlanes.apply(pos, neg, plane_weights, float(beta))


def linear_plane_sum(pos: torch.Tensor, neg: torch.Tensor, plane_weights: torch.Tensor) -> torch.Tensor:
    """BSQ's ``sum_b (pos_b - neg_b) * plane_weights_b`` over planes ``(*S, n)``; ``plane_weights`` is constant."""
    if plane_weights.requires_grad:
        raise ValueError("linear_plane_sum takes constant plane weights")
    if _COMPILED.get():
        return _compiled(_linear_expression)(*_not_parameters(pos, neg, plane_weights))
    return _LinearPlanes.apply(pos, neg, plane_weights)
