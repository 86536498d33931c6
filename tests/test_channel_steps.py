"""--granularity channel (issue 30): one step per output channel for uniform, CSQ, BSQ and BMPQ.

Each method's per-channel form must reduce to its per-tensor form on a one-channel layer (same weights,
codes, steps and gradients), hold one step per channel that its own channel sets, and keep the exact weight
``codes * step`` through its re-quantizations.
"""

import pytest
import torch

from mpq_cli.errors import MpqError
from mpq_cli.methods.alq import ALQConfig
from mpq_cli.methods.bmpq import BMPQWeight, fixed_point_codes, normalized_bit_gradient, ternary_codes
from mpq_cli.methods.bsq import BSQWeight
from mpq_cli.methods.csq import CSQConfig, CSQWeight
from mpq_cli.methods.uniform import UniformConfig
from mpq_cli.quant.bits import canonicalize_codes, canonicalize_rows, round_to_bits
from mpq_cli.quant.primitives import dequantize, least_squares_scale, lsq_quantize, quantize_codes


def _weight(shape, seed=0):
    torch.manual_seed(seed)
    # channels of very different magnitude: a per-tensor step is set by the largest
    gains = torch.logspace(-2, 0, shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    return torch.randn(shape) * gains


def _quantizers(weight, granularity):
    """One quantizer per method, built as each method builds it."""
    return {
        "csq": CSQWeight(weight, CSQConfig(granularity=granularity), None),
        "bsq": BSQWeight(weight, 6, 8, fixed=False, granularity=granularity),
        "bmpq": BMPQWeight(weight, 4, 8, ternary=True, granularity=granularity),
        "bmpq-ternary": BMPQWeight(weight, 2, 8, ternary=True, granularity=granularity),
    }


@pytest.mark.parametrize("name", ["csq", "bsq", "bmpq", "bmpq-ternary"])
def test_on_a_one_channel_layer_the_channel_form_is_the_tensor_form(name):
    weight = _weight((1, 3, 3, 3))
    per_tensor, per_channel = _quantizers(weight, "tensor")[name], _quantizers(weight, "channel")[name]
    for q in (per_tensor, per_channel):
        q.train()
    a, b = per_tensor.train_weight(), per_channel.train_weight()
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)
    grad = torch.randn_like(a)
    a.backward(grad)
    b.backward(grad)
    for (pa, ta), (pb, tb) in zip(per_tensor.named_parameters(), per_channel.named_parameters(), strict=True):
        assert pa == pb
        if ta.grad is None:
            assert tb.grad is None
            continue
        assert torch.allclose(ta.grad.reshape(-1), tb.grad.reshape(-1), rtol=1e-5, atol=1e-9), pa
    codes_t, step_t = per_tensor.exact_codes()
    codes_c, step_c = per_channel.exact_codes()
    assert torch.equal(codes_t, codes_c)
    assert step_t.dim() == 0 and step_c.shape == (1, 1, 1, 1)
    assert torch.equal(step_t.reshape(1), step_c.reshape(1))


