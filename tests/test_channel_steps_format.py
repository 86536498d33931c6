"""Steps per output channel (issue 30) in the run's codes, the packed format 1.2, inspect and ONNX: exact round
trips, sizes that count every step, older files still read, hostile headers refused in one line."""

import json

import pytest
import torch
from conftest import invoke, rewrite_packed, run_json
from safetensors.torch import load_file

import mpq_cli
from mpq_cli.errors import MpqError
from mpq_cli.forms import FORMS, LayerCodes
from mpq_cli.packing.encodings import decode_codes, decode_weight, encode_codes, plan_codes
from mpq_cli.packing.format import FORMAT, READABLE_FORMATS, PackedFile, layer_entry, weight_tensor_name, write_packed
from mpq_cli.packing.header import GRANULARITIES
from mpq_cli.quant.primitives import GRANULARITIES as QUANT_GRANULARITIES
from mpq_cli.quant.primitives import dequantize
from mpq_cli.report import markdown_size_report


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _codes(shape, values, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor(values)
    return values[torch.randint(0, len(values), shape, generator=gen)].to(torch.int32)


def _steps(channels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand(channels, generator=gen) - 0.3) * 0.1).to(torch.float32)  # some negative, all distinct


# codes per layer: contiguous (int), non-contiguous CSQ bits {0, 3} (lut), one output channel, a Linear
LAYERS = {
    "conv_int": ((8, 3, 3, 3), list(range(-7, 8))),
    "conv_lut": ((6, 40, 3, 3), [0, 1, -1, 7, -7, 8, -8, 9, -9]),
    "one_channel": ((1, 12), list(range(-3, 4))),
    "linear": ((10, 24), [-2, 0, 2]),  # a shared power of two: shifted out
}


def test_the_format_and_the_quantizers_share_one_vocabulary():
    assert GRANULARITIES == QUANT_GRANULARITIES == ("tensor", "channel")
    assert FORMAT == "mpq.packed/1.2" and READABLE_FORMATS == ("mpq.packed/1", "mpq.packed/1.1", FORMAT)


@pytest.mark.parametrize("name", list(LAYERS))
def test_per_channel_codes_encode_and_decode_exactly(name):
    shape, values = LAYERS[name]
    codes, step = _codes(shape, values), _steps(shape[0])
    encoded = encode_codes(codes, step)
    assert encoded.encoding == ("lut" if name == "conv_lut" else "int")
    assert encoded.fields["granularity"] == "channel"
    assert encoded.tensors["step"].shape == (shape[0],)
    assert encoded.fields.get("shift") == (1 if name == "linear" else 0 if encoded.encoding == "int" else None)
    back, back_step = decode_codes(encoded.encoding, encoded.fields, encoded.tensors, shape)
    assert torch.equal(back, codes) and torch.equal(bits_of(back_step), bits_of(step))
    decoded = decode_weight(encoded.encoding, encoded.fields, encoded.tensors, shape)
    assert torch.equal(bits_of(decoded), bits_of(dequantize(codes, step)))
    # every step is counted: the plan that chose the encoding, and the bytes it stores
    plan = plan_codes(codes, shape[0])
    table = encoded.tensors["table"].numel() if "table" in encoded.tensors else 0
    assert plan.extra_values == shape[0] + table
    assert (
        encoded.payload_bytes
        == plan.payload_bytes(codes.numel())
        == encoded.tensors["packed"].numel() + 4 * (shape[0] + table)
    )


def test_a_per_tensor_layer_is_encoded_as_before():
    codes = _codes((8, 3, 3, 3), list(range(-7, 8)))
    encoded = encode_codes(codes, torch.tensor(0.02))
    assert encoded.fields == {"width": 4, "shift": 0} and encoded.tensors["step"].shape == ()
    assert plan_codes(codes).extra_values == 1


def test_a_zero_layer_per_channel_stores_nothing():
    encoded = encode_codes(torch.zeros(4, 3, dtype=torch.int32), _steps(4))
    assert encoded.encoding == "zero" and encoded.fields == {} and encoded.payload_bytes == 0


@pytest.mark.parametrize(
    "step,message",
    [(torch.ones(3), "one per output channel"), (torch.ones(4, 1), "0-d or one per output channel")],
    ids=["length", "rank"],
)
def test_encode_refuses_steps_that_do_not_fit(step, message):
    with pytest.raises(ValueError, match=message):
        encode_codes(torch.ones(4, 2, dtype=torch.int32), step)


