"""The bit table: which layer has how many bits, and the size statistics every report uses.

Two counts per layer, always reported side by side:

- ``bits``: nominal magnitude bits as the method's paper counts them (sign excluded);
- ``stored_bits``: bits per weight of the packed encoding ``mpq export`` chooses for
  the exact integer codes (:func:`mpq_cli.packing.encodings.plan_codes`): for ``int``
  the two's complement width after removing a common power-of-two factor (magnitude
  bits + 1 sign bit for sign-magnitude codes), for ``lut`` the index width, 0 for an
  all-zero layer. CSQ codes whose selected bits are not contiguous can cost more
  than their nominal count; this number says so. For ALQ's binary bases it is the
  sign bits per weight (one per basis), and the coordinates (``scales``) and the
  per-group bit widths (``index_bytes``) are counted beside it.

Sizes here are computed from the codes (``estimated``: bytes rounded per layer are
not counted); ``mpq export`` and ``mpq inspect`` give the exact sizes of the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MpqError

FP32_BITS = 32

# How each shipped method counts its nominal bits (its paper's convention). The methods take theirs from here
# (``Method.bits_convention``), so a report can name it without importing the methods (and torch).
SIGN_EXCLUDED = "magnitude bits, sign excluded"
BITS_CONVENTIONS = {
    "alq": "binary bases per weight, averaged over each layer's groups",
    "bmpq": "two's complement width, sign included",
    "bsq": SIGN_EXCLUDED,
    "csq": SIGN_EXCLUDED,
    "uniform": SIGN_EXCLUDED,
}
SIGN_INCLUDED = frozenset({"bmpq"})  # the methods whose nominal bits count the sign (two's complement width)


@dataclass
class LayerEntry:
    """One Conv2d/Linear layer of a scheme.

    Args:
        name: module name in the model.
        kind: ``conv2d`` or ``linear``.
        shape: weight shape.
        params: weights in the layer.
        bits: nominal bits as the method counts them (``None``: kept in FP32); a fraction
            for ALQ (bases per weight, averaged over the layer).
        stored_bits: bits per weight of the exact codes, sign included (``None``: FP32).
        scales: 4-byte values stored besides the packed codes (the steps, one or one per output
            channel; a ``lut`` table; ALQ's coordinates).
        act_bits: bits of the layer's quantized input (``None``: FP activations).
        index_bytes: further bytes of the encoding (ALQ: one byte of bit width per group).
    """

    name: str
    kind: str
    shape: list[int]
    params: int
    bits: int | float | None
    stored_bits: int | float | None = None
    scales: int = 1
    act_bits: int | None = None
    index_bytes: int = 0

    @property
    def is_fp(self) -> bool:
        return self.bits is None

    @property
    def weight_bytes(self) -> float:
        """Bytes of this layer's weights as stored: packed codes plus FP32 scales."""
        if self.is_fp:
            return self.params * 4
        if not self.stored_bits:
            return 0.0
        return self.params * self.stored_bits / 8 + 4 * self.scales + self.index_bytes


@dataclass
class Scheme:
    """A mixed-precision scheme with its size statistics.

    Args:
        method: the method that produced it.
        layers: one entry per Conv2d/Linear, in module order.
        other_params: values kept in FP32 outside the layers' weights (biases, BatchNorm
            parameters and buffers, activation clips).
    """

    method: str
    layers: list[LayerEntry] = field(default_factory=list)
    other_params: int = 0
    version: int = 1

    @property
    def quantized(self) -> list[LayerEntry]:
        return [entry for entry in self.layers if not entry.is_fp]

    @property
    def quantized_params(self) -> int:
        return sum(entry.params for entry in self.quantized)

    @property
    def avg_bits(self) -> float:
        """Nominal bits averaged over quantized weights, weighted by parameters (the papers' number)."""
        n = self.quantized_params
        return sum(e.bits * e.params for e in self.quantized) / n if n else 0.0

    @property
    def avg_stored_bits(self) -> float:
        """Stored bits (sign included) averaged over quantized weights, weighted by parameters."""
        n = self.quantized_params
        return sum(e.stored_bits * e.params for e in self.quantized) / n if n else 0.0

    @property
    def weight_compression(self) -> float:
        """FP32 bits over nominal bits of the quantized weights (the papers' Comp(x))."""
        return FP32_BITS / self.avg_bits if self.avg_bits else float("inf")

    @property
    def fp32_bytes(self) -> int:
        return 4 * (sum(e.params for e in self.layers) + self.other_params)

    @property
    def model_bytes(self) -> float:
        """Whole model: stored weight codes and scales, FP32 layers, FP32 everything else."""
        return sum(e.weight_bytes for e in self.layers) + 4 * self.other_params

    @property
    def model_compression(self) -> float:
        return self.fp32_bytes / self.model_bytes if self.model_bytes else float("inf")

    def summary(self) -> dict:
        return {
            "avg_bits": self.avg_bits,
            "avg_stored_bits": self.avg_stored_bits,
            "weight_compression": self.weight_compression,
            "model_bytes_estimated": self.model_bytes,
            "fp32_bytes": self.fp32_bytes,
            "model_compression_estimated": self.model_compression,
            "quantized_params": self.quantized_params,
        }

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "method": self.method,
            "other_params": self.other_params,
            "layers": [asdict(e) for e in self.layers],
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scheme:
        try:
            return cls(
                method=d["method"],
                layers=[LayerEntry(**e) for e in d["layers"]],
                other_params=int(d.get("other_params", 0)),
                version=int(d.get("version", 1)),
            )
        except (KeyError, TypeError) as exc:
            raise MpqError(f"malformed scheme: {exc}") from None

    def save(self, path: Path) -> None:
        from .rundir import dumps, write_text_atomic

        write_text_atomic(path, dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Scheme:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable, not JSON, or not a scheme
            raise MpqError(f"cannot read scheme {path}: {exc.__class__.__name__}: {exc}") from None

    @classmethod
    def load_from(cls, source: str | Path) -> Scheme:
        """The scheme of a run directory (its ``scheme.json``) or of a ``scheme.json`` file."""
        path = Path(source)
        if path.is_dir():
            path = path / "scheme.json"
        if not path.is_file():
            raise MpqError(f"--scheme {source}: no scheme.json (give a finished search run or its scheme.json)")
        return cls.load(path)

    def transplanted_bits(self, into: str) -> dict[str, int | None]:
        """Each layer's bits for method ``into`` to train under (``None``: FP32), as ``into`` counts them: a
        scheme of BMPQ (two's complement width, sign included) gives uniform or CSQ one bit fewer, and the
        other way round, so both store the same fields. ALQ's bases per weight have no integer width."""
        if "alq" in (self.method, into):
            raise MpqError(
                "--scheme: ALQ counts binary bases per weight, not an integer width: its schemes cannot be "
                "transplanted, nor another method's into ALQ"
            )
        shift = int(self.method in SIGN_INCLUDED) - int(into in SIGN_INCLUDED)
        out = {}
        for e in self.layers:
            if e.bits is not None and not float(e.bits).is_integer():
                raise MpqError(f"--scheme: layer {e.name} has {e.bits} bits, not a whole number")
            out[e.name] = None if e.bits is None else max(int(e.bits) - shift, 0) if e.bits else 0
        return out
