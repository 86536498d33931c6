"""Weights as sums of binary bases with per-group coordinates (ALQ's multi-bit form).

A layer's weight is split into ``G`` groups of ``E`` elements: the weight is permuted
by ``perm`` and reshaped to ``(G, E)``, so that row ``g`` is group ``g`` (channel-wise:
``perm = identity``, ``E = in * kh * kw``; kernel-wise: ``G = out * in``, ``E = kh * kw``).
Group ``g`` has ``I_g`` bases ``beta_{g,i} in {-1, +1}^E`` and coordinates
``alpha_{g,i}``; its weights are ``sum_{i < I_g} alpha_{g,i} * beta_{g,i}``.

The sum is taken in float32, in increasing ``i``, starting from zero: the ALQ method
evaluates with :func:`basis_weight` and the packed-file decoder calls the same
function, so both give the same bits.
"""

from __future__ import annotations

import torch


def to_groups(weight: torch.Tensor, perm: tuple[int, ...], groups: int) -> torch.Tensor:
    """``(G, E)`` rows of ``weight`` permuted by ``perm``."""
    return weight.permute(*perm).reshape(groups, -1)


def from_groups(rows: torch.Tensor, shape: tuple[int, ...], perm: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_groups`: back to ``shape`` (a contiguous tensor)."""
    permuted_shape = [shape[p] for p in perm]
    inverse = [0] * len(perm)
    for position, dim in enumerate(perm):
        inverse[dim] = position
    return rows.reshape(permuted_shape).permute(*inverse).contiguous()


def plane_mask(group_bits: torch.Tensor, max_planes: int) -> torch.Tensor:
    """``(G, max_planes)`` bool: plane ``i`` of group ``g`` is used when ``i < group_bits[g]``."""
    return torch.arange(max_planes, device=group_bits.device) < group_bits.to(torch.int64).unsqueeze(1)


def basis_weight(signs: torch.Tensor, coords: torch.Tensor, group_bits: torch.Tensor) -> torch.Tensor:
    """``(G, E)`` float32 weights of binary bases.

    Args:
        signs: ``(G, P, E)`` bool, True for +1 and False for -1.
        coords: ``(G, P)`` float32 coordinates ``alpha``.
        group_bits: ``(G,)`` bases used per group; planes at or beyond it add nothing.
    """
    groups, planes, elements = signs.shape
    used = plane_mask(group_bits, planes)
    weight = torch.zeros(groups, elements, dtype=torch.float32, device=signs.device)
    pm_one = signs.to(torch.float32) * 2 - 1  # (G, P, E) in {-1, +1}
    for i in range(planes):  # a fixed summation order: the result is defined to the bit
        term = coords[:, i:i + 1].to(torch.float32) * pm_one[:, i]
        weight = torch.where(used[:, i:i + 1], weight + term, weight)
    return weight


def nominal_basis_bits(group_bits: torch.Tensor, group_size: int) -> float:
    """Bases per weight, averaged over the layer (ALQ's average bitwidth)."""
    total = group_bits.to(torch.int64).sum().item() * group_size
    count = group_bits.numel() * group_size
    return total / count if count else 0.0