@pytest.mark.parametrize("name", ["csq", "bsq", "bmpq"])
def test_each_channel_has_its_own_step_set_by_its_own_weights(name):
    weight = _weight((6, 4, 3, 3))
    q = _quantizers(weight, "channel")[name]
    codes, step = q.exact_codes()
    assert step.shape == (6, 1, 1, 1)
    # every channel's largest weight sits at (about) its grid's largest code: no channel is crushed to zero
    top = codes.reshape(6, -1).abs().amax(1)
    levels = {"csq": 255, "bsq": 63, "bmpq": 7}[name]
    assert bool((top == levels).all()), top
    assert torch.allclose(step.reshape(-1), weight.reshape(6, -1).abs().amax(1) / levels)
    # the weight evaluation uses is exactly codes times each channel's step
    q.eval()
    assert torch.equal(q(), codes.float() * step + 0.0)
    assert torch.equal(q(), dequantize(codes, step.reshape(-1)))
    # a per-tensor step leaves the smallest channel's codes near zero; per channel they span the grid
    codes_t, _ = _quantizers(weight, "tensor")[name].exact_codes()
    assert int(codes_t[0].abs().max()) < max(levels // 10, 1)


def test_uniform_starts_each_channel_at_its_own_least_squares_clip():
    weight = _weight((5, 3, 3, 3))
    method_cfg = UniformConfig(target_bits=3, granularity="channel")
    from mpq_cli.methods import get_method

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 6, 4))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    method = get_method("uniform")(method_cfg)
    method.prepare(model)
    q = method.quantizers()["0"]
    codes, step = q.exact_codes()
    assert step.shape == (5, 1, 1, 1)
    for c in range(5):  # channel c's step is the per-tensor least-squares step of channel c alone
        expected = least_squares_scale(weight[c], 3) / 7
        assert torch.allclose(step[c].reshape(()), expected, rtol=1e-6)
    # LSQ's gradient scale counts a channel's weights (Sec. 2.2): with N/C weights per step, not N
    q.train()
    out = q.train_weight()
    out.sum().backward()
    assert q.step.grad.shape == (5, 1, 1, 1)


def test_lsq_gradient_scale_counts_weights_per_step():
    torch.manual_seed(0)
    w = torch.randn(4, 25)
    one = torch.full((), 0.1, requires_grad=True)
    per = torch.full((4, 1), 0.1, requires_grad=True)
    lsq_quantize(w, one, 2).sum().backward()
    lsq_quantize(w, per, 2).sum().backward()
    # the same raw gradient, summed over 4x fewer weights and scaled by 1/sqrt(25 * 3) instead of 1/sqrt(100 * 3)
    assert torch.allclose(per.grad.sum() / 2, one.grad, rtol=1e-5)


def test_least_squares_per_channel_is_each_channels_own_fit():
    weight = _weight((7, 20))
    per_channel = least_squares_scale(weight, 2, granularity="channel")
    assert per_channel.shape == (7, 1)
    for c in range(7):
        assert torch.equal(per_channel[c].reshape(()), least_squares_scale(weight[c], 2))
    # per tensor is one value, unchanged by the option
    assert least_squares_scale(weight, 2).dim() == 0


def test_bmpq_per_channel_codes():
    weight = _weight((4, 10))
    codes, step = fixed_point_codes(weight, 4, "channel")
    assert step.shape == (4, 1)
    assert torch.equal(codes, quantize_codes(weight, weight.abs().amax(1, keepdim=True), 3))
    codes, step = ternary_codes(weight, "channel")
    for c in range(4):
        one_codes, one_step = ternary_codes(weight[c])
        assert torch.equal(codes[c], one_codes) and torch.equal(step[c].reshape(()), one_step)
    grad = torch.randn_like(weight)
    # NBG per channel: each weight's bit gradients at its own channel's q_max step
    expected = torch.stack([normalized_bit_gradient(grad[c], weight[c], 8) for c in range(4)]).mean()
    assert torch.allclose(normalized_bit_gradient(grad, weight, 8, "channel"), expected)


def test_bsq_requantization_drops_each_channels_zero_lsbs_and_keeps_the_function():
    weight = _weight((3, 8))
    q = BSQWeight(weight, 6, 8, fixed=False, granularity="channel")
    step = torch.tensor([0.1, 0.2, 0.3]).reshape(3, 1)
    codes = torch.tensor([[4, -8, 12, 0, 4, 8, -4, 0], [1, 3, -5, 7, 0, 0, 1, 1], [2, 6, -2, 0, 0, 2, 2, -6]])
    q.load_codes(codes.to(torch.int32), step, 6)
    q.eval()
    before = q().clone()
    info = q.requantize()
    assert info["bits_after"] == 3  # channel 1 needs 3 magnitude bits; channels 0 and 2 drop 2 and 1 LSBs
    assert q.bits_after_requantization() == 3
    after_codes, after_step = q.exact_codes()
    assert torch.allclose(after_step.reshape(-1), torch.tensor([0.4, 0.2, 0.6]) / 7 * 7)
    assert torch.equal(q(), before)
    # per tensor, the shared factor is 1 (channel 1 is odd): nothing to drop below
    assert canonicalize_codes(codes)[1] == 0
    reduced, shifts, bits = canonicalize_rows(codes)
    assert shifts.tolist() == [2, 0, 1] and bits == 3


