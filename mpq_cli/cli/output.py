"""What the CLI prints: progress and logs on stderr (:class:`RichReporter`), results on stdout (a table, or the
JSON object alone under ``--json``), and every failure as one line with its exit code (:func:`handle_errors`)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from ..errors import MpqError
from ..reporting import Reporter
from ..rundir import dumps

out_console = Console()
err_console = Console(stderr=True)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files are removed on the way out."""


class RichReporter(Reporter):
    """Progress on stderr: on a terminal, a bar per epoch (steps, elapsed, ETA, loss, accuracy and the
    method's average bits) above one line per epoch; in a pipe, or with ``--json`` (whose stdout is
    the JSON alone), the epoch lines only; nothing with ``--quiet``."""

    def __init__(self, quiet: bool, bars: bool | None = None):
        self.quiet = quiet or rank() != 0  # under torchrun, rank 0 speaks for every rank
        self.bars = err_console.is_terminal if bars is None else bars
        self.progress = None
        self.task = None

    def start(self, description, total):
        if self.quiet or not self.bars:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=err_console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")

    def advance(self, steps=1, **fields):
        if self.progress is None:
            return
        info = " ".join(f"{k} {v:.3f}" if k != "beta" else f"β {v:.1f}" for k, v in fields.items())
        self.progress.update(self.task, advance=steps, info=info)

    def stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def log(self, message):
        if not self.quiet:
            err_console.print(message, highlight=False, markup=False, soft_wrap=True)


def rank() -> int:
    """This process's rank under torchrun (0 when not launched by it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def json_error(message: str, exit_code: int, out=None) -> None:
    """Under ``--json`` a failure is still one object on stdout, so a script always has one to read:
    the message, the exit code, and the run directory or file it left, if any."""
    if rank() != 0:
        return
    obj = {"error": message, "exit_code": exit_code}
    if out is not None and Path(out).exists():
        obj["out"] = str(out)
    sys.stdout.write(dumps(obj) + "\n")


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json, out = kwargs.get("as_json"), kwargs.get("out")

        def fail(message: str, code: int, prefix: str = "error: ") -> typer.Exit:
            err_console.print(f"{prefix}{message}", highlight=False, markup=False, soft_wrap=True)
            if as_json:
                json_error(message, code, out)
            return typer.Exit(code)

        try:
            return fn(*args, **kwargs)
        except MpqError as exc:
            where = f"rank {rank()}: " if rank() else ""
            raise fail(f"{where}{exc}", 2) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130, prefix="") from None
        except Terminated:
            raise fail("terminated", 143, prefix="") from None
        except typer.Exit:
            raise
        except OSError as exc:  # the disk is full or read-only, a path is not writable, ...: the user's to fix
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}", 2) from None
        except Exception as exc:  # an unexpected failure still ends in one line; MPQ_DEBUG=1 shows the traceback
            if os.environ.get("MPQ_DEBUG"):
                raise
            if _out_of_memory(exc):  # a resource the user chose (batch, input size, model), not a bug
                raise fail(
                    f"out of memory ({_first_line(exc)[:160]}); use a smaller --batch-size, input or model", 2
                ) from None
            raise fail(
                f"{exc.__class__.__name__}: {_first_line(exc)} (MPQ_DEBUG=1 shows the traceback)",
                1,
                prefix="internal error: ",
            ) from None

    return wrapper


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


UNUSED_BITS_NOTE = 0.1


def counted(summary: dict) -> str:
    """The summary key ``--target-bits`` caps (``--budget-on``)."""
    return "avg_counted_bits" if "avg_counted_bits" in summary else "avg_bits"


def unit(summary: dict) -> str:
    return "stored bits" if summary.get("budget_on") == "stored" else "bits"


def exit_if_over_budget(summary: dict) -> None:
    """``--target-bits`` is a ceiling. A finished search whose scheme is over it is written and reported,
    and the command still fails (exit 2): a script must not take "within budget: NO" for success. One
    that ends well under it succeeds and says how far under."""
    if summary.get("budget_met") is False and rank() != 0:
        raise typer.Exit(2)  # rank 0 says why
    under = summary.get("bits_under_budget")
    if summary.get("budget_met") and under is not None and under > UNUSED_BITS_NOTE and rank() == 0:
        err_console.print(
            f"note: the scheme ends at {summary[counted(summary)]:.4f} average {unit(summary)}, {under:.4f} "
            f"under the ceiling of "
            f"{summary['target_bits']:g} (see report.md for what the budget step could reach)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if summary.get("budget_met") is False:
        over = (
            f"over the ceiling of {summary['target_bits']:g}"
            if under is not None and under < 0
            else "outside the method's budget (its stored bits, or its byte budget)"
        )
        err_console.print(
            f"error: the scheme ends at {summary.get(counted(summary), float('nan')):.4f} average "
            f"{unit(summary)}, {over}; "
            f"the run is in {summary['out']} (budget_met false)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)


def print_json(obj) -> None:
    if rank() == 0:
        sys.stdout.write(dumps(obj) + "\n")


def emit(summary: dict, as_json: bool, title: str) -> None:
    if rank() != 0:  # under torchrun, rank 0 prints the result
        return
    if as_json:
        print_json(summary)
        return
    from ..report import rich_summary_table

    if "avg_bits" in summary:
        out_console.print(rich_summary_table(summary))
        out_console.print(f"run directory: {summary['out']}", highlight=False)
        return
    from ..report import measured_on

    acc = f"top-1 {summary['top1']:.2f} %{measured_on(summary)}"
    if summary.get("top5") is not None:
        acc += f", top-5 {summary['top5']:.2f} %"
    if summary.get("val_top1") is not None:
        acc += f" on the test split; hold-out top-1 {summary['val_top1']:.2f} % ({summary['val_images']} images)"
    if summary.get("synthetic"):
        acc += "  (synthetic data: for smoke tests only)"
    out_console.print(f"{title}: {acc}", highlight=False)
    if summary.get("command") != "eval":
        out_console.print(f"written: {summary['out']}", highlight=False)
