"""Bit-plane representation of integer codes, shared by the bit-level methods (CSQ, BSQ).

Layout: a code tensor of shape ``S`` becomes positive and negative planes of shape
``(*S, n_bits)``; index ``b`` of the last axis is the bit of value ``2**b`` (LSB
first, so the index *is* the exponent). A code is ``sum_b (pos_b - neg_b) * 2**b``.
"""

from __future__ import annotations

import numpy as np
import torch


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


def round_to_bits(codes: torch.Tensor, bits: int, max_bits: int) -> tuple[torch.Tensor, int]:
    """Round integer ``codes`` onto ``bits`` contiguous bits: ``(new_codes, shift)``.

    ``new_codes`` are multiples of ``2**shift`` with ``|new_codes| <= (2**bits - 1) * 2**shift``;
    the block of bits (its ``shift``) is the one with the least squared error, clipping
    included, among those whose top bit stays at or below the highest bit the codes use
    (and below ``max_bits``). Dropped low bits are rounded, not truncated.
    """
    if bits == 0:
        return torch.zeros_like(codes), 0
    top = max(int(codes.abs().max()).bit_length() - 1, bits - 1)
    shifts = torch.arange(
        0, min(max(top - bits + 1, 0), max(max_bits - bits, 0)) + 1, device=codes.device, dtype=torch.float64
    )
    limit = 2**bits - 1
    scales = torch.pow(2.0, shifts).view(-1, *([1] * codes.dim()))
    candidates = torch.clamp(torch.round(codes.double() / scales), -limit, limit) * scales  # (shifts, *codes.shape)
    # the block with the least squared error: clipping a few large weights can beat a coarse step
    errors = (candidates - codes.double()).pow(2).flatten(1).sum(1)
    best = int(errors.argmin())
    return candidates[best].to(codes.dtype), int(shifts[best])
