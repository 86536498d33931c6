import json

import pytest
import torch
from conftest import SMALL, run_json

from mpq_cli.api import build_scheme
from mpq_cli.errors import MpqError
from mpq_cli.layers import LayerSelection
from mpq_cli.methods import get_method
from mpq_cli.methods.uniform import LSQWeight, UniformConfig, UniformWeight
from mpq_cli.quant.primitives import dequantize, least_squares_scale
from mpq_cli.scheme import LayerEntry, Scheme


@pytest.mark.parametrize("quantizer", [UniformWeight, LSQWeight], ids=["version-1", "lsq"])
@pytest.mark.parametrize("bits", [0, 1, 2, 3, 8, 16])
def test_uniform_eval_weight_is_exact_codes(bits, quantizer):
    torch.manual_seed(bits)
    q = quantizer(torch.randn(6, 5), bits)
    q.eval()
    codes, step = q.exact_codes()
    assert codes.abs().max() <= 2**bits - 1
    assert torch.equal(q(), dequantize(codes, step))
    q.train()
    assert torch.allclose(q(), q.eval()(), atol=1e-6)  # the STE forward is the same grid


def test_uniform_takes_whole_bits_and_respects_overrides(tiny):
    method = get_method("uniform")(UniformConfig(target_bits=3), LayerSelection(fix_bits={"fc": 5}))
    method.prepare(tiny)
    assert method.layer_bits() == {"conv": 3, "fc": 5}
    with pytest.raises(MpqError, match="whole number, got 2.6"):  # one width cannot average 2.6 bits
        UniformConfig(target_bits=2.6)


def test_scheme_statistics_are_parameter_weighted(tiny):
    method = get_method("uniform")(UniformConfig(target_bits=2), LayerSelection(keep_fp=["conv"]))
    method.prepare(tiny)
    scheme = build_scheme(method, tiny)
    fc = scheme.layers[1]
    assert [e.name for e in scheme.layers] == ["conv", "fc"] and scheme.layers[0].is_fp
    assert fc.bits == 2 and fc.stored_bits in (2, 3)  # 2 magnitude bits + sign, fewer if the codes need less
    # conv bias 6 + BN (6 weight, 6 bias, 6 mean, 6 var) + fc bias 10
    assert scheme.other_params == 6 + 24 + 10
    assert scheme.avg_bits == 2.0
    assert scheme.fp32_bytes == 4 * (54 + 240 + 40)
    expected = 54 * 4 + 240 * fc.stored_bits / 8 + 4 + 40 * 4
    assert scheme.model_bytes == pytest.approx(expected)


def test_scheme_json_round_trip(tmp_path):
    scheme = Scheme(
        "csq", [LayerEntry("a", "conv2d", [2, 2], 4, 3, 4), LayerEntry("b", "linear", [4, 4], 16, None)], other_params=7
    )
    scheme.save(tmp_path / "s.json")
    again = Scheme.load(tmp_path / "s.json")
    assert again == scheme
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["avg_bits"] == 3.0
    zero = Scheme("csq", [LayerEntry("z", "linear", [4], 4, 0, 0)])
    assert zero.model_bytes == 0 and zero.avg_bits == 0


# -- the strong baseline (issue 28, part 3): least-squares clip, LSQ step, version 1 kept ---------------------
def test_uniform_starts_at_the_least_squares_clip_and_learns_the_step_as_lsq(tiny):
    weights = {"conv": tiny.conv.weight.detach().clone(), "fc": tiny.fc.weight.detach().clone()}
    method = get_method("uniform")(UniformConfig(target_bits=2), LayerSelection(fix_bits={"fc": 5}))
    method.prepare(tiny)
    for name, bits in (("conv", 2), ("fc", 5)):
        q = method.quantizers()[name]
        assert isinstance(q, LSQWeight) and q.bits == bits
        # the parameter is the step (LSQ Eq. 1): the least-squares clip over the largest code
        assert float(q.step.detach()) == pytest.approx(float(least_squares_scale(weights[name], bits)) / (2**bits - 1))
    groups = method.param_groups(tiny, 5e-4)
    steps = {id(q.step) for q in method.quantizers().values()}
    assert {id(p) for p in groups[1]["params"]} == steps and groups[1]["weight_decay"] == 0.0
    assert not steps & {id(p) for p in groups[0]["params"]}


