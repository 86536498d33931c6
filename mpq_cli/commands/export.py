"""``mpq export`` and ``mpq inspect``: the packed file, its size report and the bits-per-layer chart."""

from __future__ import annotations

from pathlib import Path

from ..errors import MpqError
from ..packing.header import FORMAT, PackedHeader
from ..packing.sizes import size_report
from ..rundir import write_json, write_text_atomic

# The modules that read tensors (torch) are imported where a run is encoded or a file written: inspecting a
# file reads its header alone, and should not wait seconds for torch.


def _report_paths(out: Path) -> tuple[Path, Path]:
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(f"{stem}.report.json"), out.with_name(f"{stem}.report.md")


def export(run: str | Path, out: str | Path | None = None) -> dict:
    """Write a run's bit-packed safetensors file and its size report (``FILE.report.json`` / ``.md``).

    Returns the size report's totals with ``out`` (the file) and ``report`` (the JSON report).
    """
    from ..export import pack_run
    from ..packing.format import write_packed
    from ..report import markdown_size_report

    packed = pack_run(run)
    out = Path(out) if out else Path(run) / "packed.safetensors"
    if out.is_dir():
        raise MpqError(f"-o {out} is a directory; give a file name")
    write_packed(out, packed.header, packed.tensors)
    written = PackedHeader.open(out)  # sizes are measured on the file as written
    report = size_report(written.header, {n: t.nbytes for n, t in written.tensors.items()}, written.file_bytes)
    json_path, md_path = _report_paths(out)
    write_json(json_path, report)
    write_text_atomic(md_path, markdown_size_report(report, out.name))
    return {
        "command": "export",
        **{k: v for k, v in report.items() if k != "layers"},
        "out": str(out),
        "report": str(json_path),
    }


def plot_layers(report: dict, layers: list[dict], path: str | Path) -> Path:
    """Draw the bits per layer of an :func:`inspect` report (its ``layers``, or a selection of them) as a PNG."""
    from ..plots import bits_chart

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MpqError(f"--plot writes a PNG: give a file name ending in .png, not {path.name!r}")
    if not path.parent.is_dir():
        raise MpqError(f"--plot: folder {path.parent} does not exist")
    if not layers:
        raise MpqError("--plot: no layer to draw (check --layers)")
    title = f"{report['method']} on {report['model']}: {report['avg_bits']:.3f} nominal bits, "
    title += f"{report['avg_stored_bits']:.3f} stored bits per weight (average, file)"
    first = report["layers"][0]["name"] if report["layers"] else None
    rows = [{**e, "bits": e["bits"] if e["quantized"] else None, "first": e["name"] == first} for e in layers]
    return bits_chart(rows, path, title)


def inspect(target: str | Path) -> dict:
    """The size report of a packed file (from its header, without building the model) or of a run
    (encoded in memory exactly as ``mpq export`` would write it)."""
    path = Path(target)
    if path.is_dir():
        from ..export import pack_run
        from ..packing.format import serialized_size

        packed = pack_run(path)
        size = serialized_size(packed.header, packed.tensors)
        report = size_report({"format": FORMAT, **packed.header}, packed.tensor_bytes(), size)
        return {**report, "source": "run", "target": str(path)}
    if not path.exists():
        raise MpqError(f"{path} not found")
    packed_file = PackedHeader.open(path)
    report = size_report(
        packed_file.header, {n: t.nbytes for n, t in packed_file.tensors.items()}, packed_file.file_bytes
    )
    return {**report, "source": "file", "target": str(path)}
