"""Render a scheme and a run's results: markdown for report.md, rich tables for the terminal."""

from __future__ import annotations

from .scheme import Scheme


def bits_convention(method: str) -> str:
    """How ``method`` counts nominal bits, e.g. "magnitude bits, sign excluded"."""
    from .scheme import BITS_CONVENTIONS

    if method in BITS_CONVENTIONS:  # a shipped method: no need to import the methods (torch)
        return BITS_CONVENTIONS[method]
    from .methods import METHODS

    cls = METHODS.get(method)
    return cls.bits_convention if cls is not None else "the method's own count"


def _fmt_acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def measured_on(result: dict) -> str:
    """`` on 256 of 10,000 test images`` when a measurement read part of its split, else ``""``."""
    samples, total = result.get("samples"), result.get("split_samples")
    if samples is None or total is None or samples >= total:
        return ""
    return f" on {samples:,} of {total:,} test images"


def summary_lines(summary: dict) -> list[tuple[str, str]]:
    """(label, value) pairs shared by report.md and the terminal."""
    rows = [("method", summary["method"]), ("model", summary["model"]), ("data", summary["data"])]
    if summary.get("synthetic"):
        rows.append(("WARNING", "synthetic data: accuracies are meaningless, for smoke tests only"))
    rows += [
        ("FP32 top-1", _fmt_acc(summary.get("fp_top1")) + (measured_on(summary) if summary.get("fp_top1") else "")),
        ("quantized top-1 (exact integer weights)", _fmt_acc(summary.get("top1")) + measured_on(summary)),
    ]
    if summary.get("val_images") is not None:  # --val-split: top1 is the test split's, measured once at the end
        rows[-1] = ("quantized top-1 on the test split (exact integer weights)", rows[-1][1])
        rows.append(
            (
                f"quantized top-1 on the hold-out ({summary['val_images']} training images)",
                _fmt_acc(summary["val_top1"]),
            )
        )
    if summary.get("fp_top1") is not None and summary.get("top1") is not None:
        rows.append(("accuracy drop", f"{summary['fp_top1'] - summary['top1']:.2f} points"))
    rows += [
        ("target bits", f"{summary['target_bits']:g}" if summary.get("target_bits") is not None else "n/a"),
        ("average stored bits (the packed file: sign, scales, tables)", f"{summary['avg_stored_bits']:.4f}"),
        ("packed file vs FP32", _file_size(summary)),
        ("average bits, nominal (the paper's count, parameter-weighted)", f"{summary['avg_bits']:.4f}"),
        ("weight compression, nominal (the paper's count, not the file's)", f"{summary['weight_compression']:.2f}x"),
    ]
    if summary.get("recipe"):  # mpq search: whose training defaults filled what the command line left unset
        label = {"paper": "the paper's schedule", "checkpoint": "measured from trained references"}
        rows.append(("training defaults (--recipe)", f"{summary['recipe']}: {label.get(summary['recipe'], '')}"))
    if "budget_met" in summary:
        under = summary.get("bits_under_budget")
        detail = f" ({under:.4f} bits under the ceiling)" if summary["budget_met"] and under and under > 0 else ""
        rows.append(("within budget", ("yes" if summary["budget_met"] else "NO") + detail))
    return rows


def _file_size(summary: dict) -> str:
    if summary.get("file_bytes") is None:  # a run written before sizes were measured on its file
        return "n/a (`mpq export` measures it)"
    return (
        f"{summary['file_bytes']:,} bytes, {summary['compression']:.2f}x smaller than FP32 "
        f"({summary['fp32_bytes']:,} bytes)"
    )


def format_bits(bits: int | float) -> str:
    """Whole bits as they are, ALQ's fractional bases per weight to 3 decimals."""
    return str(bits) if isinstance(bits, int) else f"{bits:.3f}"


def layer_rows(scheme: Scheme, stored_bits: dict[str, float] | None = None) -> list[list[str]]:
    """One row per layer; ``stored_bits`` (by layer, measured on the packed file) replaces the scheme's
    code widths in the stored column when given."""
    rows = []
    for e in scheme.layers:
        bits = "FP32" if e.is_fp else format_bits(e.bits)
        on_file = (stored_bits or {}).get(e.name, e.stored_bits)
        stored = "FP32" if e.is_fp else (f"{on_file:.3f}" if on_file else "0 (all zero)")
        rows.append([e.name, e.kind, "x".join(map(str, e.shape)), f"{e.params:,}", bits, stored])
    return rows


LAYER_HEADER = ["layer", "type", "shape", "params", "bits", "stored bits/weight"]


def markdown_report(
    summary: dict,
    scheme: Scheme,
    notes: list[str] | None = None,
    charts: list[tuple[str, str]] | None = None,
    stored_bits: dict[str, float] | None = None,
) -> str:
    """The run's report.md; ``charts`` are ``(caption, file name)`` pairs of images beside it; ``stored_bits``
    per layer as the packed file stores them (``api.file_sizes``)."""
    out = [
        f"# mpq {summary['method']} run: {summary['model']} on {summary['data']}",
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---|",
    ]
    out += [f"| {k} | {v} |" for k, v in summary_lines(summary)]
    for caption, name in charts or []:
        out += ["", f"![{caption}]({name})"]
    out += ["", "## Layers", "", "| " + " | ".join(LAYER_HEADER) + " |", "|" + "---|" * len(LAYER_HEADER)]
    out += ["| " + " | ".join(row) + " |" for row in layer_rows(scheme, stored_bits)]
    out += [
        "",
        f"Bits are nominal bits as {summary['method']} counts them ({bits_convention(summary['method'])}). "
        "Stored bits per weight are "
        "what the packed file `mpq export` writes from this run holds per weight, measured as `mpq inspect` "
        "measures it: the encoding's fields with their sign, the step and any code table (for binary bases, "
        "one sign bit per basis, the coordinates and group widths); a layer at 0 bits is all zero and stores "
        "nothing but its shape.",
    ]
    for note in notes or []:
        out += ["", note]
    return "\n".join(out) + "\n"


