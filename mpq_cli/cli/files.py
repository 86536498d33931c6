"""``mpq eval``, ``mpq export`` and ``mpq inspect``: the commands that read a packed file or a run."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import MpqError
from .entry import app
from .options import DataDirOpt, JsonOpt, LimitValOpt, QuietOpt, UserModelOpt
from .output import RichReporter, emit, handle_errors, out_console, print_json, rank


@app.command("eval")
@handle_errors
def eval_(
    target: Annotated[Path, typer.Argument(help="A packed .safetensors file (from `mpq export`) or a run directory.")],
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Dataset (default: the one the file or run recorded).")
    ] = None,
    data_dir: DataDirOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the recorded one).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: the run's; auto for files).")] = None,
    limit_val_batches: LimitValOpt = None,
    model: UserModelOpt = None,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Skip the SHA-256 check of each tensor of a packed "
            "file (about a tenth of the load time; the header is checked "
            "regardless).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Measure top-1 (and top-5 with more than 5 classes) of a packed file or a run, on its recorded dataset.

    The whole validation (test) split, unless --limit-val-batches is given.

    A packed file is decoded into a plain model (no run directory needed); a run evaluates its exact weights.
    """
    from .. import api

    overrides = {
        k: v
        for k, v in dict(
            name=data, data_dir=data_dir, batch_size=batch_size, limit_val_batches=limit_val_batches
        ).items()
        if v is not None
    }
    summary = api.evaluate_run(
        str(target),
        overrides,
        device=device,
        reporter=RichReporter(quiet, bars=False if as_json else None),
        model=model,
        verify=not no_verify,
    )
    emit(summary, as_json, "eval")
    if not as_json and summary.get("top1_at_export") is not None and rank() == 0:
        limit = summary.get("limit_val_batches_at_export")
        on = f" on its first {limit} validation batches of each process (--limit-val-batches {limit})" if limit else ""
        out_console.print(
            f"the run measured {summary['top1_at_export']:.2f} %{on} at export", highlight=False, markup=False
        )


@app.command()
@handle_errors
def export(
    run: Annotated[Path, typer.Argument(help="A search or finetune run directory.")],
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="File to write (default: RUN/packed.safetensors); FILE.report.json and FILE.report.md go beside it.",
        ),
    ] = None,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="packed (bit-packed safetensors) or onnx (opset 21, weights as INT4/INT8 codes with DequantizeLinear, checked with onnxruntime; needs pip install 'mpq-cli\\[onnx]').",
        ),
    ] = "packed",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Write bit-packed safetensors (format mpq.packed/1.2, docs/format.md) and a per-layer precision report, or an ONNX model.

    Every layer is checked to decode to the run's exact weights before the file is written; an ONNX model is checked against the packed model's logits with onnxruntime.
    """
    from .. import api

    if format_ not in ("packed", "onnx"):
        raise MpqError(f"--format must be packed or onnx, got {format_!r}")
    if format_ == "onnx":
        from ..onnx_export import export_onnx

        if out is None:
            raise MpqError("--format onnx needs -o NAME.onnx")
        summary = export_onnx(run, out)
        if as_json:
            print_json(summary)
            return
        check = (
            f"onnxruntime against load_packed on {summary['checked_images']} images: top-1 equal on "
            f"{100 * summary['top1_agreement']:.1f} %, largest logit difference {summary['max_relative_difference']:.1e} "
            "of the largest logit"
        )
        if summary.get("quantizers_exact"):
            check += f"; {summary['quantizers_exact']} input quantizer(s) equal to PACT's bit for bit"
        out_console.print(
            f"written: {summary['out']} ({summary['onnx_bytes']:,} bytes; the packed file: {summary['packed_bytes']:,} "
            f"bytes); {check}; report: {summary['report']}",
            highlight=False,
        )
        for note in summary["notes"]:
            out_console.print(f"note: {note}", highlight=False)
        return
    summary = api.export(str(run), out)
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    from ..report import size_summary_lines

    table = Table(show_header=False, box=None)
    for k, v in size_summary_lines(summary):
        table.add_row(k, v)
    out_console.print(table)
    out_console.print(f"written: {summary['out']} (report: {summary['report']})", highlight=False)


class SortKey(enum.StrEnum):
    order = "order"
    size = "size"
    bits = "bits"
    name = "name"


@app.command()
@handle_errors
def inspect(
    target: Annotated[Path, typer.Argument(help="A packed .safetensors file or a run directory.")],
    layers: Annotated[str | None, typer.Option(help="Only layers whose name matches this glob.")] = None,
    sort: Annotated[
        SortKey, typer.Option(help="Row order: module order, size (bytes, largest first), bits, name.")
    ] = SortKey.order,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also draw the bits per layer (in module order, the --layers selection) into this PNG."),
    ] = None,
    as_json: JsonOpt = False,
):
    """Show the layer bit table: bits, encoding, steps (one, or one per output channel), stored bytes and share of each layer, and the totals.

    A file is read from its header alone (no model is built); a run is encoded in memory as export would.
    """
    from ..commands.export import inspect as inspect_target
    from ..commands.export import plot_layers
    from ..packing.sizes import select_layers

    report = inspect_target(str(target))
    rows = select_layers(report, layers, sort.value if isinstance(sort, enum.Enum) else sort)
    if plot is not None:
        plot_layers(report, select_layers(report, layers, "order"), plot)
    if as_json:
        print_json({**report, "layers": rows})
        return
    from rich.table import Table

    from ..report import rich_size_table, size_summary_lines

    out_console.print(rich_size_table(report, rows, f"{target} ({report['source']})"))
    from ..report import bits_convention

    out_console.print(
        f"bits: nominal ({bits_convention(report['method'])}); steps: one per layer, or N/ch, one per "
        "output channel; b/w: stored bits per weight measured on the file, sign, steps and tables included",
        highlight=False,
    )
    summary = Table(show_header=False, box=None)
    for k, v in size_summary_lines(report):
        summary.add_row(k, v)
    out_console.print(summary)
