"""mpq export / inspect / eval FILE and load_packed: exactness, sizes, and refusal of bad files."""

import json
import math
import shutil

import pytest
import torch
from conftest import SMALL, TinyNet, invoke, rewrite_packed, run_json
from safetensors.torch import load_file, save_file

import mpq_cli
from mpq_cli.api import load_run
from mpq_cli.methods import get_method
from mpq_cli.packing.encodings import encode_codes
from mpq_cli.packing.format import PackedFile, layer_entry, weight_tensor_name, write_packed


def bits_of(t):
    return t.detach().contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def exported(csq_run, tmp_path_factory):
    run, _ = csq_run
    out = tmp_path_factory.mktemp("packed") / "model.safetensors"
    summary = run_json("export", run, "-o", out, "--quiet")
    return run, out, summary


def test_export_writes_file_and_reports(exported):
    run, out, summary = exported
    assert summary["out"] == str(out) and out.is_file()
    report = json.loads(out.with_name("model.report.json").read_text())
    assert report["file_bytes"] == out.stat().st_size == summary["file_bytes"]
    md = out.with_name("model.report.md").read_text()
    assert "average stored bits" in md and "classifier.1" in md
    assert not list(out.parent.glob(".*.tmp"))


def test_decoded_weights_equal_the_evaluated_weights_bit_for_bit(exported):
    run, out, _ = exported
    _, ctx, method, _, _ = load_run(run)
    ctx.model.eval()
    for name, layer in method.layers.items():
        assert torch.equal(bits_of(mpq_cli.decode_layer(out, name)), bits_of(layer.weight_quantizer())), name
    # placed as mpq places a conv model (channels_last), as `mpq eval FILE` places it
    model = mpq_cli.load_packed(out).to(memory_format=torch.channels_last)
    x = torch.randn(16, 1, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(model(x), ctx.model.cpu()(x))


def test_eval_file_matches_the_run(exported, csq_run):
    _, out, _ = exported
    result = run_json("eval", out, "--device", "cpu")
    assert result["top1"] == csq_run[1]["top1"]
    assert result["top1_at_export"] == csq_run[1]["top1"]


def test_eval_measures_the_whole_split_unless_limited(tmp_path):
    """A run's --limit-val-batches bounded its in-training checks; mpq eval measures every test image
    unless asked, and says on how many batches the run's own figure was taken."""
    run = tmp_path / "run"
    summary = run_json("search", "--method", "uniform", "--target-bits", "4", *SMALL, "--epochs", "1",
                       "--limit-val-batches", "2", "--out", run, "--quiet")  # fmt: skip
    out = tmp_path / "u.safetensors"
    run_json("export", run, "-o", out, "--quiet")
    whole, limited = run_json("eval", out), run_json("eval", out, "--limit-val-batches", "2")
    assert whole["samples"] == 256 and limited["samples"] == 64  # synthetic data: 256 test images, batches of 32
    assert limited["top1"] == summary["top1"] == whole["top1_at_export"]
    assert whole["limit_val_batches_at_export"] == 2
    assert run_json("eval", run)["samples"] == 256  # a run directory too
    printed = invoke("eval", out).output
    assert "on its first 2 validation batches of each process" in printed
    # a partial measurement says so wherever it is shown (issue 27): terminal, --json, report.md
    assert whole["split_samples"] == limited["split_samples"] == 256
    assert "top-1" in printed and " of 256" not in printed.splitlines()[0]  # the whole split: no qualifier
    assert "on 64 of 256 test images" in invoke("eval", out, "--limit-val-batches", "2").output
    assert summary["samples"] == 64 and summary["split_samples"] == 256
    assert "on 64 of 256 test images" in (run / "report.md").read_text()


def test_payload_is_what_the_stored_bits_promise(exported):
    """Packed weight bytes are within 1 % of sum(params x stored bits / 8) plus the scales."""
    run, out, _ = exported
    scheme = json.loads((run / "scheme.json").read_text())
    promised = sum(
        e["params"] * e["stored_bits"] / 8 + 4 * e["scales"] for e in scheme["layers"] if e["bits"] is not None
    )
    report = run_json("inspect", out)
    payload = sum(layer["bytes"] for layer in report["layers"] if layer["quantized"])
    assert abs(payload - promised) <= 0.01 * promised
    # per layer: at least the scheme's field width, and over it by no more than its steps or code table and the
    # padding of its fields to a whole byte (a layer with few distinct codes may be stored as a table and narrower
    # indices: what a lenet5 CSQ layer can get)
    assert len(report["layers"]) == len(scheme["layers"])
    for layer, e in zip(report["layers"], scheme["layers"], strict=True):
        overhead = (32 * e.get("scales", 0) + 7) / e["params"] if e.get("params") else 0.0
        assert e["stored_bits"] - 1e-9 <= layer["stored_bits"] <= e["stored_bits"] + overhead + 1e-9, e["name"]


def test_inspect_run_and_file_agree(exported):
    run, out, _ = exported
    from_run, from_file = run_json("inspect", run), run_json("inspect", out)
    assert from_run["source"] == "run" and from_file["source"] == "file"
    for key in ("avg_bits", "avg_stored_bits", "weight_bytes", "file_bytes", "fp32_bytes"):
        assert from_run[key] == from_file[key], key
    assert from_file["avg_bits"] == pytest.approx(json.loads((run / "summary.json").read_text())["avg_bits"])
    by_size = run_json("inspect", out, "--sort", "size")["layers"]
    assert [r["bytes"] for r in by_size] == sorted((r["bytes"] for r in by_size), reverse=True)
    only = run_json("inspect", out, "--layers", "classifier.*")["layers"]
    assert [r["name"] for r in only] == ["classifier.1", "classifier.3"]
    table = invoke("inspect", out)
    assert table.exit_code == 0 and "classifier.1" in table.stdout and "█" in table.stdout


@pytest.mark.parametrize("method", ["csq", "uniform", "bsq"])
@pytest.mark.parametrize("bits", list(range(17)))
def test_every_method_and_bit_width_round_trips_through_a_file(method, bits, tmp_path):
    from mpq_cli.layers import LayerSelection

    torch.manual_seed(bits)
    model = TinyNet()
    cls = get_method(method)
    extra = {"max_bits": 16} if method in ("csq", "bsq") else {}
    quant = cls(
        cls.config_class.from_dict({"target_bits": max(1, min(bits, 8)), **extra}), LayerSelection(fix_bits={"*": bits})
    )
    quant.prepare(model)
    model.eval()
    tensors, entries = {}, []
    for name, lc in quant.layer_codes().items():
        assert lc.nominal_bits == bits
        encoded = encode_codes(lc.codes, lc.step)
        tensors.update({weight_tensor_name(name, s): t for s, t in encoded.tensors.items()})
        entries.append(layer_entry(name, "conv2d", list(lc.codes.shape), bits, encoded, None))
    path = tmp_path / "layers.safetensors"
    write_packed(path, {"model": {"name": "tiny"}, "layers": entries}, tensors)
    for name, layer in quant.layers.items():
        assert torch.equal(bits_of(mpq_cli.decode_layer(path, name)), bits_of(layer.weight_quantizer())), name


def test_activation_quantization_and_fp_layers_survive_export(tmp_path, tiny_factory_file):
    run = tmp_path / "uni"
    summary = run_json(
        "search",
        "--method",
        "uniform",
        "--target-bits",
        "3",
        "--model",
        tiny_factory_file,
        *SMALL,
        "--epochs",
        "1",
        "--act-bits",
        "4",
        "--keep-fp",
        "fc",
        "--out",
        run,
    )
    out = tmp_path / "uni.safetensors"
    run_json("export", run, "-o", out)
    report = run_json("inspect", out)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["fc"]["encoding"] == "float32" and rows["fc"]["stored_bits"] == 32
    assert rows["conv"]["act_bits"] == 8 and rows["conv"]["bits"] == 3  # first layer's input at 8 bits
    # the file names the user's factory; mpq builds it only when the caller names it too
    assert run_json("eval", out, "--device", "cpu", "--model", tiny_factory_file)["top1"] == summary["top1"]
    model = mpq_cli.load_packed(out, model=tiny_factory_file)
    assert model.conv.input_quant.bits == 8 and not hasattr(model.fc, "input_quant")


def test_export_refuses_fp_runs_and_unfinished_runs(fp_run, csq_run, tmp_path):
    result = invoke("export", fp_run[0])
    assert result.exit_code == 2 and "FP training run" in result.output
    partial = tmp_path / "partial"
    shutil.copytree(csq_run[0], partial)
    (partial / "codes.safetensors").unlink()
    result = invoke("export", partial, "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "did not finish" in result.output
    assert not (tmp_path / "x.safetensors").exists()


# -- a corrupt-input suite: every case is one line on stderr, exit 2, no traceback -------------------
def _rewrite(src, dst, edit_header=None, edit_tensors=None):
    rewrite_packed(src, dst, edit_header, edit_tensors)


def _layer(header, name="classifier.1"):
    return next(e for e in header["layers"] if e["name"] == name)


def _truncate(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


CORRUPT = {
    "truncated": (_truncate, "truncated"),
    "empty": (lambda src, dst: dst.write_bytes(b""), "not a safetensors file"),
    "pickle": (lambda src, dst: torch.save({"w": torch.ones(3)}, dst), "not a safetensors file"),
    "random-bytes": (lambda src, dst: dst.write_bytes(bytes(range(256)) * 4), "not a safetensors file"),
    "not-mpq": (lambda src, dst: save_file({"w": torch.ones(3)}, str(dst)), "not an mpq packed file"),
    "wrong-version": (lambda s, d: _rewrite(s, d, lambda h: h.update(format="mpq.packed/9")), "unsupported format"),
    "shape-lies": (lambda s, d: _rewrite(s, d, lambda h: _layer(h).update(shape=[500, 801], params=400500)), "bytes"),
    "params-lie": (lambda s, d: _rewrite(s, d, lambda h: _layer(h).update(params=7)), "params"),
    "bits-lie": (lambda s, d: _rewrite(s, d, lambda h: _layer(h).update(width=_layer(h)["width"] + 1)), "bytes"),
    "bits-out-of-range": (lambda s, d: _rewrite(s, d, lambda h: _layer(h).update(nominal_bits=40)), "0..16"),
    "fractional-int-bits": (
        lambda s, d: _rewrite(s, d, lambda h: _layer(h).update(nominal_bits=2.5)),
        "an integer in 0..16",
    ),
    "missing-tensor": (
        lambda s, d: _rewrite(s, d, edit_tensors=lambda t: t.pop("classifier.1.weight.step")),
        "classifier.1.weight.step is missing",
    ),
    "missing-bias": (
        lambda s, d: _rewrite(s, d, edit_tensors=lambda t: t.pop("classifier.1.bias")),
        "classifier.1.bias is missing",
    ),
    "unknown-encoding": (lambda s, d: _rewrite(s, d, lambda h: _layer(h).update(encoding="fp4")), "unknown encoding"),
    "header-not-json": (lambda s, d: _rewrite_raw(s, d, "{not json"), "not valid JSON"),
}


def _rewrite_raw(src, dst, mpq_text):
    rewrite_packed(src, dst, mpq_text=mpq_text)


# inspect reads the header alone, so a tensor that only the model needs is caught by eval
HEADER_ONLY_MISSES = {"missing-bias"}


@pytest.mark.parametrize(
    "case,command",
    [
        (case, command)
        for case in CORRUPT
        for command in ("inspect", "eval")
        if not (command == "inspect" and case in HEADER_ONLY_MISSES)
    ],
)
def test_corrupt_files_give_one_line_and_exit_2(case, command, exported, tmp_path):
    make, message = CORRUPT[case]
    bad = tmp_path / "bad.safetensors"
    make(exported[1], bad)
    result = invoke(command, bad)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_load_packed_names_the_bad_tensor(exported, tmp_path):
    def infinite_step(tensors):
        tensors["classifier.3.weight.step"] = torch.tensor(float("inf"))

    bad = tmp_path / "bad.safetensors"
    _rewrite(exported[1], bad, edit_tensors=infinite_step)
    with pytest.raises(mpq_cli.MpqError, match="classifier.3.*finite"):
        mpq_cli.load_packed(bad)
    assert math.isfinite(float(load_file(str(exported[1]))["classifier.3.weight.step"]))


def test_export_reads_each_layers_form_from_the_run_and_still_reads_older_runs(csq_run, tmp_path):
    from safetensors import safe_open

    with safe_open(str(csq_run[0] / "codes.safetensors"), "pt") as f:
        forms = json.loads(f.metadata()["mpq.forms"])
    assert forms["classifier.1"] == {"weight": "codes", "act": None}
    old = tmp_path / "old"
    shutil.copytree(csq_run[0], old)
    save_file(load_file(str(old / "codes.safetensors")), str(old / "codes.safetensors"), metadata={"mpq.codes": "1"})
    new_file, old_file = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    run_json("export", csq_run[0], "-o", new_file)
    run_json("export", old, "-o", old_file)
    assert load_file(str(new_file)).keys() == load_file(str(old_file)).keys()
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(mpq_cli.load_packed(new_file)(x), mpq_cli.load_packed(old_file)(x))


def test_a_file_and_its_run_evaluate_on_the_runs_input_statistics(tmp_path):
    """--normalize is recorded in the run and the file; mpq eval FILE, mpq eval RUN and finetune rebuild the
    same inputs. A file without the record (an older one) falls back to the dataset's statistics."""
    run = tmp_path / "run"
    summary = run_json("search", "--method", "uniform", "--target-bits", "4", *SMALL, "--epochs", "1",
                       "--normalize", "0.1/0.5", "--out", run, "--quiet")  # fmt: skip
    assert json.loads((run / "config.json").read_text())["data"]["normalize"] == [[0.1], [0.5]]
    out = tmp_path / "n.safetensors"
    run_json("export", run, "-o", out, "--quiet")
    header = PackedFile.open(out).header
    assert (header["data"]["mean"], header["data"]["std"]) == ([0.1], [0.5])
    assert header["eval"]["data"]["normalize"] == [[0.1], [0.5]]
    from_file, from_run = run_json("eval", out), run_json("eval", run)
    assert from_file["top1"] == from_run["top1"] == summary["top1"]
    assert from_file["loss"] == pytest.approx(summary["loss"], rel=1e-6)
    # the control: the same file without the record is evaluated on the dataset's statistics (0 and 1 for
    # synthetic data), which are other inputs
    old = tmp_path / "old.safetensors"
    rewrite_packed(out, old, lambda h: h["eval"]["data"].pop("normalize"))
    assert run_json("eval", old)["loss"] != pytest.approx(summary["loss"], rel=1e-3)
    tuned = tmp_path / "ft"
    run_json("finetune", run, "--epochs", "1", "--limit-train-batches", "1", "--out", tuned, "--quiet")
    assert json.loads((tuned / "config.json").read_text())["data"]["normalize"] == [[0.1], [0.5]]


@pytest.mark.parametrize(
    "method, config",
    [
        ("csq", ["--target-bits", "2"]),
        ("bsq", ["--target-bits", "2"]),
        ("uniform", ["--target-bits", "2"]),
        ("bmpq", ["--target-bits", "5", "--bits", "2,4,6"]),
        ("alq", ["--target-bits", "1"]),
    ],
)
def test_the_search_reports_the_sizes_of_the_file_it_exports(method, config, fp_run, tmp_path):
    """Issue 27: the headline is the file's, measured the way `mpq inspect` measures it, for every method."""
    run = tmp_path / "run"
    summary = run_json(
        "search", "--method", method, *config, "--model", "lenet5", "--checkpoint", fp_run[0], *SMALL,
        "--epochs", "1", "--lr", "0.01", "--out", run,
    )  # fmt: skip
    out = tmp_path / "elsewhere" / "m.safetensors"  # another path spelling: the file's size may not depend on it
    out.parent.mkdir()
    run_json("export", run, "-o", out)
    on_file = run_json("inspect", out)
    for key in ("avg_stored_bits", "weight_bytes", "file_bytes", "fp32_bytes", "compression"):
        assert summary[key] == on_file[key], key
    assert on_file["file_bytes"] == out.stat().st_size
    report = (run / "report.md").read_text()
    assert f"{on_file['file_bytes']:,} bytes" in report and "nominal (the paper's count" in report
    stored = {row["name"]: f"{row['stored_bits']:.3f}" for row in on_file["layers"] if row["quantized"]}
    assert all(f"| {bits} |" in report for bits in stored.values())
