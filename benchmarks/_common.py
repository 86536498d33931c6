"""Helpers shared by the benchmark scripts: run one `mpq` command and read its JSON summary."""

from __future__ import annotations

import json
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
