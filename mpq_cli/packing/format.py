"""The packed file ``mpq.packed/1.2``: write, read, validate, decode, load (``docs/format.md``).

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

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import MpqError
from ..models import build_model
from ..models.loading import recorded_model, with_aliases
from .encodings import TENSORS, EncodedWeight, decode_weight
from .header import (  # noqa: F401  (re-exported: the header's vocabulary is part of this module's API)
    DIGEST_KEY,
    FORMAT,
    MAX_EXPANSION,
    MAX_MODEL_BYTES,
    METADATA_KEY,
    READABLE_FORMATS,
    PackedHeader,
    TensorInfo,
    _sha256,
    act_tensor_name,
    act_tensor_names,
    read_safetensors_index,
    weight_tensor_name,
)


@dataclass
class PackedFile(PackedHeader):
    """An opened, validated packed file: its header and tensor index (data is read on demand)."""

    _cache: dict[str, torch.Tensor] | None = field(default=None, repr=False)

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
