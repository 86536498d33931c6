import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_cli.quant.bits import (
    bit_values,
    canonicalize_codes,
    from_bit_planes,
    gated_plane_sum,
    linear_plane_sum,
    plane_square_norms,
    to_bit_planes,
)


def test_bit_planes_worked_example():
    # 5 = 0b101 -> pos bits 0 and 2; -6 = -(0b110) -> neg bits 1 and 2 (LSB first)
    pos, neg = to_bit_planes(torch.tensor([5, -6, 0]), 3)
    assert pos.int().tolist() == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert neg.int().tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 0]]


@settings(max_examples=50, deadline=None)
@given(n_bits=st.integers(1, 12), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_bit_planes_round_trip(n_bits, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    limit = 2**n_bits - 1
    codes = torch.randint(-limit, limit + 1, shape, generator=gen)
    pos, neg = to_bit_planes(codes, n_bits)
    assert not (pos & neg).any()
    assert torch.equal(from_bit_planes(pos, neg), codes)


def test_bit_planes_reject_overflow():
    with pytest.raises(ValueError):
        to_bit_planes(torch.tensor([8]), 3)


def test_mask_selects_bits():
    pos, neg = to_bit_planes(torch.tensor([7, -7]), 3)
    assert from_bit_planes(pos, neg, torch.tensor([1, 0, 1])).tolist() == [5, -5]


def test_bit_values():
    assert bit_values(4).tolist() == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    "codes,shift,bits",
    [
        ([0, 0], 0, 0),
        ([1, -3, 2], 0, 2),
        ([32, -96, 224], 5, 3),  # bits {5,6,7} selected: 3 magnitude bits after shifting
        ([9, -8, 1], 0, 4),  # bits {0,3}: not contiguous, costs 4 magnitude bits
        ([-4, 12], 2, 2),
    ],
)
def test_canonicalize_codes(codes, shift, bits):
    reduced, got_shift, got_bits = canonicalize_codes(torch.tensor(codes))
    assert (got_shift, got_bits) == (shift, bits)
    assert torch.equal(reduced * 2**got_shift, torch.tensor(codes))


# -- round_to_bits against a brute-force reference (issue 13) -------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_round_to_bits_picks_the_least_squared_error_block(seed, bits):
    from mpq_cli.quant.bits import round_to_bits

    gen = torch.Generator().manual_seed(seed)
    codes = (torch.randn(200, generator=gen) * 40).round().clamp(-255, 255).to(torch.int64)
    new, shift = round_to_bits(codes, bits, 8)
    step, limit = 2**shift, 2**bits - 1
    assert bool((new % step == 0).all()) and int(new.abs().max()) <= limit * step
    top = max(int(codes.abs().max()).bit_length() - 1, bits - 1)
    best = None
    for s in range(0, max(min(top - bits + 1, 8 - bits), 0) + 1):  # every block at or below the top bit
        cand = [max(-limit, min(limit, round(c / 2**s))) * 2**s for c in codes.tolist()]
        err = sum((a - b) ** 2 for a, b in zip(cand, codes.tolist(), strict=True))
        if best is None or err < best[0]:
            best = (err, s, cand)
    assert shift == best[1] and new.tolist() == best[2]


def test_round_to_bits_zero_bits_is_all_zero():
    from mpq_cli.quant.bits import round_to_bits

    new, shift = round_to_bits(torch.tensor([3, -7, 1]), 0, 8)
    assert new.tolist() == [0, 0, 0] and shift == 0


# -- the fused plane sums (issue 15): same values and gradients as the plain expressions --------------------------
@pytest.mark.parametrize("shape", [(3,), (4, 3, 2, 2)])
@pytest.mark.parametrize("beta", [1.0, 37.5])
def test_gated_plane_sum_matches_autograd_of_the_plain_expression(shape, beta):
    gen = torch.Generator().manual_seed(0)
    n = 5
    pos = torch.randn(*shape, n, generator=gen, dtype=torch.float64).mul_(0.2).requires_grad_()
    neg = torch.randn(*shape, n, generator=gen, dtype=torch.float64).mul_(0.2).requires_grad_()
    mask_logits = torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(*shape, generator=gen, dtype=torch.float64)

    def plain():
        weights = bit_values(n, dtype=torch.float64) * torch.sigmoid(mask_logits)
        return torch.matmul(torch.sigmoid(beta * pos) - torch.sigmoid(beta * neg), weights)

    def fused():
        weights = bit_values(n, dtype=torch.float64) * torch.sigmoid(mask_logits)
        return gated_plane_sum(pos, neg, weights, beta)

    results = []
    for f in (plain, fused):
        out = f()
        grads = torch.autograd.grad((out * upstream).sum(), (pos, neg, mask_logits))
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    weights = mask_logits.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda p, q, w: gated_plane_sum(p, q, w, beta), (pos, neg, weights))
    # the graph keeps the logits and the plane weights only, no (*shape, n) intermediate
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        gated_plane_sum(pos, neg, weights, beta)
    assert sum(saved) == 2 * pos.numel() + n


def test_linear_plane_sum_matches_the_plain_expression_and_rejects_learned_weights():
    gen = torch.Generator().manual_seed(1)
    pos = torch.rand(6, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    neg = torch.rand(6, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    upstream = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    plain = torch.autograd.grad((torch.matmul(pos - neg, weights) * upstream).sum(), (pos, neg))
    out = linear_plane_sum(pos, neg, weights)
    torch.testing.assert_close(out, torch.matmul(pos - neg, weights))
    fused = torch.autograd.grad((out * upstream).sum(), (pos, neg))
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a)
    with pytest.raises(ValueError):
        linear_plane_sum(pos, neg, weights.clone().requires_grad_())


@pytest.mark.parametrize("shape", [(5, 3, 4), (7, 8)], ids=["conv-like", "one-axis"])
def test_plane_square_norms_match_autograd_of_the_plain_expression(shape):
    gen = torch.Generator().manual_seed(3)
    pos = torch.rand(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    neg = torch.rand(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    plain = (pos.pow(2) + neg.pow(2)).reshape(-1, shape[-1]).sum(0)
    out = plane_square_norms(pos, neg)
    torch.testing.assert_close(out, plain)
    expected = torch.autograd.grad((plain * upstream).sum(), (pos, neg))
    got = torch.autograd.grad((out * upstream).sum(), (pos, neg))
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a)
    assert torch.autograd.gradcheck(plane_square_norms, (pos, neg))


def test_plane_square_norms_keep_float32_sums_of_many_squares_exact():
    # a million-weight layer: a float32 sum that loses digits would move BSQ's Lasso (and its gradient scale)
    planes = torch.rand(1 << 20, 4, generator=torch.Generator().manual_seed(0))
    exact = (planes.double() ** 2).sum(0)
    for autocast in (False, True):  # --amp: bf16 autocast must not reach the Lasso's sums
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = plane_square_norms(planes, torch.zeros_like(planes))
        assert got.dtype == torch.float32
        assert ((got.double() - exact).abs() / exact).max() < 1e-5
