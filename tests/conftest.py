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


@pytest.fixture(scope="session")
def channel_run(fp_run, tmp_path_factory):
    """A uniform lenet5 run with one step per output channel (``--granularity channel``). Returns ``(run
    directory, summary)``."""
    out = tmp_path_factory.mktemp("runs") / "uniform-channel"
    args = ["search", "--method", "uniform", "--target-bits", "3", "--model", "lenet5", "--granularity", "channel"]
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
