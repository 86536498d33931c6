"""mpq export --format onnx (issue 17): integer codes with DequantizeLinear, checked with onnxruntime."""

import builtins
import json

import onnx
from conftest import SMALL, invoke, run_json


def _initializers(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def test_onnx_export_of_a_csq_run(csq_run, tmp_path):
    out = tmp_path / "model.onnx"
    summary = run_json("export", csq_run[0], "--format", "onnx", "-o", out)
    assert summary["top1_agreement"] == 1.0 and summary["max_relative_difference"] <= 1e-4
    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 21
    inits = _initializers(out)
    report = json.loads((tmp_path / "model.onnx.report.json").read_text())
    for name, kind in report["weights"].items():
        if kind in ("int4", "int8"):
            codes = inits[f"{name}.weight_codes"]
            assert codes.data_type == {"int4": onnx.TensorProto.INT4, "int8": onnx.TensorProto.INT8}[kind]
            assert f"{name}.weight" not in inits  # the float weight is gone: DequantizeLinear makes it
    assert any(kind in ("int4", "int8") for kind in report["weights"].values())
    assert report["onnx_bytes"] == out.stat().st_size and report["packed_bytes"] > 0
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == sum(kind in ("int4", "int8") for kind in report["weights"].values())


def test_onnx_export_with_quantized_inputs(fp_run, tmp_path):
    run = tmp_path / "run"
    args = ["search", "--method", "uniform", "--target-bits", "3", "--act-bits", "4", "--model", "lenet5"]
    run_json(*args, "--checkpoint", fp_run[0], *SMALL, "--epochs", "1", "--lr", "0.01", "--out", run)
    summary = run_json("export", run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    # every input quantizer is PACT's bit for bit in onnxruntime; end to end, top-1 agrees
    assert summary["quantizers_exact"] == sum(v.endswith(")") and "int8" in v for v in summary["activations"].values())
    assert summary["quantizers_exact"] >= 3
    assert summary["top1_agreement"] >= 1 - summary["top1_flips_at_near_ties"] / summary["checked_images"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("QuantizeLinear") == summary["quantizers_exact"]


def test_onnx_export_refuses_a_bad_name_and_says_how_to_install(csq_run, tmp_path, monkeypatch):
    result = invoke("export", csq_run[0], "--format", "onnx", "-o", tmp_path / "model.bin")
    assert result.exit_code != 0 and ".onnx" in result.output and not (tmp_path / "model.bin").exists()
    result = invoke("export", csq_run[0], "--format", "tflite", "-o", tmp_path / "m.onnx")
    assert result.exit_code != 0 and "--format" in result.output
    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    result = invoke("export", csq_run[0], "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert result.exit_code != 0 and "pip install 'mpq-cli[onnx]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_alq_bases_are_decoded_and_said_so(fp_run, tmp_path):
    run = tmp_path / "alq"
    args = ["search", "--method", "alq", "--target-bits", "2", "--model", "lenet5", "--checkpoint", fp_run[0]]
    run_json(*args, *SMALL, "--epochs", "1", "--lr", "0.01", "--out", run)
    summary = run_json("export", run, "--format", "onnx", "-o", tmp_path / "alq.onnx")
    assert all("ALQ binary bases, decoded" in v for k, v in summary["weights"].items() if "FP32 (kept" not in v)
    assert summary["top1_agreement"] == 1.0 and summary["max_relative_difference"] <= 1e-4
