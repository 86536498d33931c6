"""The packed file ``mpq.packed/1.1``: write, read, validate, decode, load (``docs/format.md``).

A packed file is a safetensors file. Its ``__metadata__`` holds ``"format": "pt"`` and
``"mpq"``: a JSON header with the format version, the model spec, the data it was
evaluated on, and one entry per Conv2d/Linear layer (encoding, shape, bits). Quantized
weights are stored as ``LAYER.weight.SUFFIX`` tensors of their encoding
(:mod:`.encodings`); every other tensor of the model (biases, BatchNorm, FP32 layers)
under its own state-dict name; activation clips as ``LAYER.input_quant.alpha`` (ALQ's
activation levels as ``LAYER.input_quant.gamma`` and ``LAYER.input_quant.x_ref``).

Reading never unpickles anything and never imports code: the safetensors header is
parsed and checked here before any tensor is read, the model is rebuilt only from
built-in and torchvision architectures (a user factory only when the caller passes it),
and every failure becomes one :class:`MpqError` that names the file, the tensor and the
problem.

Integrity (format 1.1): the ``mpq`` header lists a SHA-256 digest of every tensor's bytes,
and the metadata key ``mpq.sha256`` holds the digest of the ``mpq`` header string itself.
Opening a file checks the header digest; every tensor read is checked against its digest.
Files of format 1 (no digests) are still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import MpqError
from ..models import build_model
from ..models.loading import recorded_model, with_aliases
from .bitpack import packed_nbytes
from .encodings import CODE_BITS, TENSORS, EncodedWeight, decode_weight

FORMAT = "mpq.packed/1.1"
READABLE_FORMATS = ("mpq.packed/1", FORMAT)  # 1.1 adds the digests; 1 files carry none
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
class PackedFile:
    """An opened, validated packed file: its header and tensor index (data is read on demand)."""

    path: Path
    header: dict
    tensors: dict[str, TensorInfo]
    file_bytes: int
    verify: bool = True  # check each tensor read against its digest (the header's digest is always checked)
    _cache: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> PackedFile:
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

    def read_all(self) -> None:
        """Read and verify every tensor once; later reads come from memory (``load_packed`` needs them all,
        and a corrupt file is then refused before any model is built)."""
        self._cache = self.read_tensors(list(self.tensors))

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        if self._cache is not None:
            return {n: self._cache[n] for n in names}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                out = {n: f.get_tensor(n) for n in names}
        except Exception as exc:  # the library's own checks (e.g. a file changed since it was opened)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise MpqError(f"{self.path}: cannot read tensors ({exc.__class__.__name__}: {first})") from None
        self._verify_all(out)
        for name, tensor in out.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                self._fail(f"tensor {name} holds NaN or infinite values")
        return out

    def _verify_all(self, tensors: dict[str, torch.Tensor]) -> None:
        if not (self.has_digests and self.verify):
            return
        for name, tensor in tensors.items():
            if _tensor_sha256(tensor) != self.header["digests"]["tensors"][name]:
                self._fail(f"tensor {name} does not match its SHA-256 digest: the file is corrupt")

    def decode_layer(self, name: str) -> torch.Tensor:
        """The float32 weight of layer ``name``, exactly as the quantized model evaluated it."""
        entry = self.layer(name)
        if entry["encoding"] == "float32":
            return self.read_tensors([f"{name}.weight"])[f"{name}.weight"]
        suffixes = TENSORS[entry["encoding"]]
        tensors = self.read_tensors([weight_tensor_name(name, s) for s in suffixes])
        by_suffix = {s: tensors[weight_tensor_name(name, s)] for s in suffixes}
        try:
            return decode_weight(entry["encoding"], entry, by_suffix, tuple(entry["shape"]))
        except ValueError as exc:
            raise MpqError(f"{self.path}: layer {name!r}: {exc}") from None


def decode_layer(path: str | Path, name: str) -> torch.Tensor:
    """Decode one layer's float32 weight from a packed file (public API)."""
    return PackedFile.open(path).decode_layer(name)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as safetensors stores them (little-endian, row-major)."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return _sha256(raw.numpy().data)


