"""A short run on the real Fashion-MNIST (CI installs the Debian package dataset-fashion-mnist)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mpq_cli.cli import app
from mpq_cli.data import DataConfig, load_data

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_reads_the_real_files(real_fmnist):
    info, train, val = load_data(DataConfig("fashion-mnist", data_dir="/nonexistent", augment=False))
    assert (info.num_classes, info.in_channels, info.input_size) == (10, 1, (28, 28))
    assert train.images.shape == (60000, 1, 28, 28) and val.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    x, y = next(iter(val))
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2  # normalised


def test_short_fp_then_csq(real_fmnist, tmp_path):
    runner = CliRunner()
    common = ["--data", "fashion-mnist", "--batch-size", "256", "--device", "cpu", "--quiet", "--json"]
    fp = runner.invoke(
        app,
        [
            "train",
            "--model",
            "lenet5",
            *common,
            "--epochs",
            "1",
            "--limit-train-batches",
            "60",
            "--out",
            str(tmp_path / "fp"),
        ],
    )
    assert fp.exit_code == 0, fp.output
    fp_top1 = json.loads(fp.stdout)["top1"]
    assert fp_top1 > 70
    csq = runner.invoke(
        app,
        [
            "search",
            "--method",
            "csq",
            "--target-bits",
            "2",
            "--checkpoint",
            str(tmp_path / "fp"),
            *common,
            "--epochs",
            "1",
            "--limit-train-batches",
            "40",
            "--lr",
            "0.01",
            "--out",
            str(tmp_path / "csq"),
        ],
    )  # CSQ's lr 0.1 wrecks a 60-batch model in 20 steps
    assert csq.exit_code == 0, csq.output
    summary = json.loads(csq.stdout)
    assert 1.9 - 1e-9 <= summary["avg_bits"] <= 2.0 + 1e-9 and summary["budget_met"]
    assert summary["fp_top1"] == pytest.approx(fp_top1)
    assert summary["top1"] > 40
    # the packed file of the 2-bit lenet5 is >= 10x smaller than its FP32 checkpoint, and evaluates the same
    packed = tmp_path / "csq.safetensors"
    export = runner.invoke(app, ["export", str(tmp_path / "csq"), "-o", str(packed), "--json"])
    assert export.exit_code == 0, export.output
    fp32_bytes = (tmp_path / "fp" / "model.safetensors").stat().st_size
    assert json.loads(export.stdout)["fp32_checkpoint_bytes"] == fp32_bytes
    assert fp32_bytes / packed.stat().st_size >= 10
    evaluated = runner.invoke(app, ["eval", str(packed), "--device", "cpu", "--json", "--quiet"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["top1"] == summary["top1"]
