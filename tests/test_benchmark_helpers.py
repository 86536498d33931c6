"""The benchmark pages' helpers: a kept command must be re-runnable from the repository root."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_in_repository_strips_a_worktrees_absolute_paths():
    common = load_common()
    kept = (
        "mpq sweep --method csq --checkpoint /work/wt-bg/benchmarks/references/r.safetensors "
        "--data-dir /work/shared/data --out /work/wt-bg/runs/evidence/resnet20/L2/csq-seed0"
    )
    assert common.in_repository(kept) == (
        "mpq sweep --method csq --checkpoint benchmarks/references/r.safetensors "
        "--data-dir ../shared/data --out runs/evidence/resnet20/L2/csq-seed0"
    )
    # a data folder that is not the shared default stays as the user gave it
    assert "--data-dir /data/cifar" in common.in_repository("mpq sweep --data-dir /data/cifar")


def test_reference_top1_reads_the_recorded_reference():
    common = load_common()
    assert common.reference_top1("resnet20") == 87.21
    assert common.reference_top1("no-such-model") is None