@pytest.mark.parametrize(
    "fields,step,message",
    [
        ({"granularity": "channel"}, torch.ones(3), "step must be 4 float32 values"),
        ({"granularity": "channel"}, torch.tensor(1.0), "step must be 4 float32 values"),
        ({"granularity": "channel"}, torch.tensor([1.0, float("inf"), 1.0, 1.0]), "every step must be finite"),
        ({"granularity": "channel"}, torch.ones(4, dtype=torch.float64), "step must be 4 float32 values"),
        ({"granularity": "row"}, torch.ones(4), "unknown granularity 'row'"),
        ({"granularity": ["channel"]}, torch.ones(4), "unknown granularity"),
        ({}, torch.ones(4), "step must be one float32 value"),
    ],
    ids=["short", "scalar", "infinite", "float64", "unknown", "list", "tensor-with-4"],
)
def test_decoders_refuse_bad_steps(fields, step, message):
    tensors = {"packed": torch.zeros(1, dtype=torch.uint8), "step": step}
    with pytest.raises(ValueError, match=message):
        decode_weight("int", {"width": 2, "shift": 0, **fields}, tensors, (4,))


# -- forms: from a quantizer's exact codes to the run's tensors and back ------------------------------------
class _Quantizer:
    def __init__(self, codes, step):
        self.codes, self.step = codes, step

    def exact_codes(self):
        return self.codes, self.step


@pytest.mark.parametrize(
    "shape,step_shape,kept",
    [((6, 2, 3, 3), (6, 1, 1, 1), (6,)), ((1, 2, 3, 3), (1, 1, 1, 1), (1,)), ((10, 24), (10, 1), (10,))]
    + [((6, 2, 3, 3), (), ()), ((1, 12), (), ())],
    ids=["conv-channel", "one-channel", "linear-channel", "conv-tensor", "one-channel-tensor"],
)
def test_capture_keeps_one_step_per_output_channel(shape, step_shape, kept):
    codes = _codes(shape, list(range(-3, 4)))
    step = _steps(shape[0]).reshape(step_shape) if step_shape else torch.tensor(0.05)
    lc = FORMS["codes"].capture(_Quantizer(codes, step), 2)
    assert lc.step.shape == kept and lc.step.dtype == torch.float32
    run = FORMS["codes"].run_tensors("layer", lc)
    assert run["layer.step"].shape == kept
    encoded = FORMS["codes"].encode("run", "layer", shape, run)
    assert ("granularity" in encoded.fields) == bool(kept)
    decoded = decode_weight(encoded.encoding, encoded.fields, encoded.tensors, shape)
    assert torch.equal(bits_of(decoded), bits_of(dequantize(codes, step)))
    sizes = FORMS["codes"].scheme_sizes(lc, codes.numel())
    assert sizes.scales == (shape[0] if kept else 1)
    pair_codes, pair_step = FORMS["codes"].dequantize_pair("layer", run)
    assert pair_step.shape == kept
    assert torch.equal(dequantize(pair_codes, pair_step), dequantize(codes, step))


def test_a_shifted_per_channel_layer_keeps_its_steps_for_onnx():
    codes, step = _codes((10, 24), [-4, 0, 4, 8]), _steps(10)
    run = FORMS["codes"].run_tensors("fc", LayerCodes(codes, step, 3))
    pair_codes, pair_step = FORMS["codes"].dequantize_pair("fc", run)
    assert int(pair_codes.abs().max()) == 2 and torch.equal(pair_step, step * 4)
    assert torch.equal(bits_of(dequantize(pair_codes, pair_step)), bits_of(dequantize(codes, step)))


@pytest.mark.parametrize("step_shape", [(5,), (1,), (6, 1)], ids=["short", "one-of-six", "matrix"])
def test_a_run_whose_step_does_not_fit_its_layer_is_refused(step_shape):
    run = {"conv.codes": torch.ones(6, 4, dtype=torch.int32), "conv.step": torch.ones(step_shape)}
    with pytest.raises(MpqError, match=r"runs/r/codes.safetensors: the step of 'conv' has shape"):
        FORMS["codes"].encode("runs/r", "conv", (6, 4), run)


# -- a whole packed file ------------------------------------------------------------------------------------
@pytest.fixture
def channel_file(tmp_path):
    """A packed file of every kind of layer: per channel (int, lut, one output channel, a shifted Linear), one
    per tensor and one all zero; returns ``(path, {layer: (codes, step)})``."""
    layers = {name: (_codes(shape, values, i), _steps(shape[0], i)) for i, (name, (shape, values)) in enumerate(
        LAYERS.items()
    )}  # fmt: skip
    layers["per_tensor"] = (_codes((5, 7), list(range(-3, 4))), torch.tensor(0.125))
    layers["zero"] = (torch.zeros(3, 4, dtype=torch.int32), _steps(3))
    tensors, entries = {}, []
    for name, (codes, step) in layers.items():
        encoded = encode_codes(codes, step)
        tensors.update({weight_tensor_name(name, s): t for s, t in encoded.tensors.items()})
        entries.append(layer_entry(name, "conv2d", list(codes.shape), 3, encoded, None))
    path = tmp_path / "channel.safetensors"
    write_packed(path, {"model": {"name": "tiny"}, "method": "uniform", "layers": entries}, tensors)
    return path, layers


