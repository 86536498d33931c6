"""Render a scheme and a run's results: markdown for report.md, rich tables for the terminal."""

from __future__ import annotations

from .scheme import Scheme


def _fmt_acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def summary_lines(summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs shared by report.md and the terminal."""
    rows = [("method", summary["method"]), ("model", summary["model"]), ("data", summary["data"])]
    if summary.get("synthetic"):
        rows.append(("WARNING", "synthetic data: accuracies are meaningless, for smoke tests only"))
    rows += [
        ("FP32 top-1", _fmt_acc(summary.get("fp_top1"))),
        ("quantized top-1 (exact integer weights)", _fmt_acc(summary.get("top1"))),
    ]
    if summary.get("fp_top1") is not None and summary.get("top1") is not None:
        rows.append(("accuracy drop", f"{summary['fp_top1'] - summary['top1']:.2f} points"))
    rows += [
        ("target bits", f"{summary['target_bits']:g}" if summary.get("target_bits") is not None else "n/a"),
        ("average bits (nominal, parameter-weighted)", f"{summary['avg_bits']:.4f}"),
        ("average stored bits (codes + sign)", f"{summary['avg_stored_bits']:.4f}"),
        ("weight compression vs FP32 (nominal)", f"{summary['weight_compression']:.2f}x"),
        ("model size, estimated from codes", f"{summary['model_bytes_estimated'] / 1024:.1f} KiB "
                                             f"(FP32: {summary['fp32_bytes'] / 1024:.1f} KiB, "
                                             f"{summary['model_compression_estimated']:.2f}x)"),
    ]
    if "budget_met" in summary:
        rows.append(("within budget", "yes" if summary["budget_met"] else "NO"))
    return rows


def layer_rows(scheme: Scheme) -> list[list[str]]:
    rows = []
    for e in scheme.layers:
        bits = "FP32" if e.is_fp else str(e.bits)
        stored = "FP32" if e.is_fp else (f"{e.stored_bits}" if e.stored_bits else "0 (all zero)")
        rows.append([e.name, e.kind, "x".join(map(str, e.shape)), f"{e.params:,}", bits, stored])
    return rows


LAYER_HEADER = ["layer", "type", "shape", "params", "bits", "stored bits/weight"]


def markdown_report(summary: dict, scheme: Scheme, notes: list[str] | None = None) -> str:
    out = [f"# mpq {summary['method']} run: {summary['model']} on {summary['data']}", "", "## Summary", "",
           "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in summary_lines(summary)]
    out += ["", "## Layers", "", "| " + " | ".join(LAYER_HEADER) + " |", "|" + "---|" * len(LAYER_HEADER)]
    out += ["| " + " | ".join(row) + " |" for row in layer_rows(scheme)]
    out += ["", "Bits are magnitude bits as the method counts them (sign excluded). Stored bits per weight are "
            "those the exact integer codes need as sign-magnitude numbers (sign included); a layer at 0 bits "
            "is all zero and stores nothing but its shape. Sizes are estimates from the codes; `mpq export` "
            "measures the packed file."]
    for note in notes or []:
        out += ["", note]
    return "\n".join(out) + "\n"


def rich_layer_table(scheme: Scheme):
    from rich.table import Table

    table = Table(title=f"{scheme.method} scheme", show_lines=False)
    for i, col in enumerate(LAYER_HEADER):
        table.add_column(col, justify="left" if i < 3 else "right")
    for row in layer_rows(scheme):
        table.add_row(*row)
    return table


def rich_summary_table(summary: dict):
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary_lines(summary):
        table.add_row(k, v)
    return table
