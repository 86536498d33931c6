"""ALQ's pure algorithms on binary bases (mpq_cli.quant.alq)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mpq_cli.quant import alq
from mpq_cli.quant.basis import basis_weight


def _random_bases(groups=5, planes=4, elements=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    signs = torch.rand(groups, planes, elements, generator=gen) > 0.5
    coords = torch.rand(groups, planes, generator=gen) + 0.05
    bits = torch.randint(0, planes + 1, (groups,), generator=gen)
    active = torch.arange(planes) < bits.unsqueeze(1)
    return signs, coords * active, active


def test_sketch_bases_are_independent_and_residual_falls():
    torch.manual_seed(0)
    rows = torch.randn(12, 25)
    residuals = []
    for bits in range(1, 7):
        signs, coords, active = alq.sketch(rows, bits)
        assert bool(active.all())  # random rows never reach sigma = 1e-6 relative error below 25 bases
        residuals.append((rows - alq.rows_of(signs, coords, active)).pow(2).sum(1))
        basis = alq.plus_minus(signs).transpose(1, 2)  # (G, E, P)
        assert bool((torch.linalg.matrix_rank(basis) == bits).all())  # Theorem A.1
        assert bool((coords >= 0).all())  # negative coordinates were flipped
        assert bool((coords[:, :-1] >= coords[:, 1:]).all())  # sorted, largest first
    for before, after in itertools.pairwise(residuals):
        assert bool((after < before).all())


def test_sketch_stops_at_sigma_and_leaves_zero_groups_empty():
    rows = torch.zeros(3, 8)
    rows[1] = 0.5  # one basis reproduces it exactly
    rows[2] = torch.tensor([1.0, -1.0, 3.0, -3.0, 1.0, -1.0, 3.0, -3.0])  # two bases: 2*s1 + 1*s2
    signs, coords, active = alq.sketch(rows, 6)
    assert active.sum(1).tolist() == [0, 1, 2]
    assert torch.allclose(alq.rows_of(signs, coords, active), rows, atol=1e-5)
    assert torch.allclose(basis_weight(signs, coords, active.sum(1)), rows, atol=1e-5)


def test_nearest_patterns_pick_the_nearest_of_all_values_per_row():
    signs, coords, active = _random_bases(groups=6, planes=3, elements=40, seed=1)
    target = torch.randn(6, 40)
    chosen = alq.nearest_patterns(coords, active, target)
    got = alq.rows_of(chosen, coords, active)
    patterns = alq.plus_minus(alq.sign_patterns(3))  # (8, 3)
    values = (coords * active) @ patterns.T  # (G, 8)
    best = (values.unsqueeze(1) - target.unsqueeze(2)).abs().min(2).values  # brute force over 2^3 rows
    assert torch.allclose((got - target).abs(), best, atol=1e-6)


def test_weighted_fit_solves_the_regularised_normal_equations():
    signs, coords, active = _random_bases(groups=4, planes=3, elements=30, seed=2)
    active[:, 0] = True
    target = torch.randn(4, 30)
    hessian = torch.rand(4, 30) + 0.1
    fitted = alq.weighted_fit(signs, active, target, hessian)
    for g in range(4):  # reference per group with the paper's formula (Eq. 23 form)
        k = int(active[g].sum())
        basis = alq.plus_minus(signs[g, :k]).T.double()  # (E, k)
        h = torch.diag(hessian[g].double())
        expected = torch.linalg.solve(
            basis.T @ h @ basis + alq.RIDGE * torch.eye(k, dtype=torch.float64), basis.T @ h @ target[g].double()
        )
        assert torch.allclose(fitted[g, :k].double(), expected, atol=1e-4)
        assert bool((fitted[g, k:] == 0).all())


@pytest.mark.parametrize("elements", [9, 64, 576])
def test_weighted_fit_is_finite_when_bases_are_dependent(elements):
    # Eq. 19-20 can give two slots the same signs on every weight (or b1 + b2 = b3 + b4, as a
    # depthwise 3x3 group of MobileNetV2 did): only the ridge keeps the system solvable, and it must
    # survive next to Gram entries of about E (H of mean 1), which float32 cannot represent
    gen = torch.Generator().manual_seed(4)
    signs = torch.rand(3, 3, elements, generator=gen) > 0.5
    signs[:, 1] = signs[:, 0]  # a duplicate basis
    signs[0, 2] = ~signs[0, 0]  # and an opposite one
    active = torch.ones(3, 3, dtype=torch.bool)
    target = torch.randn(3, elements, generator=gen)
    for hessian in (None, torch.ones(3, elements), torch.rand(3, elements, generator=gen) + 0.1):
        fitted = alq.weighted_fit(signs, active, target, hessian)
        assert bool(torch.isfinite(fitted).all())
        assert float(fitted.abs().max()) < 10 * float(target.abs().max())
        # the fit equals the weighted least squares over the span (computed with independent bases)
        h = torch.ones(3, elements) if hessian is None else hessian
        for g in range(3):
            free = [0] if g == 0 else [0, 2]
            basis = alq.plus_minus(signs[g, free]).T.double()
            hw = torch.diag(h[g].double())
            coef = torch.linalg.solve(basis.T @ hw @ basis, basis.T @ hw @ target[g].double())
            got = alq.rows_of(signs[g : g + 1], fitted[g : g + 1], active[g : g + 1])[0].double()
            assert torch.allclose(got, basis @ coef, atol=1e-4)


def test_basis_step_does_not_increase_the_quadratic_model():
    signs, coords, active = _random_bases(groups=8, planes=3, elements=50, seed=3)
    active[:, 0] = True
    start = alq.rows_of(signs, coords, active)
    hessian = torch.rand(8, 50) + 0.5
    target = start + 0.05 * torch.randn(8, 50)
    new_signs, new_coords = alq.basis_step(signs, coords, active, target, hessian)

    def model_loss(w):
        return (hessian * (w - target).pow(2)).sum(1)

    assert bool((model_loss(alq.rows_of(new_signs, new_coords, active)) <= model_loss(start) + 1e-5).all())
    assert bool((new_coords >= 0).all())
    assert torch.equal(new_coords != 0, active & (new_coords != 0))  # bit widths unchanged: nothing outside active


def test_flip_negative_keeps_the_weights():
    signs, coords, active = _random_bases(groups=5, planes=4, elements=16, seed=4)
    coords = coords * torch.where(torch.rand(coords.shape) > 0.5, 1.0, -1.0)
    before = alq.rows_of(signs, coords, active)
    flipped_signs, flipped = alq.flip_negative(signs, coords)
    assert bool((flipped >= 0).all())
    assert torch.equal(alq.rows_of(flipped_signs, flipped, active), before)
    # a sign flip and an absolute value are exact in floating point: the decoded weights are bit-identical
    assert torch.equal(basis_weight(flipped_signs, flipped, active.sum(1)), basis_weight(signs, coords, active.sum(1)))


def test_compact_moves_active_slots_first_and_extra_tensors_follow():
    signs, coords, active = _random_bases(groups=6, planes=4, elements=10, seed=5)
    scattered = active[:, torch.tensor([2, 0, 3, 1])]  # active no longer a prefix
    coords = torch.rand(6, 4) * scattered
    moment = coords * 10
    new_signs, new_coords, new_active, new_moment = alq.compact(signs, coords, scattered, moment)
    assert torch.equal(new_active, torch.arange(4) < scattered.sum(1, keepdim=True))
    assert torch.equal(new_moment, new_coords * 10)
    assert torch.allclose(alq.rows_of(new_signs, new_coords, new_active), alq.rows_of(signs, coords, scattered))


@pytest.mark.parametrize("seed", range(5))
def test_select_pruned_removes_exactly_the_scheduled_coordinates(seed):
    gen = torch.Generator().manual_seed(seed)
    actives = [torch.rand(20, 4, generator=gen) > 0.3, torch.rand(30, 3, generator=gen) > 0.2]
    increments = [torch.rand(20, 4, generator=gen), torch.rand(30, 3, generator=gen)]
    sizes = [25, 25]  # equal groups: the quota is a number of coordinates
    quota = 25 * 17
    masks = alq.select_pruned(increments, actives, sizes, quota, top_fraction=1.0)
    assert sum(int(m.sum()) for m in masks) == 17
    assert all(bool((m <= a).all()) for m, a in zip(masks, actives, strict=True))  # only active ones
    # the 17 lowest increments among the active coordinates
    pooled = torch.cat([torch.where(a, i, torch.inf).reshape(-1) for i, a in zip(increments, actives, strict=True)])
    chosen = torch.cat([m.reshape(-1) for m in masks])
    assert pooled[chosen].max() <= pooled[~chosen & torch.isfinite(pooled)].min()


def test_select_pruned_with_unequal_groups_overshoots_by_less_than_one_group():
    gen = torch.Generator().manual_seed(7)
    actives = [torch.ones(10, 3, dtype=torch.bool), torch.ones(4, 2, dtype=torch.bool)]
    increments = [torch.rand(10, 3, generator=gen), torch.rand(4, 2, generator=gen)]
    sizes = [25, 400]
    for quota in (1, 30, 420, 900, 1500):
        masks = alq.select_pruned(increments, actives, sizes, quota, top_fraction=0.2)
        removed = sum(int(m.sum()) * s for m, s in zip(masks, sizes, strict=True))
        assert quota <= removed < quota + 400


def test_select_pruned_top_fraction_limits_each_layers_offer():
    actives = [torch.ones(100, 1, dtype=torch.bool), torch.ones(100, 1, dtype=torch.bool)]
    increments = [torch.zeros(100, 1), torch.ones(100, 1)]  # layer 0 is always cheaper
    masks = alq.select_pruned(increments, actives, [1, 1], 10, top_fraction=0.05)
    # layer 0 offers only its 5 cheapest, so layer 1 must give the other 5
    assert [int(m.sum()) for m in masks] == [5, 5]


def test_pruning_increment_is_eq13():
    coords = torch.tensor([[1.0, 2.0]])
    g = torch.tensor([[0.5, -1.0]])
    h = torch.tensor([[2.0, 4.0]])
    assert torch.allclose(alq.pruning_increment(coords, g, h), torch.tensor([[-0.5 + 1.0, 2.0 + 8.0]]))
