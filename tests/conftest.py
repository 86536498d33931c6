import os
from pathlib import Path

import pytest
import torch
from torch import nn

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


class TinyNet(nn.Module):
    """Conv + BN + Linear: every kind of layer mpq handles, in milliseconds."""

    def __init__(self, num_classes=10, in_channels=1, input_size=(8, 8)):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def tiny_net(num_classes=10, in_channels=1, input_size=(8, 8)):
    return TinyNet(num_classes, in_channels, input_size)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_factory_file(tmp_path):
    """A user model file for `--model path.py:factory`."""
    src = Path(__file__).read_text()
    path = tmp_path / "usernet.py"
    path.write_text(src.split("REAL_FMNIST")[0] + src[src.index("class TinyNet") : src.index("@pytest.fixture")])
    return f"{path}:tiny_net"


@pytest.fixture
def real_fmnist():
    if not (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("MPQ_REQUIRE_REALDATA"):
            pytest.fail("real Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return REAL_FMNIST


# -- CLI helpers and runs shared by the CLI, export and inspect tests ---------------------------
SMALL = [
    "--data",
    "synthetic",
    "--input-size",
    "1,16,16",
    "--batch-size",
    "32",
    "--limit-train-batches",
    "3",
    "--device",
    "cpu",
]


def invoke(*args):
    from typer.testing import CliRunner

    from mpq_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def run_json(*args):
    import json

    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def fp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fp"
    summary = run_json("train", "--model", "lenet5", *SMALL, "--epochs", "2", "--out", out)
    return out, summary


@pytest.fixture(scope="session")
def csq_run(fp_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "csq"
    summary = run_json(
        "search",
        "--method",
        "csq",
        "--target-bits",
        "2",
        "--model",
        "lenet5",
        "--checkpoint",
        fp_run[0],
        *SMALL,
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--out",
        out,
    )
    return out, summary


def per_channel_exact_codes(self):
    """A uniform quantizer's exact codes with one step per output channel (clip: each channel's max|W|), in the
    shapes the methods hand over: codes of the weight's shape, the step ``(C, 1, ..., 1)``. Patched over uniform's
    quantizers, it makes a run with per-channel steps before the methods take ``--granularity``."""
    from mpq_cli.quant.primitives import max_code, per_channel_max, quantize_codes

    weight = self.weight.detach()
    scale = per_channel_max(weight, "channel")
    if not self.bits:
        return torch.zeros_like(weight, dtype=torch.int32), torch.zeros_like(scale)
    return quantize_codes(weight, scale, self.bits), (scale / max_code(self.bits)).to(torch.float32)


@pytest.fixture(scope="session")
def channel_run(fp_run, tmp_path_factory):
    """A uniform lenet5 run whose every layer has one step per output channel (uniform's quantizers patched while
    it searches; the run's files are then read as any run's). Returns ``(run directory, summary)``."""
    from mpq_cli.methods.uniform import LSQWeight, UniformWeight

    out = tmp_path_factory.mktemp("runs") / "uniform-channel"
    with pytest.MonkeyPatch.context() as patch:
        for quantizer in (LSQWeight, UniformWeight):
            patch.setattr(quantizer, "exact_codes", per_channel_exact_codes)
        args = ["search", "--method", "uniform", "--target-bits", "3", "--model", "lenet5"]
        summary = run_json(*args, "--checkpoint", fp_run[0], *SMALL, "--epochs", "1", "--lr", "0.01", "--out", out)
    return out, summary


def rewrite_packed(src, dst, edit_header=None, edit_tensors=None, *, mpq_text=None, resign=True):
    """Copy a packed file with its header and/or tensors edited, re-signed (fresh digests) as a
    hostile writer would, so that the reader's own checks, not the digest, must catch the edit."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mpq_cli.packing.format import packed_metadata

    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(src))
    header = json.loads(metadata["mpq"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    if mpq_text is not None:
        save_file(tensors, str(dst), metadata={**metadata, "mpq": mpq_text})
    elif resign:
        save_file(
            tensors,
            str(dst),
            metadata={"format": "pt", **packed_metadata({k: v for k, v in header.items() if k != "digests"}, tensors)},
        )
    else:
        save_file(tensors, str(dst), metadata={**metadata, "mpq": json.dumps(header)})


def pytest_configure(config):
    # under pytest-xdist (scripts/test.sh runs one worker per core) each worker computes on one thread:
    # two workers of two threads each on two cores only take turns
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
