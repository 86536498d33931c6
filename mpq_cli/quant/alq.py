"""ALQ's algorithms on binary bases, as pure tensor functions (Qu et al., CVPR 2020).

A layer is held as ``G`` groups of ``E`` weights (:mod:`mpq_cli.quant.basis`), each with
up to ``P`` slots: ``signs`` ``(G, P, E)`` bool (True = +1), ``coords`` ``(G, P)`` and
``active`` ``(G, P)`` bool. Active slots always come first (``active[g]`` is a prefix),
so ``group_bits = active.sum(1)`` and the packed ``basis`` encoding can store them as
they are. Everything is vectorised over groups, bases and weights; the only loops run
over at most ``P`` bases in the initialisation.
"""

from __future__ import annotations

import torch

RIDGE = 1e-6  # lambda of Eq. 23: keeps B^T H B invertible


def plus_minus(signs: torch.Tensor) -> torch.Tensor:
    """Bool signs as float -1/+1."""
    return signs.to(torch.float32) * 2 - 1


def rows_of(signs: torch.Tensor, coords: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``(G, E)`` weights ``B_g alpha_g`` (a contraction; training uses it, evaluation
    uses :func:`mpq_cli.quant.basis.basis_weight` with its fixed summation order)."""
    return torch.einsum("gpe,gp->ge", plus_minus(signs), coords * active)


def weighted_fit(
    signs: torch.Tensor,
    active: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    ridge: float = RIDGE,
) -> torch.Tensor:
    """Coordinates minimising ``sum_e weights_e (B alpha - target)_e^2`` per group, inactive slots 0.

    ``alpha = (B^T H B + ridge I)^-1 B^T H target`` (Eq. 23 with ``target = w - g/H``;
    Alg. 1's least squares with ``H = I``).
    """
    # In float64: the bases of a group can be linearly dependent (Eq. 19-20 may give two slots the same
    # or opposite signs on every weight, likely in groups of a few weights such as a depthwise 3x3), and
    # then only the ridge keeps the system invertible. In float32 it cannot: next to entries of about
    # ``E`` (H has mean 1) the ridge is below the rounding of the Gram matrix, the solve meets a zero
    # pivot and returns inf/NaN coordinates.
    basis = plus_minus(signs).to(torch.float64) * active.unsqueeze(-1)  # (G, P, E), zero rows for inactive slots
    weighted = basis if weights is None else basis * weights.to(torch.float64).unsqueeze(1)
    gram = torch.einsum("gpe,gqe->gpq", weighted, basis)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = gram + ridge * eye + torch.diag_embed((~active).to(gram.dtype))  # inactive: identity, rhs 0
    rhs = torch.einsum("gpe,ge->gp", weighted, target.to(torch.float64))
    # positive definite by the ridge; solve_ex skips the error check, a host sync on a GPU
    solution = torch.linalg.solve_ex(gram, rhs.unsqueeze(-1))[0].squeeze(-1)
    return (solution * active).to(torch.float32)


def flip_negative(signs: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A negative coordinate becomes positive with its basis negated: ``B alpha`` is unchanged (Sec. 3.3)."""
    negative = coords < 0
    return signs ^ negative.unsqueeze(-1), coords.abs()


def compact(
    signs: torch.Tensor, coords: torch.Tensor, active: torch.Tensor, *extra: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Move active slots first, the largest coordinate first; ``extra`` ``(G, P)`` tensors follow along."""
    key = torch.where(active, coords, torch.full_like(coords, -float("inf")))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    signs = torch.gather(signs, 1, order.unsqueeze(-1).expand_as(signs))
    moved = [torch.gather(t, 1, order) for t in (coords, active, *extra)]
    coords, active = moved[0], moved[1]
    return (signs, coords * active, active, *moved[2:])


def sketch(rows: torch.Tensor, max_bits: int, sigma: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structured sketching (Alg. 1): greedy sign bases with least-squares coordinates.

    Each group adds ``beta_i = sign(residual)`` and refits all its coordinates until its
    relative residual ``||eps||^2 / ||w||^2`` is at most ``sigma`` or it has ``max_bits``
    bases (an all-zero group gets none). Negative coordinates are flipped with their
    bases and the slots sorted by coordinate.

    Returns:
        ``(signs (G, max_bits, E) bool, coords (G, max_bits) float32, active (G, max_bits) bool)``.
    """
    rows = rows.detach().to(torch.float32)
    groups, elements = rows.shape
    signs = torch.ones(groups, max_bits, elements, dtype=torch.bool, device=rows.device)
    coords = torch.zeros(groups, max_bits, dtype=torch.float32, device=rows.device)
    active = torch.zeros(groups, max_bits, dtype=torch.bool, device=rows.device)
    norm2 = rows.pow(2).sum(1)
    residual = rows
    for i in range(max_bits):  # bases, not weights: at most max_bits passes over the layer
        growing = residual.pow(2).sum(1) > sigma * norm2
        if not bool(growing.any()):
            break
        signs[:, i] = torch.where(growing.unsqueeze(-1), residual >= 0, signs[:, i])
        active[:, i] = growing
        coords = weighted_fit(signs, active, rows)
        residual = rows - rows_of(signs, coords, active)
    signs, coords = flip_negative(signs, coords)
    signs, coords, active = compact(signs, coords, active)
    return signs, coords, active


def sign_patterns(planes: int, device=None) -> torch.Tensor:
    """``(2^planes, planes)`` bool: every row of ``{-1, +1}^planes`` (True = +1)."""
    index = torch.arange(1 << planes, device=device)
    return ((index.unsqueeze(1) >> torch.arange(planes, device=device)) & 1).bool()


def nearest_patterns(coords: torch.Tensor, active: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 19-20: per weight, the sign row ``b`` whose ``b^T alpha_g`` is nearest to ``target``.

    All ``2^P`` values of each group are computed once (inactive slots add 0), sorted,
    and each weight is placed by binary search, so the cost is ``O(G 2^P + G E log 2^P)``
    rather than ``O(G E 2^P)``.

    Returns:
        ``(G, P, E)`` bool signs.
    """
    planes = coords.shape[1]
    patterns = sign_patterns(planes, coords.device)  # (K, P)
    values = (coords * active) @ plus_minus(patterns).T  # (G, K)
    ordered, order = torch.sort(values, dim=1)
    right = torch.searchsorted(ordered, target.contiguous()).clamp(max=ordered.shape[1] - 1)  # (G, E)
    left = (right - 1).clamp(min=0)
    left_gap = (target - torch.gather(ordered, 1, left)).abs()
    right_gap = (torch.gather(ordered, 1, right) - target).abs()
    position = torch.where(left_gap <= right_gap, left, right)
    chosen = torch.gather(order, 1, position)  # (G, E) pattern index
    return patterns[chosen].permute(0, 2, 1)  # (G, P, E)


def basis_step(
    signs: torch.Tensor, coords: torch.Tensor, active: torch.Tensor, step_target: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise the bases with the speed-up (Alg. 3): nearest patterns, then Eq. 23, then flips.

    Args:
        step_target: ``w - g/H``, where AMSGrad would move the weights (``(G, E)``).
        hessian: ``H`` (``(G, E)``, positive), AMSGrad's ``sqrt(v_hat)``.

    Returns:
        New ``(signs, coords)``; the bit widths (``active``) do not change.
    """
    new_signs = nearest_patterns(coords, active, step_target)
    new_coords = weighted_fit(new_signs, active, step_target, hessian)
    return flip_negative(new_signs, new_coords)


def pruning_increment(coords: torch.Tensor, grad_moment: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Eq. 13: the modelled loss increment of zeroing each coordinate, ``-g alpha + H alpha^2 / 2``."""
    return -grad_moment * coords + 0.5 * hessian * coords.pow(2)


def select_pruned(
    increments: list[torch.Tensor],
    actives: list[torch.Tensor],
    group_sizes: list[int],
    quota_bits: int,
    top_fraction: float,
) -> list[torch.Tensor]:
    """Alg. 2's choice: which active coordinates to remove so that ``quota_bits`` weight-bits go.

    Each layer offers its ``top_fraction`` lowest increments (at least one; all of its
    active coordinates if the offers cannot cover the quota); the offers are sorted
    together and the shortest prefix from the lowest whose bits reach the quota is
    removed (a coordinate of a layer with groups of ``E`` weights is ``E`` bits), so the
    removed bits exceed the quota by less than the last coordinate's group.

    Returns:
        Per layer, a ``(G, P)`` bool mask of the coordinates to prune.
    """
    masks = [torch.zeros_like(a) for a in actives]
    if quota_bits <= 0:
        return masks
    for widen in (False, True):
        offers, positions, owners = [], [], []
        for layer, (inc, act) in enumerate(zip(increments, actives, strict=True)):
            count = int(act.sum())
            if count == 0:
                continue
            take = count if widen else min(count, max(1, int(top_fraction * count + 0.999999)))
            scored = torch.where(act, inc, torch.full_like(inc, float("inf"))).reshape(-1)
            values, index = torch.topk(scored, take, largest=False)
            offers.append(values)
            positions.append(index)
            owners.append(torch.full((take,), layer, device=values.device))
        if not offers:
            return masks
        offered, position, owner = torch.cat(offers), torch.cat(positions), torch.cat(owners)
        sizes = torch.tensor(group_sizes, device=offered.device, dtype=torch.int64)[owner]
        if int(sizes.sum()) >= quota_bits or widen:
            break
    order = torch.argsort(offered, stable=True)
    cumulative = torch.cumsum(sizes[order], 0)
    # the shortest prefix that reaches the quota: a round ends at or below its target,
    # overshooting by less than one coordinate's group
    reach = int(torch.searchsorted(cumulative, torch.tensor([quota_bits], device=cumulative.device)))
    chosen = order[: reach + 1]
    for layer, mask in enumerate(masks):
        picked = chosen[owner[chosen] == layer]
        if picked.numel():
            mask.view(-1)[position[picked]] = True
    return masks
