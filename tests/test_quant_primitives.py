import pytest
import torch

from mpq_cli.quant.primitives import dequantize, fake_quantize, max_code, quantize_codes, ste_round


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
