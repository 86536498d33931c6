import math

import pytest
import torch

from mpq_cli.quant.primitives import (
    clipping_errors,
    dequantize,
    fake_quantize,
    grad_scale,
    least_squares_scale,
    lsq_quantize,
    max_code,
    quantize_codes,
    ste_round,
)


@pytest.mark.parametrize("bits,expected", [(0, 0), (1, 1), (2, 3), (8, 255), (16, 65535)])
def test_max_code(bits, expected):
    assert max_code(bits) == expected


def test_quantize_codes_grid_and_clip():
    w = torch.tensor([-2.0, -1.0, -0.49, 0.0, 0.26, 0.5, 1.0, 3.0])
    codes = quantize_codes(w, 1.0, 2)  # grid step 1/3
    assert codes.tolist() == [-3, -3, -1, 0, 1, 2, 3, 3]
    assert codes.dtype == torch.int32


def test_zero_bits_is_all_zero():
    assert quantize_codes(torch.randn(10), 1.0, 0).abs().sum() == 0
    assert fake_quantize(torch.randn(10), torch.tensor(1.0), 0).abs().sum() == 0


def test_dequantize_is_exact_product():
    codes = torch.randint(-255, 256, (100,), dtype=torch.int32)
    step = torch.tensor(0.123456789, dtype=torch.float32)
    w = dequantize(codes, step)
    assert torch.equal(w, codes.float() * step)
    assert torch.equal(torch.round(w / step).to(torch.int32), codes)


def test_fake_quantize_matches_codes_and_passes_gradient():
    torch.manual_seed(0)
    w = torch.randn(50, requires_grad=True)
    s = torch.tensor(1.5, requires_grad=True)
    q = fake_quantize(w, s, 3)
    expected = dequantize(quantize_codes(w.detach(), s.detach(), 3), s.detach() / 7)
    assert torch.allclose(q, expected, atol=1e-6)
    q.sum().backward()
    inside = (w.detach().abs() <= 1.5).float()
    assert torch.equal(w.grad, inside)  # straight-through inside the clip range, zero outside
    # d/ds of round(clamp(w/s) 7) s / 7 with the rounding straight through: round(n)/7 - w/s inside the clip
    n = torch.clamp(w.detach() / 1.5, -1, 1) * 7
    assert float(s.grad) == pytest.approx(float((torch.round(n) / 7 - inside * w.detach() / 1.5).sum()), abs=1e-5)


