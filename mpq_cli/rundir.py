"""The run directory: every file a command writes, written atomically.

Layout (``--out``, default ``runs/<method>-<model>-<timestamp>``)::

    config.json        resolved configuration, seed, versions, fingerprint
    model.safetensors  the model's state (for search/finetune: the method's parameters)
    method.json        method state beyond tensors (phase, schedule position)
    codes.safetensors  exact integer codes and step of every quantized layer
    scheme.json        the bit table and its statistics
    metrics.jsonl      one JSON object per epoch (and one for the final evaluation)
    summary.json       final numbers
    report.md          the human-readable report, embedding bits.png and training.png
    bits.png           nominal and stored bits per layer (search/finetune)
    training.png       top-1, loss and average bits per epoch (search/finetune)
    checkpoint.pt      last epoch's training state for --resume (tensors only)
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MpqError

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: files follow the user's umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _sweep_stale_temps(path: Path) -> None:
    """Remove temporary files of ``path`` left by a writer that was killed (SIGKILL cannot be caught)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if len(parts) == 3 and parts[0].isdigit() and int(parts[0]) != os.getpid() and not _pid_alive(int(parts[0])):
            tmp.unlink(missing_ok=True)


def _atomic(path: Path, write) -> None:
    """Write ``path`` through a temporary file in the same folder, renamed into place when complete:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(str(tmp))
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:  # name the file the user asked for, not the temporary one
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    def write(tmp):
        Path(tmp).write_text(text)

    _atomic(path, write)


def strict(obj):
    """``obj`` made RFC 8259 JSON-able: non-finite floats become ``null`` (JSON has no NaN or
    Infinity), tuples lists, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict`); anything else unserialisable is a bug."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def loads(text: str | bytes):
    """Parse strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` are refused (ValueError)."""
    return json.loads(text, parse_constant=_refuse_constant)


def write_json(path: Path, obj) -> None:
    write_text_atomic(path, dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MpqError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise MpqError(f"cannot read {path}: {exc}") from None


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save  # torch imported on use: mpq --help and inspect never need it

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # serialised in memory and written by Python, so that a full or read-only disk is an OSError with its errno
    data = save(tensors, metadata={"format": "pt", **(metadata or {})})
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def save_checkpoint(path: Path, state: dict) -> None:
    import torch

    _atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint_state(path: Path) -> dict:
    import torch

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

    import torch

    from . import __version__

    try:
        torchvision = version("torchvision")  # from the installed metadata: importing torchvision takes seconds
    except PackageNotFoundError:
        torchvision = "unknown"
    return {"mpq": __version__, "torch": torch.__version__, "torchvision": torchvision}


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
            f.write(dumps(record) + "\n")
            f.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop records of epochs that the checkpoint does not hold: those after epoch ``epoch``
        (counted from 1, as the records count them)."""
        if not self.path.exists():
            return
        records = [(line, json.loads(line)) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line, r in records if r.get("epoch", -1) <= epoch and r.get("stage") != "final"]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))


class RunDirLock:
    """One writer per run directory: an exclusive ``flock`` on the directory itself, held for
    the command's life.

    Locking the directory rather than a lock file leaves nothing behind to go stale: the
    kernel drops the lock when the process ends, however it ends (``kill -9`` included), so
    a later ``--resume`` is never blocked by a dead run. Where ``fcntl`` does not exist
    (Windows) no lock is taken.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def __enter__(self) -> RunDirLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MpqError(
                    f"{self.path} is being written by another mpq process; wait for it to finish "
                    "or choose another --out"
                ) from None
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


# Files a run that never finished an epoch may leave; such a directory may be reused.
_UNTRAINED = {"config.json"}


def is_fresh_run_dir(path: Path) -> bool:
    """True for a directory a new run may take: empty, or holding only the ``config.json`` of a
    run that never finished an epoch (temporary files of killed writers are ignored)."""
    names = {p.name for p in Path(path).iterdir() if not p.name.endswith(".tmp")}
    return names <= _UNTRAINED


def read_jsonl(path: Path) -> list[dict]:
    """The epoch records of ``metrics.jsonl`` (none if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "epoch" in record:
                records.append(record)
    return records
