import json

import pytest
import torch

from mpq_cli.api import build_scheme
from mpq_cli.errors import MpqError
from mpq_cli.layers import LayerSelection
from mpq_cli.methods import get_method
from mpq_cli.methods.uniform import UniformConfig, UniformWeight
from mpq_cli.quant.primitives import dequantize
from mpq_cli.scheme import LayerEntry, Scheme


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 8, 16])
def test_uniform_eval_weight_is_exact_codes(bits):
    torch.manual_seed(bits)
    q = UniformWeight(torch.randn(6, 5), bits)
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