def test_a_file_of_per_channel_layers_decodes_to_exactly_its_weights(channel_file):
    path, layers = channel_file
    packed = PackedFile.open(path)
    assert packed.header["format"] == "mpq.packed/1.2"
    granularity = {e["name"]: e.get("granularity") for e in packed.layers}
    assert granularity == {**{name: "channel" for name in LAYERS}, "per_tensor": None, "zero": None}
    assert packed.layer("conv_lut")["encoding"] == "lut"
    for name, (codes, step) in layers.items():
        assert torch.equal(bits_of(packed.decode_layer(name)), bits_of(dequantize(codes, step))), name
        if name in LAYERS:
            assert list(packed.tensors[weight_tensor_name(name, "step")].shape) == [codes.shape[0]]


def test_inspect_shows_the_steps_and_counts_their_bytes(channel_file):
    path, layers = channel_file
    report = run_json("inspect", path)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv_int"]["granularity"] == "channel" and rows["conv_int"]["steps"] == 8
    assert rows["one_channel"]["granularity"] == "channel" and rows["one_channel"]["steps"] == 1
    assert (rows["per_tensor"]["granularity"], rows["per_tensor"]["steps"]) == ("tensor", 1)
    assert (rows["zero"]["granularity"], rows["zero"]["steps"]) == (None, 0)
    tensors = load_file(str(path))
    for name, (codes, _) in layers.items():
        own = [t for n, t in tensors.items() if n.startswith(f"{name}.weight.")]
        assert rows[name]["bytes"] == sum(t.nbytes for t in own)
        assert rows[name]["stored_bits"] == 8 * rows[name]["bytes"] / codes.numel()
    # conv_int: 216 weights at 4 bits (108 bytes) and 8 steps of 4 bytes
    assert rows["conv_int"]["bytes"] == 108 + 4 * 8
    table = invoke("inspect", path)
    assert table.exit_code == 0 and "8/ch" in table.stdout and "steps" in table.stdout
    export_md = markdown_size_report(report, path.name)
    assert "| 8/ch |" in export_md and "| 1 |" in export_md


# -- older files and hostile headers ------------------------------------------------------------------------
def test_a_file_written_as_format_1_1_still_loads(csq_run, tmp_path):
    """A per-tensor file is 1.1's layout under a new version string: the same file marked 1.1 (as mpq 1.1 wrote
    it, re-signed) loads to the same model."""
    new = tmp_path / "new.safetensors"
    run_json("export", csq_run[0], "-o", new)
    old = tmp_path / "old.safetensors"
    rewrite_packed(new, old, lambda h: h.update(format="mpq.packed/1.1"))
    assert PackedFile.open(old).header["format"] == "mpq.packed/1.1"
    assert not any("granularity" in e for e in PackedFile.open(new).layers)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(mpq_cli.load_packed(old)(x), mpq_cli.load_packed(new)(x))
    assert run_json("inspect", old)["format"] == "mpq.packed/1.1"


def _set(layer, **fields):
    def edit(header):
        entry = next(e for e in header["layers"] if e["name"] == layer)
        entry.update(fields)

    return edit


def _step_tensor(layer, value):
    def edit(tensors):
        tensors[weight_tensor_name(layer, "step")] = value

    return edit


