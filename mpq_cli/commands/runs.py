"""Run directories: claiming one for a command (locked, fresh unless resumed), checking a ``--resume`` against
the configuration, and reusing a finished run made with the same settings (``mpq sweep``)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .. import distributed
from ..engine import (
    Reporter,
)
from ..errors import MpqError, StaleRunError
from ..record import RunRecord
from ..rundir import (
    RunDirLock,
    default_run_dir,
    dumps,
    is_fresh_run_dir,
    load_checkpoint_state,
    loads,
    read_json,
)


@contextmanager
def claim_run_dir(out: str | None, prefix: str, model: str, resume: bool):
    """The run directory, locked against a second writer for the ``with`` block.

    A directory that is empty, or holds only the ``config.json`` of a run that never
    finished an epoch, may be started afresh; anything else needs ``--resume``. Under
    torchrun rank 0 claims it (and names it) and tells the other ranks, which only read it.
    """
    path = distributed.broadcast_object(Path(out) if out else default_run_dir(prefix, model))
    if not distributed.world().is_main:
        refused = distributed.broadcast_object(None)
        if refused:
            raise MpqError(refused)
        yield path
        return
    told = False
    try:
        if path.exists() and not path.is_dir():
            raise MpqError(f"--out {path} is a file; give a directory for the run")
        path.mkdir(parents=True, exist_ok=True)
        with RunDirLock(path):
            if not resume and not is_fresh_run_dir(path):
                raise MpqError(f"{path} already exists and is not empty; pass --resume to continue it or choose --out")
            told = distributed.broadcast_object(None) is None
            yield path
    except MpqError as exc:
        if not told:
            distributed.broadcast_object(str(exc))
        raise


def resume_state(run_dir: Path, resume: bool, stage: str, fingerprint: str, reporter: Reporter) -> dict | None:
    """The checkpoint to continue from, checked against this configuration before anything is written."""
    if not resume:
        return None
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.exists():
        if is_fresh_run_dir(run_dir):
            reporter.log(f"--resume: {run_dir} holds no finished epoch; starting from the beginning")
            return None
        raise MpqError(f"--resume: {ckpt} does not exist")
    state = load_checkpoint_state(ckpt)
    if state.get("stage") != stage or state.get("fingerprint") != fingerprint:
        raise StaleRunError(
            f"--resume: {run_dir} was made with a different configuration or command; nothing was "
            "changed (start a new run with another --out, or repeat the original options)"
        )
    reporter.log(f"continuing {run_dir} from epoch {int(state['epoch']) + 2}")
    return state


def finished_run(run_dir: Path, record: RunRecord) -> dict:
    """The summary of the finished run in ``run_dir`` if ``record`` would make it again, else StaleRunError."""
    saved = RunRecord.load(run_dir) if (run_dir / "config.json").is_file() else RunRecord({})
    if saved.fingerprint == record.fingerprint:
        return {**read_json(run_dir / "summary.json"), "reused": True}
    # compared as the file holds them: a tuple (input_size) read back from JSON is a list, not a difference
    what = ", ".join(RunRecord(loads(dumps(record.fields))).differences(saved)[:4]) or "its record"
    raise StaleRunError(f"{run_dir} was made with other settings ({what} differ)")


def elapsed_before(state: dict | None) -> float:
    """Seconds the epochs a resumed run had already trained took (0 for a new run)."""
    return float(state.get("elapsed", 0.0)) if state else 0.0
