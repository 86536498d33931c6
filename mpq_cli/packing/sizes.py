"""The size report of a packed file (what ``mpq inspect`` shows and a run's summary quotes): per-layer and total
bytes and stored bits, from the header and the tensors' sizes alone, so it needs no tensor data and no torch."""

from __future__ import annotations

import fnmatch

from ..errors import MpqError
from .header import FORMAT


def size_report(header: dict, tensor_bytes: dict[str, int], file_bytes: int) -> dict:
    """Per-layer sizes and totals of a packed file, from its header and tensor sizes.

    Args:
        header: the file's ``mpq`` header.
        tensor_bytes: bytes of every tensor in the file, by name.
        file_bytes: size of the whole file (header included).
    """
    layers = []
    weight_names = set()
    for entry in header["layers"]:
        name = entry["name"]
        prefix = f"{name}.weight."
        own = [t for t in tensor_bytes if t.startswith(prefix) or t == f"{name}.weight"]
        weight_names.update(own)
        nbytes = sum(tensor_bytes[t] for t in own)
        quantized = entry["encoding"] != "float32"
        # steps are one per layer or one per output channel in int and lut layers; other encodings have none
        granularity = entry.get("granularity", "tensor") if entry["encoding"] in ("int", "lut") else None
        layers.append(
            {
                "name": name,
                "kind": entry["kind"],
                "shape": entry["shape"],
                "params": entry["params"],
                "bits": entry["nominal_bits"] if quantized else 32,
                "quantized": quantized,
                "encoding": entry["encoding"],
                "granularity": granularity,
                "steps": (entry["shape"][0] if granularity == "channel" else 1) if granularity else 0,
                "stored_bits": 8 * nbytes / entry["params"],
                "bytes": nbytes,
                "act_bits": (entry.get("act") or {}).get("bits"),
            }
        )
    q = [row for row in layers if row["quantized"]]
    q_params = sum(row["params"] for row in q)
    weight_bytes = sum(row["bytes"] for row in layers)
    other_bytes = sum(b for t, b in tensor_bytes.items() if t not in weight_names)
    # an FP32 checkpoint of the same model: every layer weight at 4 bytes, the other tensors as they are
    fp32_bytes = 4 * sum(row["params"] for row in layers) + other_bytes
    for row in layers:
        row["share"] = row["bytes"] / file_bytes if file_bytes else 0.0
    source = header.get("source") or {}
    checkpoint_bytes = source.get("fp32_checkpoint_bytes")
    return {
        "format": header.get("format", FORMAT),
        "model": header["model"].get("name"),
        "method": header.get("method"),
        "avg_bits": sum(r["bits"] * r["params"] for r in q) / q_params if q_params else 0.0,
        "avg_stored_bits": 8 * sum(r["bytes"] for r in q) / q_params if q_params else 0.0,
        "quantized_params": q_params,
        "weight_bytes": weight_bytes,
        "other_bytes": other_bytes,
        "header_bytes": file_bytes - sum(tensor_bytes.values()) if file_bytes else None,
        "file_bytes": file_bytes,
        "fp32_bytes": fp32_bytes,
        "compression": fp32_bytes / file_bytes if file_bytes else None,
        "fp32_checkpoint_bytes": checkpoint_bytes,
        "compression_vs_checkpoint": checkpoint_bytes / file_bytes if checkpoint_bytes and file_bytes else None,
        "top1_at_export": source.get("top1"),
        "layers": layers,
    }


def select_layers(report: dict, pattern: str | None, sort: str) -> list[dict]:
    """The report's layers matching ``pattern`` (a glob), sorted by ``order`` (module order), ``size``, ``bits``
    or ``name``."""
    rows = [r for r in report["layers"] if pattern is None or fnmatch.fnmatchcase(r["name"], pattern)]
    if pattern is not None and not rows:
        raise MpqError(f"--layers {pattern!r} matches no layer")
    if sort == "size":
        rows.sort(key=lambda r: -r["bytes"])
    elif sort == "bits":
        rows.sort(key=lambda r: (-r["bits"], r["name"]))
    elif sort == "name":
        rows.sort(key=lambda r: r["name"])
    elif sort != "order":
        raise MpqError(f"--sort must be order, size, bits or name, got {sort!r}")
    return rows
