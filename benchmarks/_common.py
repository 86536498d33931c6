"""Helpers shared by the benchmark scripts: run one `mpq` command and read its JSON summary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPQ = [sys.executable, "-m", "mpq_cli"]


def run(args: list[str], log: list[str], quiet: bool = True, check: bool = True) -> dict:
    """Run ``mpq ARGS --json [--quiet]`` from the repository root; record the command in ``log``.

    A failing command ends the benchmark, or with ``check=False`` returns ``{"error": its one-line message}``."""
    log.append("mpq " + " ".join(args))
    started = time.time()
    out = subprocess.run(
        [*MPQ, *args, "--json", *(["--quiet"] if quiet else [])], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode != 0:
        if not check:
            return {"error": (out.stderr.strip().splitlines() or ["?"])[-1].removeprefix("error: ")}
        sys.exit(f"failed: mpq {' '.join(args)}\n{out.stderr}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    summary["wall_seconds"] = round(time.time() - started, 1)
    return summary


def write_results(relative: str, lines: list[str]) -> None:
    """Write a results page (``lines`` joined) under the repository root and print it."""
    text = "\n".join(lines) + "\n"
    path = ROOT / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


def fresh_output(out: str) -> Path:
    """The benchmark's output folder, refused if it exists (a benchmark never mixes runs)."""
    path = Path(out)
    if (ROOT / path).exists():
        sys.exit(f"{path} exists; remove it or pass --out")
    return path


def fp32_reference(run_dir: str) -> dict:
    """``top1``, ``bytes`` (its checkpoint file) and ``epochs`` of an ``mpq train`` run."""
    root = ROOT / run_dir
    return {
        "top1": json.loads((root / "summary.json").read_text())["top1"],
        "bytes": (root / "model.safetensors").stat().st_size,
        "epochs": json.loads((root / "config.json").read_text())["train"]["epochs"],
    }


def keep_record(path: Path, record: dict) -> None:
    """Keep one finished row as JSON under ``benchmarks/results/``, whole or not at all (temp file, then rename):
    committed, it carries a long benchmark across sessions and machines, and an interrupted row simply runs again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)


def sweep_row(command: list[str], sweep: Path, log: list[str]) -> tuple[dict | None, str]:
    """Run a one-row ``mpq sweep`` (its ``--out`` is ``sweep``): ``(row, "")``, or ``(None, why)`` when the
    command, the run or the file's evaluation failed, or the run missed its budget (a row over its ceiling is
    not at the bits it is compared at)."""
    result = run(command, log, check=False)
    rows = json.loads((sweep / "sweep.json").read_text())["rows"] if (sweep / "sweep.json").is_file() else []
    if rows and rows[0].get("status") == "over budget":
        return (
            None,
            f"over budget: {rows[0].get('avg_stored_bits')} stored bits for a target of {rows[0].get('target_bits')}",
        )
    if "error" in result or not rows or rows[0].get("top1") is None:
        return None, result.get("error") or (rows[0].get("error") or rows[0].get("status") if rows else "no sweep.json")
    return rows[0], ""


def partial_note(rows: list[dict]) -> str:
    """`` (on N of M test images)`` when a kept row was measured on part of the test split (a smoke run), else ``""``:
    every partial measurement says so."""
    partial = [r for r in rows if (r.get("samples") or 0) < (r.get("split_samples") or 0)]
    return f" (on {partial[0]['samples']:,} of {partial[0]['split_samples']:,} test images)" if partial else ""


def in_repository(command: str) -> str:
    """A kept command with its paths relative to the repository root, where it runs (a row kept from another
    checkout, e.g. a worktree, names that checkout's absolute paths; the shared data as the default names it)."""
    command = re.sub(r"--data-dir /\S*?/shared/data\b", "--data-dir ../shared/data", command)  # the default's
    return re.sub(r"/\S*?/(?=(benchmarks|runs)/)", "", command)


def reference_top1(name: str) -> float | None:
    """Test top-1 of a recorded FP32 reference (benchmarks/results/references/NAME.json), or None."""
    path = ROOT / "benchmarks/results/references" / f"{name}.json"
    return json.loads(path.read_text())["top1"] if path.is_file() else None


def require_reference(relative: str) -> None:
    """Stop with one line when a trained reference is missing (MobileNetV2's is not in the repository)."""
    if not (ROOT / relative).is_file():
        sys.exit(
            f"{relative} is missing: build it with `.venv/bin/python benchmarks/references.py --only "
            f"{Path(relative).name.split('-')[0]}` and compare its sha256 with benchmarks/results/references.md"
        )
