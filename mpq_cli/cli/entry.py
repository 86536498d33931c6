"""The ``mpq`` command line: parse options, call one API function, print the result.

Results go to stdout (only the JSON object under ``--json``, strict RFC 8259 JSON);
progress, logs and errors go to stderr. A user error (bad option, bad input file, full
disk, ...) is one line and exit code 2; an unexpected failure one line and exit 1;
Ctrl-C or SIGTERM exit 130/143 after temporary files are removed.
"""

from __future__ import annotations

import signal
import sys

import typer

from .output import Terminated, json_error

app = typer.Typer(
    name="mpq",
    help="Find mixed-precision weight quantization schemes for PyTorch vision models and ship them bit-packed. "
    "Several GPUs: torchrun --nproc-per-node N -m mpq_cli train|search|finetune|eval ... (README, Several GPUs).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The ``mpq`` entry point. Usage errors (Typer's own) are one line on stderr and exit 2, like
    every other user error."""
    import typer._click as click
    from typer.exceptions import Abort  # not in typer._click.exceptions: naming it there broke this handler

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = app(args=argv, standalone_mode=False)
    except click.exceptions.ClickException as exc:
        message = " ".join(exc.format_message().split())
        if not message:  # `mpq` alone: click printed the help
            return _exit(2, argv)
        command = f"mpq {exc.ctx.info_name} " if getattr(exc, "ctx", None) and exc.ctx.parent else "mpq "
        message = f"{message} (see `{command.strip()} --help`)"
        print(f"error: {message}", file=sys.stderr)
        code = 2
        if "--json" in (sys.argv[1:] if argv is None else argv):
            json_error(message, code)
    except Abort:
        print("interrupted", file=sys.stderr)
        code = 130
    return _exit(code if isinstance(code, int) else 0, argv)


def _exit(code: int, argv) -> int:
    if argv is None:
        sys.exit(code)
    return code