def test_ste_round_gradient_is_identity():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = ste_round(x)
    assert y.tolist() == [0.0, 2.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def _saved_elements(fn) -> int:
    """Elements autograd keeps for the backward pass while ``fn()`` builds its graph."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_fake_quantize_matches_the_plain_graph_and_keeps_only_its_inputs():
    # the straight-through expression it replaces, boundary values (|w| = s) included
    torch.manual_seed(1)
    w = torch.cat([torch.randn(200, dtype=torch.float64), torch.tensor([1.25, -1.25, 0.0], dtype=torch.float64)])
    w.requires_grad_()
    s = torch.tensor(1.25, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(w.shape, dtype=torch.float64)
    levels = max_code(3)

    def plain():
        return ste_round(torch.clamp(w / s, -1.0, 1.0) * levels) * (s / levels)

    expected = torch.autograd.grad((plain() * upstream).sum(), (w, s))
    got = torch.autograd.grad((fake_quantize(w, s, 3) * upstream).sum(), (w, s))
    torch.testing.assert_close(fake_quantize(w, s, 3), plain(), rtol=0, atol=1e-15)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # what the graph keeps: the weight and the scale, not the ~5 weight-sized temporaries of plain()
    assert _saved_elements(lambda: fake_quantize(w, s, 3)) == w.numel() + 1
    assert _saved_elements(plain) >= 3 * w.numel()


# -- LSQ (Esser et al., ICLR 2020) and the least-squares clip (issue 28, part 3) --------------------------------
def test_lsq_gradient_matches_a_hand_computation():
    # w / s = [0.6, -1.4, 3.2, -5.0, 0.1] at 2 bits (L = 3): the 3rd and 4th weights are clipped
    w = torch.tensor([0.3, -0.7, 1.6, -2.5, 0.05], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0], dtype=torch.float64)
    q = lsq_quantize(w, s, 2)
    assert q.tolist() == pytest.approx([0.5, -0.5, 1.5, -1.5, 0.0], abs=1e-15)
    (q * upstream).sum().backward()
    # Eq. 3: round(w/s) - w/s inside the clip: 1 - 0.6, -1 + 1.4, 0 - 0.1; Q_P = 3 above it, -Q_N = -3 below
    per_weight = [0.4, 0.4, 3.0, -3.0, -0.1]
    by_hand = sum(u * d for u, d in zip([1.0, 2.0, -1.0, 0.5, 3.0], per_weight, strict=True))  # -3.6
    assert float(s.grad) == pytest.approx(by_hand / math.sqrt(5 * 3), rel=1e-12)  # g = 1 / sqrt(N Q_P)
    assert w.grad.tolist() == [1.0, 2.0, 0.0, 0.0, 3.0]  # straight through inside the clip, zero outside


def test_lsq_at_zero_bits_is_zero_with_zero_gradients():
    w = torch.randn(7, requires_grad=True)
    s = torch.tensor(0.3, requires_grad=True)
    q = lsq_quantize(w, s, 0)
    q.sum().backward()
    assert not q.any() and not w.grad.any() and float(s.grad) == 0.0


def test_grad_scale_keeps_the_value_and_scales_the_gradient():
    x = torch.tensor([0.1, -2.0, 3.3], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [0.25, 0.5, 1.0]


@pytest.mark.parametrize("elements", [1 << 24, 7], ids=["one-pass", "in-slices"])
def test_clipping_errors_against_brute_force(elements, monkeypatch):
    import mpq_cli.quant.primitives as primitives

    monkeypatch.setattr(primitives, "_ERROR_ELEMENTS", elements)
    values = torch.tensor([0.3, -1.2, 2.9, 0.04, -0.51], dtype=torch.float64)
    steps = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    got = clipping_errors(values, steps, 3)
    for k, step in enumerate(steps.tolist()):
        grid = [max(-3, min(3, round(v / step))) * step for v in values.tolist()]
        assert float(got[k]) == pytest.approx(sum((a - b) ** 2 for a, b in zip(grid, values.tolist(), strict=True)))


def _mse(w: torch.Tensor, scale: float, bits: int) -> float:
    """Mean squared error of the grid spanning [-scale, scale], in float64 (written out, not the code's)."""
    w = w.double()
    levels = 2**bits - 1
    step = scale / levels
    return float((torch.clamp(torch.round(w / step), -levels, levels) * step - w).pow(2).mean())


@pytest.mark.parametrize("bits", [1, 2])
def test_least_squares_clip_beats_max_and_matches_a_dense_search_at_low_bits(bits):
    w = torch.randn(20_000, generator=torch.Generator().manual_seed(bits))
    top = float(w.abs().max())
    found = float(least_squares_scale(w, bits))
    # max|W| at 1 bit + sign zeroes every weight under half the largest: ~all of a Gaussian's
    assert _mse(w, found, bits) < 0.5 * _mse(w, top, bits)
    dense = min(_mse(w, top * k / 1000, bits) for k in range(1, 1001))  # every 0.1 % of max|W|
    assert _mse(w, found, bits) <= dense * 1.002


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("n", [5, 300, 70_001], ids=["tiny", "small", "sampled"])
def test_least_squares_clip_is_never_worse_than_max(bits, n):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.05
    w[0] = 1.0  # an outlier: the case where clipping pays most
    found = float(least_squares_scale(w, bits))
    assert found > 0  # (it may exceed max|W|: the least-squares step for the codes can be a little wider)
    assert _mse(w, found, bits) <= _mse(w, float(w.abs().max()), bits) * (1 + 1e-6)


def test_least_squares_clip_of_nothing_to_fit_is_max_or_a_floor():
    assert float(least_squares_scale(torch.zeros(4, 3), 2)) == pytest.approx(1e-8)
    assert float(least_squares_scale(torch.tensor([0.5, -2.0]), 0)) == 2.0
