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

from dataclasses import dataclass

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
        term = coords[:, i : i + 1].to(torch.float32) * pm_one[:, i]
        weight = torch.where(used[:, i : i + 1], weight + term, weight)
    return weight


def nominal_basis_bits(group_bits: torch.Tensor, group_size: int) -> float:
    """Bases per weight, averaged over the layer (ALQ's average bitwidth)."""
    total = group_bits.to(torch.int64).sum().item() * group_size
    count = group_bits.numel() * group_size
    return total / count if count else 0.0


@dataclass
class BasisForm:
    """One layer's exact weight as binary bases: ``from_groups(basis_weight(...), shape, perm)``.

    Args:
        signs: ``(G, P, E)`` bool, True for +1.
        coords: ``(G, P)`` float32; planes at or beyond ``group_bits[g]`` are 0.
        group_bits: ``(G,)`` int, bases used per group.
        perm: the weight permutation that makes groups rows (:func:`to_groups`).
    """

    signs: torch.Tensor
    coords: torch.Tensor
    group_bits: torch.Tensor
    perm: tuple[int, ...]

    def weight(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 weight, summed as the packed-file decoder sums it."""
        return from_groups(basis_weight(self.signs, self.coords, self.group_bits), tuple(shape), self.perm)

    @property
    def group_size(self) -> int:
        return self.signs.shape[2]

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors a run's ``codes.safetensors`` holds for this layer."""
        return {
            f"{prefix}.signs": self.signs.to(torch.uint8).contiguous(),
            f"{prefix}.coords": self.coords.to(torch.float32).contiguous(),
            f"{prefix}.group_bits": self.group_bits.to(torch.int32).contiguous(),
            f"{prefix}.perm": torch.tensor(self.perm, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> BasisForm:
        return cls(
            tensors[f"{prefix}.signs"].bool(),
            tensors[f"{prefix}.coords"].float(),
            tensors[f"{prefix}.group_bits"].to(torch.int64),
            tuple(int(p) for p in tensors[f"{prefix}.perm"]),
        )
