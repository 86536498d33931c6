"""Every command end to end on synthetic data with a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, invoke, run_json


def test_train_writes_checkpoint(fp_run):
    out, summary = fp_run
    assert summary["out"] == str(out)
    assert (out / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # counted from 1, as every message counts them
    assert summary["top1"] == pytest.approx(records[-1]["val_top1"])  # the final eval: the last epoch's model


def test_search_run_directory(csq_run, fp_run):
    out, summary = csq_run
    for name in (
        "config.json",
        "model.safetensors",
        "method.json",
        "codes.safetensors",
        "scheme.json",
        "metrics.jsonl",
        "report.md",
        "summary.json",
        "checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    assert 1.9 - 1e-9 <= summary["avg_bits"] <= 2.0 + 1e-9
    assert summary["fp_top1"] == pytest.approx(fp_run[1]["top1"])  # the checkpoint, evaluated on the same data
    scheme = json.loads((out / "scheme.json").read_text())
    assert [layer["name"] for layer in scheme["layers"]] == ["features.0", "features.3", "classifier.1", "classifier.3"]
    report = (out / "report.md").read_text()
    assert "synthetic data" in report and "classifier.1" in report
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["seed"] == 0 and config["method_config"]["target_bits"] == 2
    assert set(config["versions"]) == {"mpq", "torch", "torchvision"}


def test_codes_reproduce_the_evaluated_weights(csq_run):
    """The saved integer codes times the step are exactly the weights the run evaluated."""
    import torch
    from safetensors.torch import load_file

    from mpq_cli.api import load_run

    out, _ = csq_run
    _, ctx, method, _, _ = load_run(out)
    codes = load_file(str(out / "codes.safetensors"))
    ctx.model.eval()
    for name, layer in method.layers.items():
        expected = codes[f"{name}.codes"].float() * codes[f"{name}.step"]
        assert torch.equal(layer.weight_quantizer(), expected)


def test_eval_matches_the_run(csq_run):
    out, summary = csq_run
    result = run_json("eval", out, "--device", "cpu")
    assert result["top1"] == pytest.approx(summary["top1"])


def test_finetune_keeps_the_scheme(csq_run, tmp_path):
    out, summary = csq_run
    ft = run_json("finetune", out, "--epochs", "1", "--lr", "0.01", "--out", tmp_path / "ft")
    assert ft["avg_bits"] == pytest.approx(summary["avg_bits"])
    before = json.loads((out / "scheme.json").read_text())
    after = json.loads((tmp_path / "ft" / "scheme.json").read_text())
    assert [e["bits"] for e in before["layers"]] == [e["bits"] for e in after["layers"]]


def test_uniform_baseline(tmp_path):
    summary = run_json(
        "search",
        "--method",
        "uniform",
        "--target-bits",
        "3",
        "--model",
        "lenet5",
        *SMALL,
        "--epochs",
        "1",
        "--keep-fp",
        "features.0",
        "--fix-bits",
        "classifier.3=8",
        "--out",
        tmp_path / "u",
    )
    scheme = json.loads((tmp_path / "u" / "scheme.json").read_text())
    bits = {e["name"]: e["bits"] for e in scheme["layers"]}
    assert bits == {"features.0": None, "features.3": 3, "classifier.1": 3, "classifier.3": 8}
    quantized = [e for e in scheme["layers"] if e["bits"] is not None]
    expected = sum(e["bits"] * e["params"] for e in quantized) / sum(e["params"] for e in quantized)
    assert summary["avg_bits"] == pytest.approx(expected)
    assert 3 < summary["avg_bits"] < 8


def test_existing_run_is_not_overwritten_and_resume_checks_config(tmp_path):
    args = ["train", "--model", "lenet5", *SMALL, "--seed", "3"]
    run_json(*args, "--epochs", "1", "--out", tmp_path / "part")
    refused = invoke(*args, "--epochs", "1", "--out", tmp_path / "part")
    assert refused.exit_code == 2 and "already exists" in refused.output
    mismatch = invoke(*args, "--epochs", "1", "--lr", "0.5", "--out", tmp_path / "part", "--resume")
    assert mismatch.exit_code == 2 and "different configuration" in mismatch.output


@pytest.mark.parametrize(
    "method_args",
    [
        ["--method", "csq", "--target-bits", "2", "--epochs", "2", "--lr", "0.01"],
        ["--method", "alq", "--target-bits", "1", "--epochs", "3", "--rounds", "1"],  # cut inside its schedule
        ["--method", "bsq", "--target-bits", "2", "--epochs", "2", "--lr", "0.01"],
        [
            "--method",
            "bmpq",
            "--bits",
            "2,4",
            "--target-bits",
            "4",
            "--edge-bits",
            "8",
            "--epochs",
            "2",
            "--interval",
            "1",
            "--lr",
            "0.01",
        ],
        ["--method", "uniform", "--target-bits", "2", "--epochs", "2", "--lr", "0.01"],
    ],
    ids=["csq", "alq", "bsq", "bmpq", "uniform"],
)
def test_resume_after_interruption(tmp_path, monkeypatch, method_args):
    """Kill a run after its first epoch; --resume finishes it with the same result as an uninterrupted run."""
    import mpq_cli.engine as engine

    args = ["search", *method_args, "--model", "lenet5", *SMALL, "--seed", "5"]
    full = run_json(*args, "--out", tmp_path / "full")
    real_evaluate = engine.evaluate
    calls = {"n": 0}

    def failing_evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine, "evaluate", failing_evaluate)
    interrupted = invoke(*args, "--out", tmp_path / "cut")
    assert interrupted.exit_code == 130
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    resumed = run_json(*args, "--out", tmp_path / "cut", "--resume")
    assert resumed["top1"] == pytest.approx(full["top1"])
    assert resumed["avg_bits"] == pytest.approx(full["avg_bits"])
    # not only the same accuracy (both may sit at chance on these data): the same codes, weights and optimizer
    from safetensors.torch import load_file

    from mpq_cli.rundir import load_checkpoint_state

    for name in ("codes.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (load_checkpoint_state(tmp_path / run / "checkpoint.pt")["optimizer"]["state"] for run in ("full", "cut"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_methods_and_models_listing():
    methods = run_json("methods")
    assert set(methods) == {"alq", "bmpq", "bsq", "csq", "uniform"}
    bsq, csq = methods["bsq"]["fields"], methods["csq"]["fields"]
    assert bsq["init_bits_by_layer"]["default"] == {} and bsq["target_bits"]["default"] is None
    assert csq["reg_strength"]["default"] == 0.01 and "Eq. 7" in csq["reg_strength"]["help"]
    # every field says what it means (from its config's docstring, written beside its default)
    assert all(f["help"] for m in methods.values() for f in m["fields"].values())
    models = run_json("models")
    assert "lenet5" in models["builtin"] and "resnet18" in models["torchvision"]


# A user model with every kind of weight: Conv2d/Linear (a subclass too), which are quantized, and a
# Conv1d, a ConvTranspose2d, an Embedding and a module with its own nn.Parameter, which stay FP.
MIXED_MODEL = """
import torch
from torch import nn


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(7))


