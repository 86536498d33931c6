"""The run directory: every file a command writes, written atomically.

Layout (``--out``, default ``runs/<method>-<model>-<timestamp>``)::

    config.json        resolved configuration, seed, versions, fingerprint
    model.safetensors  the model's state (for search/finetune: the method's parameters)
    method.json        method state beyond tensors (phase, schedule position)
    codes.safetensors  exact integer codes and step of every quantized layer
    scheme.json        the bit table and its statistics
    metrics.jsonl      one JSON object per epoch (and one for the final evaluation)
    summary.json       final numbers
    report.md          the human-readable report
    checkpoint.pt      last epoch's training state for --resume (tensors only)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from .errors import MpqError


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp):
        Path(tmp).write_text(text)

    _atomic(path, write)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MpqError(f"{path} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise MpqError(f"cannot read {path}: {exc}") from None


def read_search_config(run_dir: Path) -> dict:
    """``config.json`` of a search/finetune run; a clear error for anything else."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise MpqError(f"{run_dir} is not an mpq run directory (no config.json)")
    config = read_json(run_dir / "config.json")
    if "method" not in config:
        raise MpqError(f"{run_dir} is an FP training run; `mpq search --checkpoint {run_dir}` quantizes it")
    return config


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MpqError(f"{path} not found: nothing to resume") from None
    except Exception as exc:  # unpickling refused or a truncated file
        raise MpqError(f"{path}: cannot be resumed from ({exc.__class__.__name__})") from None


def default_run_dir(prefix: str, model: str) -> Path:
    safe_model = model.replace("/", "_").replace(":", "_").replace(".py", "")
    return Path("runs") / f"{prefix}-{safe_model}-{time.strftime('%Y%m%d-%H%M%S')}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        torchvision = version("torchvision")  # from the installed metadata: importing torchvision takes seconds
    except PackageNotFoundError:
        torchvision = "unknown"
    return {"mpq": __version__, "torch": torch.__version__, "torchvision": torchvision}


def fingerprint(obj) -> str:
    """A short, stable hash of a JSON-able object (the resolved config, a checkpoint's bytes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def file_fingerprint(path: Path | None) -> str | None:
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop records of epochs that the checkpoint does not hold."""
        if not self.path.exists():
            return
        records = [(line, json.loads(line)) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line, r in records if r.get("epoch", -1) <= epoch and r.get("stage") != "final"]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))
