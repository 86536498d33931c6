"""The scheme transplant (--scheme): a method trained under another run's per-layer bits, so that a results
page can tell a better scheme from better training."""

import json

import pytest
from conftest import SMALL, invoke, run_json

from mpq_cli.errors import MpqError
from mpq_cli.layers import LayerSelection
from mpq_cli.scheme import LayerEntry, Scheme


def _scheme(method, bits):
    layers = [LayerEntry(f"l{i}", "linear", [4, 4], 16, b, None if b is None else b + 1, 1) for i, b in enumerate(bits)]
    return Scheme(method=method, layers=layers)


def test_bits_are_converted_between_the_methods_counts():
    assert _scheme("csq", [2, 3, None]).transplanted_bits("uniform") == {"l0": 2, "l1": 3, "l2": None}
    # BMPQ counts the sign: its 4-bit layer stores what a 3-bit CSQ or uniform layer does, and back
    assert _scheme("bmpq", [4, 2, 16]).transplanted_bits("uniform") == {"l0": 3, "l1": 1, "l2": 15}
    assert _scheme("csq", [3, 0]).transplanted_bits("bmpq") == {"l0": 4, "l1": 0}
    with pytest.raises(MpqError, match="ALQ counts binary bases"):
        _scheme("alq", [1]).transplanted_bits("uniform")
    with pytest.raises(MpqError, match="ALQ counts binary bases"):
        _scheme("csq", [2]).transplanted_bits("alq")
    with pytest.raises(MpqError, match="not a whole number"):
        _scheme("custom", [2.5]).transplanted_bits("uniform")


def test_a_layer_name_is_matched_literally(tmp_path):
    scheme = Scheme("csq", [LayerEntry("blocks[0].conv*", "conv2d", [2, 2, 1, 1], 4, 3, 4, 1)])
    scheme.save(tmp_path / "scheme.json")
    selection = LayerSelection(scheme=str(tmp_path)).with_scheme("uniform")
    assert selection.fixed_bits("blocks[0].conv*") == 3 and selection.fixed_bits("blocks0.conv1") is None


def test_uniform_trains_under_a_csq_runs_scheme(fp_run, csq_run, tmp_path):
    out = tmp_path / "uniform-under-csq"
    args = ["search", "--method", "uniform", "--target-bits", "2", "--model", "lenet5", "--checkpoint", fp_run[0]]
    summary = run_json(*args, *SMALL, "--epochs", "1", "--lr", "0.01", "--scheme", csq_run[0], "--out", out)
    source = {e["name"]: e["bits"] for e in json.loads((csq_run[0] / "scheme.json").read_text())["layers"]}
    got = {e["name"]: e["bits"] for e in json.loads((out / "scheme.json").read_text())["layers"]}
    assert got == source and summary["avg_bits"] == pytest.approx(csq_run[1]["avg_bits"])
    selection = json.loads((out / "config.json").read_text())["selection"]
    assert selection["scheme"] == str(csq_run[0]) and len(selection["fix_bits"]) == len(source)
    # the run is an ordinary run: fine-tuned and exported as any other
    ft = run_json("finetune", out, "--epochs", "1", "--limit-train-batches", "1", "--lr", "0.01")
    assert {
        e["name"]: e["bits"]
        for e in json.loads((out.parent / (out.name + "-finetune") / "scheme.json").read_text())["layers"]
    } == source
    assert ft["avg_bits"] == pytest.approx(summary["avg_bits"])


def test_a_scheme_that_does_not_fit_the_model_is_one_clear_error(fp_run, csq_run, tmp_path):
    scheme = json.loads((csq_run[0] / "scheme.json").read_text())
    base = ["search", "--method", "uniform", "--target-bits", "2", "--model", "lenet5", *SMALL, "--epochs", "1"]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({**scheme, "layers": scheme["layers"][1:]}))
    result = invoke(*base, "--scheme", missing, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "gives no bits for layer features.0" in result.output
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({**scheme, "layers": [*scheme["layers"], {**scheme["layers"][0], "name": "head"}]}))
    result = invoke(*base, "--scheme", extra, "--out", tmp_path / "b")
    assert result.exit_code == 2 and "'head' matches no Conv2d/Linear layer" in result.output
    for more in (["--fix-bits", "features.0=4"], ["--edge-bits", "8"]):
        result = invoke(*base, "--scheme", csq_run[0], *more, "--out", tmp_path / "c")
        assert result.exit_code == 2 and "without --fix-bits or --edge-bits" in result.output
    result = invoke(*base, "--scheme", tmp_path / "nowhere", "--out", tmp_path / "d")
    assert result.exit_code == 2 and "no scheme.json" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_sweep_with_a_scheme_takes_one_budget(csq_run, tmp_path):
    args = ["sweep", "--method", "uniform", "--target-bits", "2,3", "--scheme", csq_run[0], *SMALL]
    result = invoke(*args, "--out", tmp_path / "sweep")
    assert result.exit_code == 2 and "takes one --target-bits" in result.output
    assert not (tmp_path / "sweep").exists()
