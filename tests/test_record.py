"""The run record (config.json): one reader and writer, fingerprints that stay put, and the same settings
resolved from the command line and from the Python API."""

import json
from pathlib import Path

import pytest
from conftest import SMALL, run_json

from mpq_cli.errors import MpqError
from mpq_cli.record import RunRecord

RECORDS = Path(__file__).parent / "fixtures" / "records"  # config.json files as e31aace wrote them


@pytest.mark.parametrize("name", ["fp", "csq", "ft"])
def test_records_written_before_the_record_keep_their_fingerprints(name):
    """config.json files written by mpq before RunRecord existed (commit e31aace: train, a CSQ search, its
    finetune): the record's fingerprint rule gives back the fingerprint each was written with, so --resume
    and mpq sweep still recognise those runs."""
    fields = json.loads((RECORDS / f"{name}-e31aace.json").read_text())
    recorded = fields.pop("fingerprint")
    assert RunRecord(fields).fingerprinted().fingerprint == recorded
    assert RunRecord({**fields, "versions": {"mpq": "9"}}).fingerprinted().fingerprint == recorded  # outside it


def test_new_runs_write_the_layout_old_runs_have(fp_run, csq_run, tmp_path):
    """Every section and key an old record has, a new one has, and no more (a new key would change every
    fingerprint silently)."""
    ft = tmp_path / "ft"
    run_json("finetune", csq_run[0], "--epochs", "1", "--limit-train-batches", "1", "--out", ft)
    for name, run in (("fp", fp_run[0]), ("csq", csq_run[0]), ("ft", ft)):
        old = json.loads((RECORDS / f"{name}-e31aace.json").read_text())
        new = json.loads((Path(run) / "config.json").read_text())
        assert set(new) == set(old), name
        for section in ("model", "data", "train", "method_config", "selection"):
            if section == "method_config" and section in old and new[section]["version"] > old[section]["version"]:
                # a method's config version may add fields (its from_dict gives old records their old values)
                assert set(new[section]) > set(old[section]), (name, section)
            elif section in old:
                assert set(new[section]) == set(old[section]), (name, section)
        assert RunRecord.load(run).fingerprinted().fingerprint == new["fingerprint"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "not a JSON object"),
        ('{"command": "search", "method": 3}', "malformed run record (method 3)"),
        ("{nope", "cannot read"),
    ],
)
def test_a_malformed_record_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(MpqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunRecord.load(tmp_path)


def test_the_typed_views_name_the_file_when_a_section_is_missing(tmp_path):
    (tmp_path / "config.json").write_text('{"command": "search", "method": "csq", "train": {"epochs": 1}}')
    record = RunRecord.load(tmp_path, quantized=True)
    with pytest.raises(MpqError, match=r"config.json: malformed run record \(no 'data' object\)"):
        record.data()
    with pytest.raises(MpqError, match="config.json: malformed run record"):
        record.selection()
    assert record.training().epochs == 1 and record.probe_batches == 8


def test_an_fp_run_is_not_a_search(fp_run):
    with pytest.raises(MpqError, match="is an FP training run"):
        RunRecord.load(fp_run[0], quantized=True)


def test_train_and_finetune_resolve_settings_as_the_command_line_does(fp_run, csq_run, tmp_path, monkeypatch):
    """`mpq train` / `mpq finetune` and `api.train` / `api.finetune` given the same settings write the same
    record (the data folder from $MPQ_DATA_DIR alike, fine-tuning's default length alike)."""
    import mpq_cli
    from mpq_cli.api import ModelOptions
    from mpq_cli.data import DataConfig

    monkeypatch.setenv("MPQ_DATA_DIR", str(tmp_path / "datasets"))
    run_json("train", "--model", "lenet5", *SMALL, "--epochs", "1", "--out", tmp_path / "cli-fp")
    data = DataConfig("synthetic", batch_size=32, input_size=(1, 16, 16), limit_train_batches=3)
    mpq_cli.train(ModelOptions("lenet5"), data, {"epochs": 1, "device": "cpu"}, out=str(tmp_path / "api-fp"))
    cli, api = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("cli-fp", "api-fp"))
    assert cli["data"]["data_dir"] == str(tmp_path / "datasets")
    assert {k: v for k, v in api.items() if k != "versions"} == {k: v for k, v in cli.items() if k != "versions"}

    # the method's own fine-tuning lr (CSQ's 0.1) diverges on random images; the length is the default
    run_json("finetune", csq_run[0], "--limit-train-batches", "1", "--lr", "0.01", "--out", tmp_path / "cli-ft")
    mpq_cli.finetune(csq_run[0], {"lr": 0.01}, {"limit_train_batches": 1}, out=str(tmp_path / "api-ft"))
    cli, api = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("cli-ft", "api-ft"))
    assert api["train"] == cli["train"] and api["train"]["epochs"] == 5
    assert api["fingerprint"] == cli["fingerprint"]