def packed_metadata(header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata of a packed file: the ``mpq`` header with every tensor's digest,
    and the header's own digest."""
    from ..rundir import dumps

    full = {
        "format": FORMAT,
        **header,
        "digests": {"algorithm": "sha256", "tensors": {n: _tensor_sha256(t) for n, t in sorted(tensors.items())}},
    }
    text = dumps(full, separators=(",", ":"))
    return {METADATA_KEY: text, DIGEST_KEY: _sha256(text.encode("utf-8"))}


def write_packed(path: Path, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write the file atomically (a temporary file renamed into place)."""
    from ..rundir import save_safetensors

    save_safetensors(path, tensors, packed_metadata(header, tensors))


def serialized_size(header: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the file would take, measured by serialising it in memory."""
    from safetensors.torch import save

    metadata = {"format": "pt", **packed_metadata(header, tensors)}
    return len(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def layer_entry(
    name: str,
    kind: str,
    shape: list[int],
    nominal_bits: int | float | None,
    encoded: EncodedWeight | None,
    act: dict | None,
) -> dict:
    """One header layer; ``encoded`` None means an FP32 weight."""
    entry = {"name": name, "kind": kind, "shape": list(shape), "params": math.prod(shape)}
    if encoded is None:
        entry.update(encoding="float32", nominal_bits=None)
    else:
        entry.update(encoding=encoded.encoding, nominal_bits=nominal_bits, **encoded.fields)
    if act is not None:
        entry["act"] = act
    return entry


# ------------------------------------------------------------------------------------ loading
def _attach_input_quantizer(layer: nn.Module, act_entry: dict) -> None:
    """Quantize ``layer``'s input as the run did, keeping the model's structure and names."""
    from ..quant.act import PACT, BasisActivation

    if act_entry.get("kind") == "basis":
        act = BasisActivation(act_entry["bits"])
    else:
        act = PACT(act_entry["bits"])
        act.set_host("signed", bool(act_entry["signed"]))
    act.set_host("initialised", True)
    layer.input_quant = act
    layer.register_forward_pre_hook(lambda module, args: (module.input_quant(args[0]), *args[1:]))


def load_packed(
    path: str | Path, device: str | torch.device = "cpu", *, model: str | None = None, verify: bool = True
) -> nn.Module:
    """Build the model a packed file describes, with its decoded weights, in eval mode.

    No pickle is involved and no code the file names is run: the architecture comes from
    the header's model spec when it names a built-in or torchvision model; a file made
    with a user factory needs ``model`` (``package.module:fn`` or ``file.py:fn``), which
    the caller names and so trusts. Every tensor comes from safetensors, checked against
    its digest. Layers that quantized their input get a PACT module ``LAYER.input_quant``
    run by a forward pre-hook.

    Args:
        path: the packed file.
        device: where the model goes.
        model: the user factory to build the architecture with (never read from the file).
        verify: check every tensor against its SHA-256 digest (about a tenth of the load time of a
            resnet50-sized file, ``benchmarks/packing.py``); the header's digest is checked regardless.
    """
    packed = PackedFile.open(path, verify=verify)
    spec = recorded_model(packed.header["model"], str(packed.path), model)
    packed.read_all()
    model = _build_checked(packed, spec)
    state: dict[str, torch.Tensor] = {}
    weight_names = set()
    for entry in packed.layers:
        name = entry["name"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MpqError(f"{packed.path}: layer {name!r} does not exist in model {spec.name}") from None
        state[f"{name}.weight"] = packed.decode_layer(name)
        weight_names.update(weight_tensor_name(name, s) for s in TENSORS.get(entry["encoding"], ()))
        weight_names.add(f"{name}.weight")
        if entry.get("act"):
            _attach_input_quantizer(module, entry["act"])
            stored = set(act_tensor_names(name, entry["act"]))
            for key, value in module.input_quant.state_dict().items():  # flags from the header, not the file
                if f"{name}.input_quant.{key}" not in stored:
                    state[f"{name}.input_quant.{key}"] = value
    rest = [n for n in packed.tensors if n not in weight_names]
    state.update(packed.read_tensors(rest))
    state = with_aliases(model, state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise MpqError(f"{packed.path}: tensor {missing[0]} is missing ({len(missing)} model tensor(s) absent)")
    if unexpected:
        raise MpqError(f"{packed.path}: tensor {unexpected[0]} is not part of model {spec.name}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise MpqError(
                f"{packed.path}: tensor {key} has shape {list(value.shape)}, the model expects "
                f"{list(expected[key].shape)}"
            )
        if value.dtype != expected[key].dtype:
            raise MpqError(f"{packed.path}: tensor {key} is {value.dtype}, the model expects {expected[key].dtype}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _build_checked(packed: PackedFile, spec) -> nn.Module:
    """The model of ``spec``, built on the meta device first (no memory) and checked against the
    header: every Conv2d/Linear layer must be there with the same shape before anything is
    allocated, so a file cannot make the reader allocate more than the file describes. The
    checked skeleton then gets uninitialised storage (every tensor is loaded from the file
    next, so initialising them would be wasted work); a model with non-persistent buffers,
    which the file does not hold, is built for real instead. A user factory is the caller's
    own code and is built as they asked."""
    if spec.kind == "user":
        return build_model(spec)
    with torch.device("meta"):
        skeleton = build_model(spec)
    shapes = {e["name"]: e["shape"] for e in packed.layers}
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            if name not in shapes:
                raise MpqError(f"{packed.path}: layer {name} of model {spec.name} is not in the header")
            if list(module.weight.shape) != shapes[name]:
                raise MpqError(
                    f"{packed.path}: layer {name} has shape {shapes[name]}, model {spec.name} expects "
                    f"{list(module.weight.shape)}"
                )
    state = skeleton.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    if model_bytes > MAX_MODEL_BYTES + MAX_EXPANSION * packed.file_bytes:
        raise MpqError(
            f"{packed.path}: its model would take {model_bytes / 2**30:.1f} GiB in memory, from a "
            f"{packed.file_bytes:,}-byte file; refused (more than {MAX_EXPANSION}x the file plus 1 GiB)"
        )
    persistent = set(state)
    if any(name not in persistent for name, _ in skeleton.named_buffers()):
        return build_model(spec)
    return skeleton.to_empty(device="cpu")