def test_round_to_bits_weighs_channels_by_their_squared_step():
    codes = torch.tensor([[100, -3, 2, 1], [1, 1, -1, 1]])
    # with one row, row weights change nothing
    one = codes[:1]
    plain, weighted = round_to_bits(one, 2, 8), round_to_bits(one, 2, 8, row_weights=torch.tensor([5.0]))
    assert torch.equal(plain[0], weighted[0]) and plain[1] == weighted[1]
    # a row whose step is tiny cannot decide the block: the heavy row's error rules
    light, heavy = torch.tensor([1e-6, 1.0]), torch.tensor([1.0, 1e-6])
    assert round_to_bits(codes, 2, 8, row_weights=light)[1] == 0
    assert round_to_bits(codes, 2, 8, row_weights=heavy)[1] > 0


def test_csq_per_channel_restart_carries_each_channels_residual():
    weight = _weight((4, 6))
    q = CSQWeight(weight, CSQConfig(granularity="channel"), None)
    q.train()
    # at the start the relaxed model is the checkpoint (residuals carried per channel)
    assert torch.allclose(q.train_weight(), weight, atol=1e-6, rtol=1e-4)
    codes, step, mask = q.requantized(3, relaxed=True)
    assert step.shape == (4, 1)
    q.load_codes(codes, step, mask, fixed=True, target=weight)
    assert torch.equal(q.exact_codes()[0], codes)
    assert q.bit_weights().shape == (4, 1, 8)


def test_alq_and_unknown_granularities_are_refused():
    with pytest.raises(MpqError, match="ALQ"):
        ALQConfig(target_bits=1, granularity="channel")
    with pytest.raises(MpqError, match="--granularity must be one of tensor, channel"):
        CSQConfig(granularity="row")
    # the default is left out of a saved config: runs before the option keep their fingerprints
    assert "granularity" not in CSQConfig().to_dict()
    assert CSQConfig(granularity="channel").to_dict()["granularity"] == "channel"


@pytest.mark.parametrize("method, target", [("csq", "2"), ("bsq", "2"), ("bmpq", "4")])
def test_each_method_searches_exports_and_evaluates_per_channel_exactly(method, target, fp_run, tmp_path):
    """A per-channel search of every integer-code method (uniform's: tests/test_channel_steps_format.py) keeps
    one step per output channel in its run and file, and the packed file measures what the run measured."""
    import json

    from conftest import SMALL, run_json
    from safetensors.torch import load_file

    out = tmp_path / method
    args = ["search", "--method", method, "--target-bits", target, "--model", "lenet5", "--granularity", "channel"]
    summary = run_json(*args, "--checkpoint", fp_run[0], *SMALL, "--epochs", "1", "--out", out)
    assert json.loads((out / "config.json").read_text())["method_config"]["granularity"] == "channel"
    codes = load_file(str(out / "codes.safetensors"))
    steps = {k: v for k, v in codes.items() if k.endswith(".step")}
    assert steps and all(v.shape == (codes[k[: -len("step")] + "codes"].shape[0],) for k, v in steps.items())
    run_json("export", out, "-o", tmp_path / "f.safetensors")
    assert run_json("eval", tmp_path / "f.safetensors")["top1"] == summary["top1"]
    inspected = run_json("inspect", tmp_path / "f.safetensors")
    assert inspected["avg_stored_bits"] == summary["avg_stored_bits"]
    assert {row["granularity"] for row in inspected["layers"]} == {"channel"}
    # ONNX: each weight a per-axis DequantizeLinear (axis 0, a scale per output channel), checked in onnxruntime
    import onnx
    from onnx import numpy_helper

    exported = run_json("export", out, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert exported["top1_agreement"] == 1.0 and exported["max_relative_difference"] <= 1e-4
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith(".dq")]
    # codes wider than 8 bits (BMPQ's 16-bit edges) stay FP32 in ONNX, as its report says
    integer = [name for name, kind in exported["weights"].items() if not kind.startswith("FP32")]
    assert integer and sorted(n.name for n in nodes) == sorted(f"{name}.dq" for name in integer)
    for node in nodes:
        name = node.name[: -len(".dq")]
        assert [(a.name, a.i) for a in node.attribute] == [("axis", 0)], name
        assert numpy_helper.to_array(inits[node.input[1]]).shape == (codes[f"{name}.codes"].shape[0],), name