def rich_summary_table(summary: dict):
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary_lines(summary):
        table.add_row(k, v)
    return table


def markdown_size_report(report: dict, file_name: str) -> str:
    def kib(n):
        return f"{n / 1024:.1f} KiB"

    lines = [
        f"# Packed model: {file_name}",
        "",
        f"Format `{report['format']}`, model `{report['model']}`, method `{report['method']}`.",
        "",
        "| layer | type | shape | params | nominal bits | encoding | steps | stored bits/weight | bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["layers"]:
        bits = format_bits(r["bits"]) if r["quantized"] else "FP32"
        lines.append(
            f"| {r['name']} | {r['kind']} | {'x'.join(map(str, r['shape']))} | {r['params']:,} | {bits} | "
            f"{r['encoding']} | {steps_label(r)} | {r['stored_bits']:.3f} | {r['bytes']:,} |"
        )
    lines += [
        "",
        f"Nominal bits are the method's count ({bits_convention(report['method'])}); "
        "stored bits are measured on the file: packed codes, sign, scales and tables of each layer, "
        "divided by its weights. Steps: one float32 step per layer, or one per output channel (`/ch`).",
        "",
        f"- average nominal bits: {report['avg_bits']:.4f}",
        f"- average stored bits: {report['avg_stored_bits']:.4f}",
        f"- weight bytes: {report['weight_bytes']:,} ({kib(report['weight_bytes'])})",
        f"- other tensors (biases, BatchNorm, clips): {report['other_bytes']:,} bytes",
        f"- file: {report['file_bytes']:,} bytes ({kib(report['file_bytes'])}), header "
        f"{report['header_bytes']:,} bytes",
        f"- FP32 equivalent: {report['fp32_bytes']:,} bytes; compression {report['compression']:.2f}x",
    ]
    if report.get("fp32_checkpoint_bytes"):
        lines.append(
            f"- FP32 checkpoint file: {report['fp32_checkpoint_bytes']:,} bytes; "
            f"{report['compression_vs_checkpoint']:.2f}x smaller"
        )
    if report.get("top1_at_export") is not None:
        lines.append(
            f"- top-1 of the run at export: {report['top1_at_export']:.2f} % (`mpq eval FILE` measures the file)"
        )
    return "\n".join(lines) + "\n"


def steps_label(row: dict) -> str:
    """A size-report layer's steps: ``1`` per tensor, ``64/ch`` per output channel, ``-`` without steps."""
    if row.get("granularity") == "channel":
        return f"{row['steps']}/ch"
    return "1" if row.get("granularity") == "tensor" else "-"


def _bits_bar(bits: int | float | None, quantized: bool, width: int = 6) -> str:
    """``██···· 2``: one block per bit up to ``width`` bits (ALQ's fractions rounded for the bar)."""
    if not quantized:
        return "FP32"
    filled = min(width, round(bits))
    label = f"{bits:>2}" if isinstance(bits, int) else f"{bits:.2f}"
    return "█" * filled + "·" * (width - filled) + f" {label}"


def rich_size_table(report: dict, rows: list[dict], title: str):
    """The `mpq inspect` table: one row per layer, bits as a small bar, bytes and share of the file."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for i, col in enumerate(["layer", "type", "shape", "params", "bits", "enc", "steps", "b/w", "bytes", "%"]):
        table.add_column(
            col,
            justify="left" if i < 3 or i == 5 else "right",
            no_wrap=i != 0,
            min_width=12 if i == 0 else None,
            overflow="fold",
        )
    for r in rows:
        table.add_row(
            r["name"],
            r["kind"],
            "x".join(map(str, r["shape"])),
            f"{r['params']:,}",
            _bits_bar(r["bits"], r["quantized"]),
            r["encoding"],
            steps_label(r),
            f"{r['stored_bits']:.2f}",
            f"{r['bytes']:,}",
            f"{100 * r['share']:.1f}",
        )
    return table


def size_summary_lines(report: dict) -> list[tuple[str, str]]:
    rows = [
        ("model", f"{report['model']} ({report['method']})"),
        ("average bits (nominal)", f"{report['avg_bits']:.4f}"),
        ("average stored bits (measured)", f"{report['avg_stored_bits']:.4f}"),
        ("weight bytes", f"{report['weight_bytes']:,}"),
        ("file bytes", f"{report['file_bytes']:,}"),
        ("FP32 equivalent", f"{report['fp32_bytes']:,} bytes ({report['compression']:.2f}x)"),
    ]
    if report.get("fp32_checkpoint_bytes"):
        rows.append(
            (
                "FP32 checkpoint file",
                f"{report['fp32_checkpoint_bytes']:,} bytes ({report['compression_vs_checkpoint']:.2f}x)",
            )
        )
    return rows