HOSTILE = {
    "channel-in-1.1": (lambda h: h.update(format="mpq.packed/1.1"), None, "is a field of format mpq.packed/1.2"),
    "unknown": (_set("conv_int", granularity="row"), None, "unknown granularity 'row'"),
    "not-a-string": (_set("conv_int", granularity=["channel"]), None, "unknown granularity"),
    "on-zero": (_set("zero", granularity="channel"), None, "only int and lut layers have a granularity"),
    "tensor-with-8-steps": (_set("conv_int", granularity="tensor"), None, "must hold one value"),
    "channel-with-1-step": (_set("per_tensor", granularity="channel"), None, "must be F32 with 1 dimension"),
    "short-step": (None, _step_tensor("conv_int", torch.ones(7)), "holds 7 steps; layer 'conv_int' has 8 output"),
    "long-step": (None, _step_tensor("one_channel", torch.ones(2)), "holds 2 steps; layer 'one_channel' has 1"),
    "f64-step": (None, _step_tensor("conv_int", torch.ones(8, dtype=torch.float64)), "must be F32"),
    "2d-step": (None, _step_tensor("conv_int", torch.ones(8, 1)), "must be F32 with 1 dimension"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_granularity_is_refused_in_one_line(case, channel_file, tmp_path):
    edit_header, edit_tensors, message = HOSTILE[case]
    bad = tmp_path / "bad.safetensors"
    rewrite_packed(channel_file[0], bad, edit_header, edit_tensors)
    with pytest.raises(MpqError, match=message):
        PackedFile.open(bad)
    result = invoke("inspect", bad)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and message in result.output


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_per_channel_steps_are_refused(value, channel_file, tmp_path):
    steps = _steps(8)
    steps[3] = value
    bad = tmp_path / "bad.safetensors"
    rewrite_packed(channel_file[0], bad, edit_tensors=_step_tensor("conv_int", steps))
    with pytest.raises(MpqError, match="NaN or infinite"):
        PackedFile.open(bad).decode_layer("conv_int")


# -- a run with per-channel steps, end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def channel_export(channel_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("channel") / "u.safetensors"
    run_json("export", channel_run[0], "-o", out)
    return channel_run[0], out


def test_a_per_channel_run_exports_exactly(channel_export, channel_run):
    run, out = channel_export
    codes = load_file(str(run / "codes.safetensors"))
    packed = PackedFile.open(out)
    for entry in packed.layers:
        name = entry["name"]
        step = codes[f"{name}.step"]
        assert step.shape == (entry["shape"][0],) and entry["granularity"] == "channel"
        assert torch.equal(bits_of(packed.decode_layer(name)), bits_of(dequantize(codes[f"{name}.codes"], step)))
    assert run_json("eval", out)["top1"] == channel_run[1]["top1"]


def test_a_per_channel_runs_sizes_are_the_files(channel_export, channel_run):
    run, out = channel_export
    from_file, from_run = run_json("inspect", out), run_json("inspect", run)
    summary = json.loads((run / "summary.json").read_text())
    for key in ("avg_stored_bits", "weight_bytes", "file_bytes", "fp32_bytes"):
        assert from_run[key] == from_file[key] == summary[key], key
    assert [r["granularity"] for r in from_file["layers"]] == ["channel"] * 4
    # the scheme counts each layer's steps among its 4-byte scales, as the file stores them
    scheme = json.loads((run / "scheme.json").read_text())
    rows = {r["name"]: r for r in from_file["layers"]}
    for entry in scheme["layers"]:
        assert entry["scales"] == entry["shape"][0]
        packed_bytes = -(-entry["params"] * entry["stored_bits"] // 8)
        assert rows[entry["name"]]["bytes"] == packed_bytes + 4 * entry["scales"]


def test_a_per_channel_run_becomes_per_axis_dequantize_linear(channel_run, tmp_path):
    """Each layer's DequantizeLinear has a scale of C values on axis 0, and onnxruntime running it alone gives
    exactly the run's weight."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper

    run = channel_run[0]
    out = tmp_path / "u.onnx"
    summary = run_json("export", run, "--format", "onnx", "-o", out)
    assert summary["top1_agreement"] == 1.0 and summary["max_relative_difference"] <= 1e-4
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    codes = load_file(str(run / "codes.safetensors"))
    nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith(".dq")]
    assert sorted(n.name for n in nodes) == sorted(f"{name}.dq" for name in summary["weights"])
    for node in nodes:
        name = node.name[: -len(".dq")]
        assert [(a.name, a.i) for a in node.attribute] == [("axis", 0)]
        scale = numpy_helper.to_array(inits[node.input[1]])
        assert scale.shape == (codes[f"{name}.codes"].shape[0],) and len(node.input) == 2  # no zero point
        graph = helper.make_graph(
            [helper.make_node("DequantizeLinear", list(node.input), ["w"], axis=0)],
            "weight",
            [],
            [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)],
            [inits[i] for i in node.input],
        )
        single = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        session = onnxruntime.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(np.ascontiguousarray(session.run(None, {})[0]))
        expected = dequantize(codes[f"{name}.codes"], codes[f"{name}.step"])
        assert torch.equal(got, expected), name  # equal values (a -0.0 equals +0.0)


def test_a_per_channel_step_edited_in_the_file_is_refused_by_its_digest(channel_export, tmp_path):
    """The per-channel steps are payload like the codes: one channel's step changed without re-signing fails the
    tensor digest, so a file cannot silently rescale one channel."""
    _, out = channel_export
    steps = [k for k, v in load_file(str(out)).items() if k.endswith("step") and v.numel() > 1]
    assert steps  # one float32 per output channel, stored as its own tensor

    def double_one_channel(tensors):
        tensors[steps[0]] = tensors[steps[0]].clone()
        tensors[steps[0]][0] *= 2

    bad = tmp_path / "bad.safetensors"
    rewrite_packed(out, bad, edit_tensors=double_one_channel, resign=False)
    with pytest.raises(MpqError, match="SHA-256"):
        mpq_cli.load_packed(bad)
    result = invoke("eval", bad)
    assert result.exit_code == 2 and "corrupt" in result.output
