"""``--compile``: the bit methods' plane sums as torch.compile'd kernels (issue 15).

The compiled kernels must compute what the eager ones do (values and gradients, to float
rounding), and a search run with ``--compile`` must write the same scheme as without it.
The first compile costs tens of seconds on a CPU, so this file compiles once per rank.
"""

import json

import pytest
import torch
from conftest import SMALL, run_json

from mpq_cli.engine import TrainConfig
from mpq_cli.errors import MpqError
from mpq_cli.quant.bits import bit_values, compiled_kernels, gated_plane_sum, linear_plane_sum


def _grads(fn, *inputs):
    out = fn()
    upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return out.detach(), torch.autograd.grad((out * upstream).sum(), inputs)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7)])
def test_compiled_plane_sums_match_the_eager_kernels(shape):
    gen = torch.Generator().manual_seed(0)
    pos = (torch.randn(*shape, 8, generator=gen) * 0.3).requires_grad_()
    neg = (torch.randn(*shape, 8, generator=gen) * 0.3).requires_grad_()
    mask_logits = torch.randn(8, generator=gen).requires_grad_()
    for beta in (1.0, 23.0):  # a new beta must not need a new kernel (it is passed as a tensor)

        def gated(beta=beta):
            return gated_plane_sum(pos, neg, bit_values(8) * torch.sigmoid(mask_logits), beta)

        eager = _grads(gated, pos, neg, mask_logits)
        with compiled_kernels():
            compiled = _grads(gated, pos, neg, mask_logits)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(eager[1], compiled[1], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    def linear():
        return linear_plane_sum(pos, neg, bit_values(8))

    eager = _grads(linear, pos, neg)
    with compiled_kernels():
        compiled = _grads(linear, pos, neg)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-4)
    for a, b in zip(eager[1], compiled[1], strict=True):
        torch.testing.assert_close(b, a)


def test_layers_of_every_shape_share_one_compiled_kernel():
    """Logits are parameters, whose shapes torch.compile keeps static: without care every layer shape
    compiled its own kernel, and past dynamo's recompile limit (8) resnet18's other layers ran eagerly."""
    from torch._dynamo.utils import counters

    shapes = [(4, 3, 3, 3), (8, 4, 3, 3), (8, 8, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (16, 8, 1, 1)]
    graphs = counters["stats"]["unique_graphs"]
    with compiled_kernels():
        for shape in shapes:
            pos, neg = (torch.nn.Parameter(torch.randn(*shape, 8)) for _ in range(2))
            gated_plane_sum(pos, neg, bit_values(8), 3.0).sum().backward()
            linear_plane_sum(pos, neg, bit_values(8)).sum().backward()
            assert pos.grad is not None and neg.grad is not None
    # the gated and the linear sum: a first (static) kernel each, then one dynamic kernel each at most
    assert counters["stats"]["unique_graphs"] - graphs <= 4 < len(shapes)


def test_compiled_kernels_is_scoped():
    from mpq_cli.quant import bits

    with compiled_kernels():
        assert bits._COMPILED.get()
        with compiled_kernels(False):
            assert not bits._COMPILED.get()
    assert not bits._COMPILED.get()


def test_compile_must_be_a_bool_and_stays_out_of_old_fingerprints():
    with pytest.raises(MpqError, match="compile"):
        TrainConfig(compile="yes")
    assert "compile" not in TrainConfig().to_dict()  # a run written before the option resumes as it was
    assert TrainConfig(compile=True).to_dict()["compile"] is True


def test_search_with_compile_gives_the_eager_scheme(fp_run, tmp_path):
    common = ["search", "--method", "csq", "--target-bits", "2", "--model", "lenet5", "--checkpoint", fp_run[0]]
    common += [*SMALL, "--epochs", "1", "--lr", "0.01"]
    eager = run_json(*common, "--out", tmp_path / "eager")
    compiled = run_json(*common, "--compile", "--out", tmp_path / "compiled")
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert config["train"]["compile"] is True
    schemes = [json.loads((tmp_path / name / "scheme.json").read_text()) for name in ("eager", "compiled")]
    bits = [[(e["name"], e["bits"], e["stored_bits"]) for e in s["layers"]] for s in schemes]
    assert bits[0] == bits[1]
    assert compiled["avg_bits"] == eager["avg_bits"]
