"""The per-layer weight encodings of the packed format, as pure encode/decode functions.

Every quantized layer is stored in exactly one encoding (``docs/format.md``):

``zero``
    Every weight is 0. No tensors, 0 bytes.
``int``
    Two's complement fields of ``width`` bits, shifted left by ``shift``, times a
    float32 ``step``: ``weight = float32(field << shift) * step``. Serves every method
    whose exact form is integer codes times a step (uniform, CSQ, BSQ, BMPQ). The step is
    one value for the layer, or (``"granularity": "channel"``, format 1.2) one per output
    channel, the weight's first axis.
``lut``
    ``width``-bit indices into an ascending int32 ``table`` of codes:
    ``weight = float32(table[index]) * step``, the step as in ``int``. Chosen when a layer uses few distinct
    codes spread over a wide range, e.g. CSQ with non-contiguous selected bits
    ``{0, 3}`` (codes in ``{0, +-1, +-7, +-8, +-9}``: 4-bit indices instead of 5-bit codes).
``basis``
    ALQ's binary bases: per group ``g`` (a row of the permuted weight) ``group_bits[g]``
    sign planes of 1 bit per weight and as many float32 coordinates
    (:mod:`mpq_cli.quant.basis`).

Integer codes get the smallest exact encoding among ``zero``, ``int`` and ``lut``
(:func:`plan_codes`). Decoding goes through :func:`~mpq_cli.quant.primitives.dequantize`
(or :func:`~mpq_cli.quant.basis.basis_weight`), the functions the quantized model itself
evaluates with, so decoded weights equal the evaluated ones bit for bit.

Decoders validate what they read and raise ``ValueError`` naming the problem; the
file reader adds the tensor's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..quant.basis import basis_weight, from_groups, plane_mask
from ..quant.bits import canonicalize_codes
from ..quant.primitives import dequantize
from .bitpack import (
    from_twos_complement,
    pack_bits,
    packed_nbytes,
    to_twos_complement,
    twos_complement_width,
    unpack_bits,
)
from .header import CODE_BITS, CODE_MAX, CODE_MIN, ENCODINGS, GRANULARITIES, MAX_PLANES, TENSORS  # noqa: F401


@dataclass
class EncodedWeight:
    """One layer's weight as the file stores it.

    Args:
        encoding: one of :data:`ENCODINGS`.
        fields: the encoding's header fields (``width``, ``shift``, ``groups`` ...).
        tensors: the encoding's tensors by suffix (``packed``, ``step`` ...), on the CPU.
    """

    encoding: str
    fields: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        """Bytes of this layer's tensors: packed bits, scales, tables."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class CodesPlan:
    """The smallest exact encoding of a layer's integer codes, before packing.

    ``width`` is the bits per weight of the packed part; ``extra_values`` the 4-byte
    values stored besides it (the ``steps``: one, or one per output channel; plus the table for ``lut``).
    """

    encoding: str
    width: int
    shift: int = 0
    table: torch.Tensor | None = None
    steps: int = 1

    @property
    def extra_values(self) -> int:
        if self.encoding == "zero":
            return 0
        return self.steps + (self.table.numel() if self.table is not None else 0)

    def payload_bytes(self, count: int) -> int:
        return packed_nbytes(count, self.width) + 4 * self.extra_values if self.width else 0


def _index_width(distinct: int) -> int:
    return max(1, math.ceil(math.log2(distinct)))


def plan_codes(codes: torch.Tensor, steps: int = 1) -> CodesPlan:
    """Choose ``zero``, ``int`` or ``lut`` for ``codes`` with ``steps`` float32 steps (1, or one per output
    channel): the fewest bytes, ties to ``int``."""
    reduced, shift, magnitude_bits = canonicalize_codes(codes.detach().cpu())
    if magnitude_bits == 0:
        return CodesPlan("zero", 0)
    flat = reduced.reshape(-1).numpy()
    lowest, highest = int(flat.min()), int(flat.max())
    as_int = CodesPlan("int", twos_complement_width(lowest, highest), shift, steps=steps)
    if as_int.width <= 2:  # a table of up to 4 codes cannot beat fields of 2 bits
        return as_int
    # distinct codes by counting over their (at most 2**17-wide) range: linear time, no sort
    counts = np.bincount(flat - lowest, minlength=highest - lowest + 1)
    table = (torch.from_numpy(np.flatnonzero(counts)) + lowest) << shift  # ascending
    as_lut = CodesPlan("lut", _index_width(table.numel()), 0, table.to(torch.int32), steps)
    count = codes.numel()
    return as_lut if as_lut.payload_bytes(count) < as_int.payload_bytes(count) else as_int