def test_a_version_1_config_keeps_max_init_and_the_plain_gradient(tiny):
    old = UniformConfig.from_dict({"version": 1, "target_bits": 2.0})
    assert (old.step_init, old.step_grad) == ("max", "plain")
    assert UniformConfig.from_dict(UniformConfig(target_bits=2).to_dict()) == UniformConfig(target_bits=2)
    top = float(tiny.conv.weight.detach().abs().max())
    method = get_method("uniform")(old)
    method.prepare(tiny)
    q = method.quantizers()["conv"]
    assert isinstance(q, UniformWeight) and float(q.scale.detach()) == top  # version 1's parameter and start
    for bad in ({"step_init": "min"}, {"step_grad": "adam"}):
        with pytest.raises(MpqError, match="must be one of"):
            UniformConfig(target_bits=2, **bad)


def test_a_run_made_before_version_2_loads_and_evaluates_as_it_was_made(fp_run, tmp_path):
    out = tmp_path / "v1"
    summary = run_json(
        "search", "--method", "uniform", "--target-bits", "2", "--model", "lenet5", "--checkpoint", fp_run[0],
        *SMALL, "--epochs", "1", "--step-init", "max", "--step-grad", "plain", "--out", out,
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    method_config = config["method_config"]
    del method_config["step_init"], method_config["step_grad"]  # what version 1 wrote
    method_config["version"] = 1
    (out / "config.json").write_text(json.dumps(config))
    assert run_json("eval", out, "--device", "cpu")["top1"] == summary["top1"]
    tuned = run_json("finetune", out, "--epochs", "1", "--out", tmp_path / "ft", "--device", "cpu")
    assert tuned["avg_bits"] == 2.0


# -- --edge-bits: the first and last layer at fixed bits, for every method ---------------------------------------
def test_edge_bits_fix_the_first_and_last_layer_after_fix_bits_and_keep_fp(tiny):
    method = get_method("uniform")(UniformConfig(target_bits=2), LayerSelection(edge_bits=8))
    method.prepare(tiny)
    assert method.layer_bits() == {"conv": 8, "fc": 8}
    torch.manual_seed(0)
    from conftest import TinyNet

    fixed = get_method("uniform")(UniformConfig(target_bits=2), LayerSelection(edge_bits=8, fix_bits={"fc": 5}))
    fixed.prepare(TinyNet())
    assert fixed.layer_bits() == {"conv": 8, "fc": 5}  # an explicit --fix-bits wins
    kept = get_method("uniform")(UniformConfig(target_bits=2), LayerSelection(edge_bits=8, keep_fp=["conv"]))
    kept.prepare(TinyNet())
    assert kept.layer_bits() == {"fc": 8}  # an FP edge stays FP
    for bad in (0, 17, 2.5, True):
        with pytest.raises(MpqError, match="--edge-bits"):
            LayerSelection(edge_bits=bad)
    assert "edge_bits" not in LayerSelection().to_dict()  # older runs keep their fingerprints
    assert LayerSelection.from_dict(LayerSelection(edge_bits=8).to_dict()) == LayerSelection(edge_bits=8)


@pytest.mark.parametrize("method", ["uniform", "csq"])
def test_edge_bits_8_puts_exactly_the_edges_at_8_and_the_file_is_exact(method, fp_run, tmp_path):
    out = tmp_path / method
    summary = run_json(
        "search", "--method", method, "--target-bits", "2", "--model", "lenet5", "--checkpoint", fp_run[0],
        *SMALL, "--epochs", "1", "--lr", "0.01", "--edge-bits", "8", "--out", out,
    )  # fmt: skip
    layers = json.loads((out / "scheme.json").read_text())["layers"]
    bits = {e["name"]: e["bits"] for e in layers}
    assert list(bits) == ["features.0", "features.3", "classifier.1", "classifier.3"]
    assert bits["features.0"] == bits["classifier.3"] == 8
    assert all(1 <= bits[n] <= 2 for n in ("features.3", "classifier.1"))  # the rest at or under the target
    if method == "uniform":
        assert bits["features.3"] == bits["classifier.1"] == 2
    # the average counts the 8-bit edges, weighted by parameters
    expected = sum(e["bits"] * e["params"] for e in layers) / sum(e["params"] for e in layers)
    assert summary["avg_bits"] == pytest.approx(expected) and summary["avg_bits"] > min(bits.values())
    assert json.loads((out / "config.json").read_text())["selection"]["edge_bits"] == 8
    packed = tmp_path / f"{method}.safetensors"
    run_json("export", out, "-o", packed, "--quiet")
    assert [r["bits"] for r in run_json("inspect", packed)["layers"]] == list(bits.values())
    assert run_json("eval", packed, "--device", "cpu")["top1"] == summary["top1"]  # the file is the run
