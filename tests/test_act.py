"""PACT (Choi et al. 2018): forward on the quantization grid, the paper's straight-through gradients."""

import pytest
import torch

from mpq_cli.quant.act import PACT


def _pact(bits, alpha, signed=False):
    q = PACT(bits)
    with torch.no_grad():
        q.alpha.fill_(alpha)
    q.set_host("signed", signed)
    q.set_host("initialised", True)
    return q


@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (3, True), (8, True)])
def test_forward_is_the_clip_rounded_to_its_grid(bits, signed):
    alpha = 1.5
    q = _pact(bits, alpha, signed)
    x = torch.linspace(-3, 3, 1001)
    levels = (2**bits - 1) if not signed else (2 ** (bits - 1) - 1)
    step = alpha / levels
    low = -alpha if signed else 0.0
    expected = torch.round(x.clamp(low, alpha) / step) * step
    out = q(x)
    assert torch.allclose(out, expected, atol=1e-6)
    grid = torch.round(out / step)
    assert torch.allclose(grid * step, out, atol=1e-6) and grid.unique().numel() <= 2 * levels + 1


@pytest.mark.parametrize("signed", [False, True])
def test_alpha_gradient_is_pacts_straight_through_estimate(signed):
    """dy/dalpha = 1 where x >= alpha (and -1 where x <= -alpha when signed), 0 inside: no term from the
    rounding's dependence on the step (the review measured 509.8 where PACT's estimate gives 508)."""
    torch.manual_seed(0)
    q = _pact(3, 1.0, signed)
    x = torch.randn(4096) * 1.5
    upstream = torch.rand(4096)
    (q(x) * upstream).sum().backward()
    expected = upstream[x >= 1.0].sum() - (upstream[x <= -1.0].sum() if signed else 0.0)
    assert float(q.alpha.grad) == pytest.approx(float(expected), rel=1e-5)


def test_input_gradient_passes_inside_the_clip_only():
    q = _pact(2, 1.0)
    x = torch.tensor([-0.5, 0.2, 0.7, 1.3], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_first_batch_sets_the_clip_and_the_sign():
    q = PACT(4)
    q(torch.tensor([-2.0, 0.5, 1.0]))
    assert bool(q.signed) and float(q.alpha.detach()) == pytest.approx(2.0)
    fixed = PACT(4, clip=6.0)
    fixed(torch.tensor([0.5, 9.0]))
    assert float(fixed.alpha.detach()) == 6.0 and not fixed.alpha.requires_grad


@pytest.mark.parametrize("signed", [False, True])
def test_backward_keeps_one_byte_per_input(signed):
    q = _pact(4, 1.0, signed)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert sum(t.numel() * t.element_size() for t in saved) <= x.numel() + 16  # the region bytes, alpha for abs()
    y.sum().backward()  # and the gradients still come from the regions (tests above)
    inside = (x.detach() < 1.0) & ((x.detach() > -1.0) if signed else (x.detach() >= 0))
    assert torch.equal(x.grad, inside.float())