def encode_codes(codes: torch.Tensor, step: torch.Tensor | float) -> EncodedWeight:
    """Encode a layer whose exact weight is ``dequantize(codes, step)``.

    Args:
        codes: integer codes (any shape) within ``[CODE_MIN, CODE_MAX]``.
        step: float32, 0-d (one step for the layer) or ``(C,)`` with ``C = codes.shape[0]`` (one per output
            channel: the layer is written with ``"granularity": "channel"``).
    """
    codes = codes.detach().cpu().to(torch.int64)
    flat = codes.reshape(-1).numpy()
    if flat.size and (int(flat.min()) < CODE_MIN or int(flat.max()) > CODE_MAX):
        raise ValueError(f"codes exceed the {CODE_BITS}-bit range of the format")
    step = torch.as_tensor(step, dtype=torch.float32).detach().cpu()
    per_channel = step.dim() == 1
    if per_channel and not (codes.dim() >= 1 and step.numel() == codes.shape[0]):
        raise ValueError(f"{step.numel()} steps for codes of shape {list(codes.shape)}: one per output channel needed")
    if step.dim() > 1:
        raise ValueError(f"step must be 0-d or one per output channel (1-d), got shape {list(step.shape)}")
    plan = plan_codes(codes, step.numel())
    # per tensor: the fields and tensors of format 1.1, so such a layer is stored exactly as before
    granularity = {"granularity": "channel"} if per_channel else {}
    if plan.encoding == "zero":
        return EncodedWeight("zero")
    if plan.encoding == "int":
        fields_ = to_twos_complement(flat >> plan.shift, plan.width)
        return EncodedWeight(
            "int",
            {"width": plan.width, "shift": plan.shift, **granularity},
            {"packed": torch.from_numpy(pack_bits(fields_, plan.width)), "step": step.clone()},
        )
    indices = np.searchsorted(plan.table.numpy().astype(np.int64), flat)
    return EncodedWeight(
        "lut",
        {"width": plan.width, **granularity},
        {"packed": torch.from_numpy(pack_bits(indices, plan.width)), "table": plan.table.clone(), "step": step.clone()},
    )


def encode_basis(
    signs: torch.Tensor, coords: torch.Tensor, group_bits: torch.Tensor, perm: tuple[int, ...]
) -> EncodedWeight:
    """Encode binary bases (:mod:`mpq_cli.quant.basis`).

    Args:
        signs: ``(G, P, E)`` bool (True = +1).
        coords: ``(G, P)`` float32.
        group_bits: ``(G,)`` bases used per group, each ``<= P``.
        perm: the weight permutation that makes groups rows.

    Bit order of ``packed``: group by group, within a group plane by plane (``i``
    ascending, only ``i < group_bits[g]``), within a plane the group's ``E`` elements;
    a bit is 1 for +1. ``coords`` holds the used coordinates in the same order.
    """
    signs, coords, group_bits = signs.detach().cpu(), coords.detach().cpu(), group_bits.detach().cpu()
    groups, planes, elements = signs.shape
    if int(group_bits.max()) > min(planes, MAX_PLANES):
        raise ValueError(f"group_bits exceed the {min(planes, MAX_PLANES)} planes")
    used = plane_mask(group_bits, planes)  # (G, P)
    if not bool(used.any()):
        return EncodedWeight("zero")
    bits = signs[used].reshape(-1).to(torch.uint8).numpy()  # rows (g, i) in g-major order, E bits each
    return EncodedWeight(
        "basis",
        {"groups": groups, "group_size": elements, "perm": list(perm), "max_planes": int(group_bits.max())},
        {
            "packed": torch.from_numpy(pack_bits(bits, 1)),
            "coords": coords[used].to(torch.float32).contiguous(),
            "group_bits": group_bits.to(torch.uint8).contiguous(),
        },
    )


# ------------------------------------------------------------------------------------ decoding
def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _int_field(fields: dict, key: str, low: int, high: int) -> int:
    value = fields.get(key)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
        f"header field {key!r} must be an integer in {low}..{high}, got {value!r}",
    )
    return value