def test_uniform_on_a_one_channel_layer_the_channel_form_is_the_tensor_form():
    """Uniform's per-channel start (each channel's least-squares clip) and LSQ's gradient (scaled by a channel's
    weights) reduce to the per-tensor ones when the layer has one output channel."""
    from torch import nn

    from mpq_cli.methods.uniform import Uniform

    weights = {}
    for granularity in ("tensor", "channel"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 1, 3), nn.Flatten(), nn.Linear(36, 1))
        method = Uniform(UniformConfig(target_bits=2, granularity=granularity))
        method.prepare(model)
        q = method.layers["0"].weight_quantizer
        q.train()
        w = q.train_weight()
        w.backward(torch.arange(w.numel(), dtype=w.dtype).reshape(w.shape).sin())
        weights[granularity] = (w.detach(), q.learned_step().grad.reshape(-1), q.weight.grad, *q.exact_codes())
    tensor, channel = weights["tensor"], weights["channel"]
    assert torch.allclose(tensor[0], channel[0], rtol=1e-6, atol=1e-8)
    assert torch.allclose(tensor[1], channel[1], rtol=1e-5, atol=1e-9)  # the step's LSQ gradient
    assert torch.allclose(tensor[2], channel[2])  # the latent weight's straight-through gradient
    assert torch.equal(tensor[3], channel[3])
    assert tensor[4].dim() == 0 and channel[4].shape == (1, 1, 1, 1)
    assert torch.equal(tensor[4].reshape(1), channel[4].reshape(1))


def test_bsq_on_a_one_channel_layer_requantization_is_the_per_tensor_one():
    """Sec. 3.3's re-quantization per channel (each channel drops its own zero LSBs) is the layer's rule when the
    layer has one channel: same codes, precision and step."""
    codes = torch.tensor([[4, -12, 8, 0, 20, -4]], dtype=torch.int32)  # a shared factor of 4: 2 LSBs to drop
    results = {}
    for granularity in ("tensor", "channel"):
        q = BSQWeight(_weight((1, 6)), 6, 8, fixed=False, granularity=granularity)
        step = torch.tensor(0.05) if granularity == "tensor" else torch.tensor([[0.05]])
        q.load_codes(codes, step, 6)
        info = q.requantize()
        results[granularity] = (info["bits_after"], q.bits_after_requantization(), *q.exact_codes())
    (bits_t, projected_t, codes_t, step_t), (bits_c, projected_c, codes_c, step_c) = results.values()
    assert bits_t == bits_c == projected_t == projected_c == 3  # |codes| / 4 <= 5: 3 magnitude bits
    assert torch.equal(codes_t, codes_c) and codes_t.abs().max() == 5
    assert torch.equal(step_t.reshape(1), step_c.reshape(1)) and torch.allclose(step_t, torch.tensor(0.2))
