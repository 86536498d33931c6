"""A packed file's header and tensor index, read and validated without reading tensor data or importing torch
(``mpq inspect FILE`` needs nothing more): the format's vocabulary (versions, encodings and the tensors each
stores, tensor names), the safetensors index, and :class:`PackedHeader`. :mod:`.format` reads, writes and decodes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import MpqError
from .bitpack import packed_nbytes

# Codes of any method fit a 17-bit two's complement number: 16 magnitude bits and a sign.
CODE_BITS = 17
CODE_MIN, CODE_MAX = -(1 << (CODE_BITS - 1)), (1 << (CODE_BITS - 1)) - 1
MAX_PLANES = 16
ENCODINGS = ("zero", "int", "lut", "basis")
# tensors each encoding stores, by suffix (the file names them LAYER.weight.SUFFIX)
TENSORS = {
    "zero": (),
    "int": ("packed", "step"),
    "lut": ("packed", "table", "step"),
    "basis": ("packed", "coords", "group_bits"),
}


# Steps: one float32 for the layer (``tensor``), or one per output channel, the weight's first axis (``channel``).
GRANULARITIES = ("tensor", "channel")

FORMAT = "mpq.packed/1.2"
# oldest first: 1.1 adds the digests (1 files carry none); 1.2 adds an int/lut layer's "granularity"
READABLE_FORMATS = ("mpq.packed/1", "mpq.packed/1.1", FORMAT)
GRANULARITY_SINCE = "mpq.packed/1.2"
METADATA_KEY = "mpq"
DIGEST_KEY = "mpq.sha256"  # metadata key: SHA-256 of the `mpq` header string's UTF-8 bytes
_MAX_HEADER = 100 << 20
# A packed file stores at least about one bit per weight, so its model takes at most ~32x the
# file in float32; a file whose model would take more than this (an edited header with huge
# layers of the 'zero' encoding, which hold no tensors) is refused before anything is allocated.
MAX_MODEL_BYTES = 1 << 30
MAX_EXPANSION = 64
_ITEMSIZE = {"U8": 1, "I8": 1, "BOOL": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def weight_tensor_name(layer: str, suffix: str) -> str:
    return f"{layer}.weight.{suffix}"


def act_tensor_name(layer: str) -> str:
    return f"{layer}.input_quant.alpha"


def act_tensor_names(layer: str, act: dict) -> list[str]:
    """The tensors a layer's input quantizer keeps in the file: PACT's clip, or ALQ's
    ``gamma`` and ``x_ref`` (``"kind": "basis"``)."""
    if act.get("kind") == "basis":
        return [f"{layer}.input_quant.gamma", f"{layer}.input_quant.x_ref"]
    return [act_tensor_name(layer)]


def _valid_act(act) -> bool:
    if not isinstance(act, dict) or isinstance(act.get("bits"), bool) or not isinstance(act.get("bits"), int):
        return False
    if act.get("kind") == "basis":
        return 1 <= act["bits"] <= 8 and set(act) == {"kind", "bits"}
    return (
        1 <= act["bits"] <= 16
        and isinstance(act.get("signed"), bool)
        and set(act) <= {"kind", "bits", "signed"}
        and act.get("kind", "pact") == "pact"
    )


def read_safetensors_index(path: Path) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
    """``(metadata, tensors, file_bytes)`` from a safetensors header, without reading tensor data.

    Checks that the header parses, that every tensor's byte range lies inside the file
    and matches its dtype and shape: a truncated file or a pickle is refused here.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MpqError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise MpqError(
                    f"{path}: not a safetensors file (header length {header_len} does not fit the "
                    f"{size}-byte file; truncated, or a pickle/other format)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise MpqError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MpqError(f"{path}: not a safetensors file (its header is not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MpqError(f"{path}: safetensors metadata must map strings to strings")
    data_bytes = size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if dtype not in _ITEMSIZE or any((not isinstance(d, int)) or d < 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise MpqError(f"{path}: tensor {name!r} has a malformed safetensors entry") from None
        if not isinstance(name, str) or not name or len(name) > 1000:
            raise MpqError(f"{path}: a tensor has a malformed name")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_bytes):
            raise MpqError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
        if end - start != nbytes:
            raise MpqError(f"{path}: tensor {name!r} holds {end - start} bytes; {dtype} {list(shape)} needs {nbytes}")
        tensors[name] = TensorInfo(dtype, shape, nbytes)
    return metadata, tensors, size


@dataclass
class PackedHeader:
    """An opened, validated packed file's header and tensor index; :class:`~mpq_cli.packing.format.PackedFile`
    reads its tensors."""

    path: Path
    header: dict
    tensors: dict[str, TensorInfo]
    file_bytes: int
    verify: bool = True  # check each tensor read against its digest (the header's digest is always checked)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> PackedHeader:
        path = Path(path)
        if not path.is_file():
            raise MpqError(f"{path} not found" if not path.exists() else f"{path} is not a file")
        metadata, tensors, size = read_safetensors_index(path)
        if METADATA_KEY not in metadata:
            raise MpqError(
                f"{path} is a safetensors file but not an mpq packed file (no 'mpq' header); "
                "`mpq export RUN` writes one"
            )
        try:
            header = json.loads(metadata[METADATA_KEY], parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            raise MpqError(f"{path}: the 'mpq' header is not valid JSON") from None
        if not isinstance(header, dict):
            raise MpqError(f"{path}: the 'mpq' header must be a JSON object")
        packed = cls(path, header, tensors, size, verify)
        packed._check_header_digest(metadata)
        packed.validate()
        return packed

    # -- integrity ------------------------------------------------------------------------------
    @property
    def has_digests(self) -> bool:
        return self.header.get("format") != "mpq.packed/1"

    def _check_header_digest(self, metadata: dict[str, str]) -> None:
        if not self.has_digests:
            return
        expected = metadata.get(DIGEST_KEY)
        if expected is None:
            self._fail(f"format {self.header.get('format')!r} needs the {DIGEST_KEY!r} metadata digest; it is missing")
        if _sha256(metadata[METADATA_KEY].encode("utf-8")) != expected:
            self._fail("the 'mpq' header does not match its SHA-256 digest: the file is corrupt or was edited")
        digests = self.header.get("digests")
        if not (
            isinstance(digests, dict)
            and digests.get("algorithm") == "sha256"
            and isinstance(digests.get("tensors"), dict)
        ):
            self._fail("header 'digests' must be {'algorithm': 'sha256', 'tensors': {name: hex}}")
        listed = digests["tensors"]
        if set(listed) != set(self.tensors):
            odd = sorted(set(listed) ^ set(self.tensors))
            self._fail(f"the header's digests and the file's tensors differ (e.g. {odd[0]!r})")

    # -- validation of the header against the tensor index (no tensor data read) ---------------
    def _fail(self, message: str) -> None:
        raise MpqError(f"{self.path}: {message}")

    def validate(self) -> None:
        version = self.header.get("format")
        if version not in READABLE_FORMATS:
            self._fail(f"unsupported format {str(version)[:40]!r}; this mpq reads {', '.join(READABLE_FORMATS)}")
        for key in ("model", "layers"):
            if key not in self.header:
                self._fail(f"header has no {key!r}")
        layers = self.header["layers"]
        if not isinstance(layers, list) or not layers:
            self._fail("header 'layers' must be a non-empty list")
        seen = set()
        claimed = set()
        for entry in layers:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                self._fail("every header layer needs a 'name'")
            name = entry["name"]
            if name in seen:
                self._fail(f"layer {name!r} appears twice in the header")
            seen.add(name)
            shape = entry.get("shape")
            if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
                self._fail(f"layer {name!r}: shape must be a list of positive integers, got {shape!r}")
            if entry.get("params") != math.prod(shape):
                self._fail(f"layer {name!r}: params {entry.get('params')!r} != product of shape {shape}")
            bits = entry.get("nominal_bits")
            encoding = entry.get("encoding")
            if "granularity" in entry:
                self._check_granularity(entry)
            if encoding == "float32":
                info = self.tensors.get(f"{name}.weight")
                if info is None:
                    self._fail(f"layer {name!r}: tensor {name}.weight is missing")
                if info.dtype != "F32" or list(info.shape) != shape:
                    self._fail(
                        f"tensor {name}.weight: {info.dtype} {list(info.shape)} does not match the header (F32 {shape})"
                    )
                claimed.add(f"{name}.weight")
                continue
            if not isinstance(encoding, str) or encoding not in TENSORS:
                self._fail(f"layer {name!r}: unknown encoding {str(encoding)[:40]!r}")
            # ALQ counts bases per weight averaged over a layer: a fraction
            allowed = (int, float) if encoding in ("basis", "zero") else int
            if not (isinstance(bits, allowed) and not isinstance(bits, bool) and 0 <= bits <= 16):
                kind = "a number" if encoding in ("basis", "zero") else "an integer"
                self._fail(f"layer {name!r}: nominal_bits must be {kind} in 0..16, got {bits!r}")
            for suffix in TENSORS[encoding]:
                tensor = weight_tensor_name(name, suffix)
                if tensor not in self.tensors:
                    self._fail(f"tensor {tensor} is missing (layer {name!r}, encoding {encoding})")
                claimed.add(tensor)
            self._check_sizes(entry)
            act = entry.get("act")
            if act is not None:
                if not _valid_act(act):
                    self._fail(
                        f"layer {name!r}: act must be {{'bits': 1..16, 'signed': bool}} or "
                        f"{{'kind': 'basis', 'bits': 1..8}}, got {act!r}"
                    )
                for tensor in act_tensor_names(name, act):
                    if tensor not in self.tensors:
                        self._fail(f"tensor {tensor} is missing (layer {name!r} quantizes its input)")
        stray = [t for t in self.tensors if ".weight." in t and t not in claimed]
        if stray:
            self._fail(f"tensor {stray[0]} belongs to no layer in the header")

    def _check_granularity(self, entry: dict) -> None:
        """A layer's ``granularity``: a 1.2 field of ``int`` and ``lut`` layers, ``tensor`` or ``channel``."""
        name, version, granularity = entry["name"], self.header["format"], entry["granularity"]
        if READABLE_FORMATS.index(version) < READABLE_FORMATS.index(GRANULARITY_SINCE):
            self._fail(f"layer {name!r}: 'granularity' is a field of format {GRANULARITY_SINCE}, not of {version}")
        if entry.get("encoding") not in ("int", "lut"):
            self._fail(f"layer {name!r}: only int and lut layers have a granularity")
        if not isinstance(granularity, str) or granularity not in GRANULARITIES:
            self._fail(
                f"layer {name!r}: unknown granularity {str(granularity)[:40]!r} (known: {', '.join(GRANULARITIES)})"
            )

    def _check_sizes(self, entry: dict) -> None:
        """dtypes, shapes and byte counts that the header implies, checked against the index."""
        name, encoding, params = entry["name"], entry["encoding"], entry["params"]

        def info(suffix, dtype, ndims=(1,)):
            tensor = weight_tensor_name(name, suffix)
            found = self.tensors[tensor]
            if found.dtype != dtype or len(found.shape) not in ndims:
                self._fail(
                    f"tensor {tensor} must be {dtype} with {' or '.join(map(str, ndims))} dimension(s), "
                    f"got {found.dtype} {list(found.shape)}"
                )
            return tensor, found

        if encoding in ("int", "lut"):
            width = entry.get("width")
            if not (isinstance(width, int) and 1 <= width <= CODE_BITS):
                self._fail(f"layer {name!r}: width must be an integer in 1..{CODE_BITS}, got {width!r}")
            tensor, packed = info("packed", "U8")
            if packed.nbytes != packed_nbytes(params, width):
                self._fail(
                    f"tensor {tensor} holds {packed.nbytes} bytes; {params} weights at {width} bits need "
                    f"{packed_nbytes(params, width)}"
                )
            if entry.get("granularity") == "channel":  # one step per output channel, the weight's first axis
                step_name, step = info("step", "F32")
                if step.shape[0] != entry["shape"][0]:
                    self._fail(
                        f"tensor {step_name} holds {step.shape[0]} steps; layer {name!r} has "
                        f"{entry['shape'][0]} output channels (granularity 'channel')"
                    )
            else:
                step_name, step = info("step", "F32", (0, 1))
                if math.prod(step.shape) != 1:
                    self._fail(f"tensor {step_name} must hold one value")
            if encoding == "lut":
                info("table", "I32")
        elif encoding == "basis":
            tensor, packed = info("packed", "U8")
            _, coords = info("coords", "F32")
            group_size = entry.get("group_size")
            if not (isinstance(group_size, int) and group_size > 0):
                self._fail(f"layer {name!r}: group_size must be a positive integer, got {group_size!r}")
            expected = packed_nbytes(coords.shape[0] * group_size, 1)
            if packed.nbytes != expected:
                self._fail(
                    f"tensor {tensor} holds {packed.nbytes} bytes; {coords.shape[0]} bases of {group_size} "
                    f"weights need {expected}"
                )
            info("group_bits", "U8")

    # -- reading ------------------------------------------------------------------------------
    @property
    def layers(self) -> list[dict]:
        return self.header["layers"]

    def layer(self, name: str) -> dict:
        for entry in self.layers:
            if entry["name"] == name:
                return entry
        raise MpqError(f"{self.path}: no layer {name!r} (layers: {', '.join(e['name'] for e in self.layers[:5])}, ...)")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()