class StandardisedConv(nn.Conv2d):
    pass


class Mixed(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.temporal = nn.Conv1d(3, 4, 5)
        self.conv = StandardisedConv(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 3)
        self.gain = Gain()
        self.fc = nn.Linear(8, num_classes, bias=False)


def mixed(num_classes=10):
    return Mixed(num_classes)
"""


@pytest.fixture
def mixed_model_file(tmp_path):
    path = tmp_path / "mixed.py"
    path.write_text(MIXED_MODEL)
    return f"{path}:mixed"


def test_models_layers_lists_the_weights_that_stay_fp_and_why(mixed_model_file):
    found = run_json("models", "--layers", mixed_model_file)
    assert [(r["name"], r["kind"], r["params"]) for r in found["layers"]] == [
        ("conv", "conv2d", 36),
        ("fc", "linear", 80),
    ]
    fp = {r["name"]: r for r in found["fp_layers"]}
    assert list(fp) == ["embed", "temporal", "up", "gain"]
    assert [(r["kind"], r["shape"], r["tensors"], r["params"]) for r in fp.values()] == [
        ("Embedding", [10, 6], ["weight"], 60),
        ("Conv1d", [4, 3, 5], ["weight", "bias"], 64),
        ("ConvTranspose2d", [4, 2, 3, 3], ["weight", "bias"], 74),
        ("Gain", [7], ["gain"], 7),
    ]
    assert {r["reason"] for r in fp.values()} == {"not Conv2d/Linear: stays FP"}
    assert found["normalisation"] == [{"name": "bn", "kind": "BatchNorm2d", "params": 8}]
    # 36 + 80 quantized; 60 + 64 + 74 + 7 in other layers, 8 in BatchNorm, the Conv2d's 4 biases
    assert found["params"] == {
        "quantizable": 116,
        "not_quantizable": 217,
        "fp_layers": 205,
        "normalisation": 8,
        "biases": 4,
    }


def test_models_layers_prints_the_fp_weights_beside_the_quantized_ones(mixed_model_file):
    result = invoke("models", "--layers", mixed_model_file)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "2 Conv2d/Linear layers (quantized)" in text
    assert "4 more layers with weights: not Conv2d/Linear: stays FP" in text
    assert all(f"│ {name} " in text for name in ("conv", "fc", "embed", "temporal", "up", "gain"))
    assert "normalisation layers: 1 (BatchNorm2d), 8 params: stay FP" in text
    assert "params: 116 quantizable (34.8 %), 217 stay FP (205 in other layers, 8 normalisation, 4 biases)" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["search", "--model", "no_such_net", *SMALL], "unknown model"),
        (["search", "--fix-bits", "oops", *SMALL], "NAME=BITS"),
        (["search", "--keep-fp", "nothing.matches", *SMALL], "matches no"),
        (["search", "--checkpoint", "/nonexistent.pt", *SMALL], "not found"),
        (["search", "--target-bits", "12", *SMALL], "exceeds"),
        (["search", "--set", "bogus=1", *SMALL], "unknown fields"),
        (["search", "--set", "init_bit_logits=1", *SMALL], "did you mean init_bit_logit?"),
        (["train", "--data", "nope"], "unknown dataset"),
        (["train", "--data", "mnist", "--data-dir", "/nonexistent"], "could not be downloaded"),
        (["finetune", "/nonexistent"], "not an mpq run"),
        (["train", "--optimizer", "lbfgs", *SMALL], "--optimizer"),
        (["train", "--normalize", "0.5/0", *SMALL], "must be positive"),
        (["train", "--normalize", "half/1", *SMALL], "--normalize expects MEAN/STD"),
        (["train", "--normalize", "imagenet", *SMALL], "the model takes 1 input channel"),
    ],
    ids=[
        "model",
        "fix-bits",
        "keep-fp",
        "checkpoint",
        "bits",
        "set",
        "set-typo",
        "dataset",
        "offline",
        "finetune",
        "optim",
        "normalize-std",
        "normalize-text",
        "normalize-channels",
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args, "--quiet") if args[0] != "finetune" else invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not any(Path(tmp_path).rglob("*.safetensors"))


def test_help_documents_defaults():
    result = invoke("search", "--help")
    assert result.exit_code == 0
    for option in ("--target-bits", "--keep-fp", "--fix-bits", "--act-bits", "--resume", "--json"):
        assert option in result.output
    for default in ("[default: csq]", "[default: lenet5]", "[default: 128]"):
        assert default in result.output


def test_the_python_api_trains_exactly_as_the_command_line(fp_run, tmp_path):
    """`mpq_cli.search` with a dict of settings applies the method's paper's training defaults, as `mpq search`
    does: the two runs' resolved configurations are the same."""
    import mpq_cli
    from mpq_cli.api import ModelOptions, SearchOptions
    from mpq_cli.data import DataConfig

    cli_run, api_run = tmp_path / "cli", tmp_path / "api"
    run_json(
        "search",
        "--method",
        "bsq",
        "--target-bits",
        "2",
        "--model",
        "lenet5",
        "--checkpoint",
        fp_run[0],
        *SMALL,
        "--epochs",
        "1",
        "--out",
        cli_run,
    )
    data = DataConfig("synthetic", batch_size=32, input_size=(1, 16, 16), limit_train_batches=3)
    mpq_cli.search(
        ModelOptions("lenet5", None, str(fp_run[0])),
        data,
        {"epochs": 1, "device": "cpu"},
        SearchOptions("bsq", {"target_bits": 2}),
        out=str(api_run),
    )
    cli_config, api_config = (json.loads((r / "config.json").read_text()) for r in (cli_run, api_run))
    assert api_config["train"] == cli_config["train"]
    assert api_config["train"]["optimizer"] == "sgd" and api_config["train"]["lr"] != 0.05  # BSQ's, not generic
    assert api_config["fingerprint"] != "" and api_config["method_config"] == cli_config["method_config"]


def test_an_abort_is_one_line_and_exit_130(monkeypatch, capsys):
    from typer.exceptions import Abort

    from mpq_cli.cli import entry

    def abort(*args, **kwargs):
        raise Abort()

    monkeypatch.setattr(entry, "app", abort)
    assert entry.main(["methods"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_new_head_on_the_command_line(tmp_path):
    """A full checkpoint with a 1000-class head: refused in one line that names --new-head; with it the run
    starts, says which layer it re-initialised and records it."""
    from safetensors.torch import save_file

    from mpq_cli.models.loading import ModelSpec, build_model

    state = build_model(ModelSpec("lenet5", None, 10, 1, (16, 16))).state_dict()
    state["classifier.3.weight"], state["classifier.3.bias"] = torch.randn(1000, 500), torch.randn(1000)
    ckpt = tmp_path / "imagenet-head.safetensors"
    save_file(state, str(ckpt))
    args = ["train", "--model", "lenet5", *SMALL, "--epochs", "1", "--limit-train-batches", "1", "--checkpoint", ckpt]
    refused = invoke(*args, "--out", tmp_path / "refused")
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "--new-head" in refused.output and "classifier.3.weight (1000, 500) vs model (10, 500)" in refused.output
    result = invoke(*args, "--new-head", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "--new-head" in line]
    assert notes == [
        f"--new-head: the classifier of checkpoint {ckpt} (classifier.3.weight (1000, 500), classifier.3.bias "
        "(1000,)) re-initialised for 10 classes"
    ]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["new_head"] is True
    assert config["head_reinitialised"] == ["classifier.3.weight", "classifier.3.bias"]


def test_normalize_is_recorded_and_the_python_api_applies_it_as_the_command_line(tmp_path):
    import mpq_cli
    from mpq_cli.api import ModelOptions
    from mpq_cli.data import DataConfig, default_data_dir

    common = ["--model", "lenet5", *SMALL, "--epochs", "1", "--limit-train-batches", "1"]
    run_json("train", *common, "--normalize", "0.50196,0.50196", "--out", tmp_path / "cli", "--quiet")
    data = DataConfig("synthetic", default_data_dir(), 32, (1, 16, 16), 1, normalize="0.50196,0.50196")
    mpq_cli.train(ModelOptions("lenet5"), data, {"epochs": 1, "device": "cpu"}, out=str(tmp_path / "api"))
    cli_config, api_config = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("cli", "api"))
    assert cli_config["data"]["normalize"] == [[0.50196], [0.50196]]
    assert api_config["fingerprint"] == cli_config["fingerprint"]
    run_json("train", *common, "--out", tmp_path / "plain", "--quiet")  # no --normalize: nothing recorded, as before
    assert "normalize" not in json.loads((tmp_path / "plain" / "config.json").read_text())["data"]


def test_torchvision_weights_bring_their_input_statistics_unless_normalize_says_otherwise():
    from mpq_cli.api import ModelOptions, resolved_data
    from mpq_cli.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig

    data = DataConfig("cifar10")
    assert resolved_data(ModelOptions("resnet18", "DEFAULT"), data).normalize == (IMAGENET_MEAN, IMAGENET_STD)
    assert resolved_data(ModelOptions("resnet18", None), data).normalize is None  # no weights: the dataset's
    given = DataConfig("cifar10", normalize="none")
    assert resolved_data(ModelOptions("resnet18", "DEFAULT"), given).normalize == ((0.0,), (1.0,))


def test_a_mistyped_option_suggests_the_nearest_one():
    from mpq_cli.cli import main

    assert main(["search", "--method", "csq", "--reg-strengh", "0.1"]) == 2
    result = invoke("search", "--method", "csq", "--reg-strengh", "0.1")
    assert result.exit_code == 2 and "did you mean --reg-strength?" in result.output
    result = invoke("train", "--epoch", "3")
    assert result.exit_code == 2 and "--epochs" in result.output


def test_help_names_every_shipped_method():
    """--method's help lists the methods without importing them (torch): the list must stay the registry's."""
    from mpq_cli.cli.options import METHOD_NAMES
    from mpq_cli.methods import METHODS

    shipped = {name for name, cls in METHODS.items() if cls.__module__.startswith("mpq_cli.methods.")}
    assert METHOD_NAMES.split(", ") == sorted(shipped)


def test_commands_that_train_share_one_declaration_of_their_options():
    """train, search and sweep take the model, data and training options from one place (cli.options), and
    search and sweep the method options, so a new option or default reaches every command that takes it."""
    import typer.main

    from mpq_cli.cli import app
    from mpq_cli.cli.options import DATA, METHOD, MODEL, TRAINING

    group = typer.main.get_command(app)
    for name in ("train", "search", "sweep"):
        params = {p.name: p for p in group.commands[name].params}
        shared = (*MODEL.options, *DATA.options, *TRAINING.options, *(METHOD.options if name != "train" else ()))
        for option in shared:
            assert option[0] in params, (name, option[0])
            assert params[option[0]].default == option[2], (name, option[0])


def test_help_does_not_import_torch():
    """`mpq --help` and `mpq search --help` answer without importing torch (seconds on a small machine)."""
    code = (
        "import sys\nfrom mpq_cli.cli import main\n"
        "for args in (['--help'], ['search', '--help'], ['train', '--help']):\n"
        "    assert main(args) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_inspecting_a_file_does_not_import_torch(csq_run, tmp_path):
    """`mpq inspect FILE` reads the header alone: no torch import (seconds), the same table as with torch loaded."""
    packed = tmp_path / "m.safetensors"
    run_json("export", csq_run[0], "-o", packed)
    code = (
        "import sys\nfrom mpq_cli.cli import main\n"
        f"assert main(['inspect', {str(packed)!r}, '--json']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == run_json("inspect", packed)


def test_target_bits_help_states_each_methods_default():
    """--target-bits's help names each method's default without importing the methods; the defaults it
    names must be the configs' (a changed default fails here until the help says so too)."""
    import typer.main

    from mpq_cli.cli import app
    from mpq_cli.methods import METHODS

    said = {"csq": 3.0, "uniform": 3.0, "bmpq": 3.0, "alq": 1.0, "bsq": None}
    assert {name: METHODS[name].config_class().target_bits for name in said} == said
    option = next(p for p in typer.main.get_command(app).commands["search"].params if p.name == "target_bits")
    assert "CSQ, uniform, BMPQ 3; ALQ 1; BSQ none" in " ".join(option.help.split())
