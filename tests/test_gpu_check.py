"""scripts/gpu-check.sh runs its three checks on a CPU when asked (the real run needs a GPU)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu-check.md"
    command = ["bash", "scripts/gpu-check.sh", "--device", "cpu", "--overhead-model", "lenet5", "--size", "28"]
    command += ["--batch", "8", "--steps", "1", "--rounds", "1", "--search-model", "lenet5", "--search-size", "28"]
    command += ["--methods", "uniform", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.with_suffix(".json").read_text())
    for key in ("overhead", "overhead_amp"):
        assert not results[key]["error"] and results[key]["rows"][0]["method"] == "uniform"
        assert results[key]["rows"][0]["time_ratio"] > 0
    searches = {row["method"]: row for row in results["searches"]}
    assert set(searches) == {"uniform", "uniform (per channel)"}
    for search in searches.values():
        assert search["ok"] and search["file_top1"] == search["run_top1"] and search["file_bytes"] > 0
    # the per-channel file keeps a float32 step per output channel: more bytes than the per-tensor one
    assert searches["uniform (per channel)"]["file_bytes"] > searches["uniform"]["file_bytes"]
    (same,) = results["same_scheme"]
    assert same["ok"] and same["differing_layers"] == [] and same["layers"] == 4  # lenet5: conv, conv, fc, fc
    page = out.read_text()
    assert "## 1. Step overhead, lenet5" in page and "## 3. The same lenet5 search on cpu" in page


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run for real")
def test_gpu_check_without_a_gpu_says_so():
    done = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--device", "cuda:0"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "no CUDA device here" in done.stdout