def _step(fields: dict, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The layer's step: 0-d, or ``(C,)`` for ``"granularity": "channel"`` (``C = shape[0]``)."""
    granularity, step = fields.get("granularity", "tensor"), tensors["step"]
    _require(
        isinstance(granularity, str) and granularity in GRANULARITIES,
        f"unknown granularity {str(granularity)[:40]!r} (known: {', '.join(GRANULARITIES)})",
    )
    if granularity == "channel":
        channels = shape[0] if shape else 0
        _require(
            step.dtype == torch.float32 and step.dim() == 1 and step.numel() == channels,
            f"step must be {channels} float32 values, one per output channel, got {step.dtype} {list(step.shape)}",
        )
        _require(bool(torch.isfinite(step).all()), "every step must be finite")
        return step
    _require(step.dtype == torch.float32 and step.numel() == 1, "step must be one float32 value")
    _require(bool(torch.isfinite(step).all()), f"step must be finite, got {float(step)}")
    return step.reshape(())


def _packed(tensors: dict[str, torch.Tensor], count: int, width: int) -> np.ndarray:
    packed = tensors["packed"]
    _require(packed.dtype == torch.uint8 and packed.dim() == 1, "packed must be a 1-d uint8 tensor")
    expected = packed_nbytes(count, width)
    _require(
        packed.numel() == expected,
        f"packed holds {packed.numel()} bytes; {count} weights at {width} bits need {expected}",
    )
    return unpack_bits(packed.numpy(), width, count)


def check_tensors(encoding: str, tensors: dict[str, torch.Tensor]) -> None:
    _require(encoding in ENCODINGS, f"unknown encoding {encoding!r}")
    missing = [s for s in TENSORS[encoding] if s not in tensors]
    _require(not missing, f"missing tensor(s) {', '.join(missing)} for encoding {encoding!r}")
    extra = [s for s in tensors if s not in TENSORS[encoding]]
    _require(not extra, f"unexpected tensor(s) {', '.join(extra)} for encoding {encoding!r}")


def decode_codes(
    encoding: str, fields: dict, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ``(codes, step)`` of an integer encoding; ``codes`` is int32 of ``shape``, ``step`` 0-d, or ``(C,)``
    (one per output channel) for ``"granularity": "channel"``."""
    check_tensors(encoding, tensors)
    count = math.prod(shape)
    if encoding == "zero":
        return torch.zeros(shape, dtype=torch.int32), torch.zeros((), dtype=torch.float32)
    if encoding == "int":
        width = _int_field(fields, "width", 1, CODE_BITS)
        shift = _int_field(fields, "shift", 0, CODE_BITS - 1)
        _require(width + shift <= CODE_BITS, f"width {width} + shift {shift} exceed the {CODE_BITS}-bit code range")
        codes = from_twos_complement(_packed(tensors, count, width), width) << shift
        return torch.from_numpy(codes.astype(np.int32)).reshape(shape), _step(fields, tensors, shape)
    if encoding == "lut":
        width = _int_field(fields, "width", 1, CODE_BITS)
        table = tensors["table"]
        _require(
            table.dtype == torch.int32 and table.dim() == 1 and 1 <= table.numel() <= (1 << width),
            f"table must be 1..{1 << width} int32 codes",
        )
        _require(bool((table[1:] > table[:-1]).all()), "table must be strictly ascending")
        _require(
            int(table.min()) >= CODE_MIN and int(table.max()) <= CODE_MAX,
            f"table codes exceed the {CODE_BITS}-bit range",
        )
        indices = _packed(tensors, count, width)
        _require(
            count == 0 or int(indices.max()) < table.numel(), f"an index exceeds the table's {table.numel()} entries"
        )
        return table[torch.from_numpy(indices)].reshape(shape), _step(fields, tensors, shape)
    raise ValueError(f"encoding {encoding!r} does not hold integer codes")


def decode_weight(
    encoding: str, fields: dict, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]
) -> torch.Tensor:
    """The float32 weight of ``shape`` that an encoded layer holds."""
    check_tensors(encoding, tensors)
    if encoding == "zero":
        return torch.zeros(shape, dtype=torch.float32)
    if encoding != "basis":
        codes, step = decode_codes(encoding, fields, tensors, shape)
        return dequantize(codes, step)
    count = math.prod(shape)
    groups = _int_field(fields, "groups", 1, max(count, 1))
    elements = _int_field(fields, "group_size", 1, max(count, 1))
    _require(groups * elements == count, f"groups {groups} x group_size {elements} != {count} weights")
    perm = fields.get("perm")
    _require(
        isinstance(perm, list) and sorted(perm) == list(range(len(shape))),
        f"perm must be a permutation of the {len(shape)} weight dimensions, got {perm!r}",
    )
    planes = _int_field(fields, "max_planes", 1, MAX_PLANES)
    group_bits, coords = tensors["group_bits"], tensors["coords"]
    _require(group_bits.dtype == torch.uint8 and group_bits.shape == (groups,), f"group_bits must be uint8 ({groups},)")
    _require(int(group_bits.max()) <= planes, f"group_bits exceed max_planes {planes}")
    used_planes = int(group_bits.to(torch.int64).sum())
    _require(
        coords.dtype == torch.float32 and coords.shape == (used_planes,),
        f"coords must be float32 ({used_planes},), the sum of group_bits",
    )
    _require(bool(torch.isfinite(coords).all()), "coords must be finite")
    bits = _packed(tensors, used_planes * elements, 1)
    used = plane_mask(group_bits, planes)
    signs = torch.zeros(groups, planes, elements, dtype=torch.bool)
    signs[used] = torch.from_numpy(bits.astype(bool)).reshape(used_planes, elements)
    dense_coords = torch.zeros(groups, planes, dtype=torch.float32)
    dense_coords[used] = coords
    rows = basis_weight(signs, dense_coords, group_bits)
    return from_groups(rows, tuple(shape), tuple(perm))
