"""From a run directory to a packed file, and the size report of a packed file.

:func:`pack_run` reads a search/finetune run (``config.json``, ``scheme.json``,
``codes.safetensors``, ``model.safetensors``) without building the model or loading
data, encodes every quantized layer (:mod:`mpq_cli.packing.encodings`) and checks that
each encoded layer decodes to the run's exact weights before anything is written.
:func:`size_report` turns a header and the byte count of every tensor into the
per-layer table that ``mpq export`` writes and ``mpq inspect`` shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import normalisation
from .errors import MpqError
from .forms import WeightForm, get_form, inferred_form
from .models.loading import read_state_dict
from .packing.format import act_tensor_name, act_tensor_names, layer_entry, weight_tensor_name
from .packing.sizes import select_layers, size_report  # noqa: F401  (re-exported)
from .record import RunRecord
from .rundir import read_json, versions
from .scheme import Scheme


@dataclass
class PackedModel:
    """A packed file in memory: its header (without the format key) and its tensors."""

    header: dict
    tensors: dict[str, torch.Tensor]

    def tensor_bytes(self) -> dict[str, int]:
        return {name: t.numel() * t.element_size() for name, t in self.tensors.items()}


def _read_codes(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The run's codes and, per layer, the form they take (``{"weight": "codes"|"basis", "act": ...}``;
    ``None`` for runs saved before forms were recorded)."""
    from safetensors import safe_open

    if not path.is_file():
        raise MpqError(f"{path} not found: the run did not finish (only finished runs can be exported)")
    try:
        with safe_open(str(path), framework="pt") as f:
            forms = (f.metadata() or {}).get("mpq.forms")
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(forms) if forms else None
    except Exception as exc:  # a truncated or foreign file
        raise MpqError(f"cannot read {path} ({exc.__class__.__name__})") from None


def _form(forms: dict | None, name: str, codes: dict, state: dict) -> tuple[WeightForm, str | None]:
    """``(weight form, activation kind)`` of a layer: as recorded, or for an older run as its tensors show."""
    if forms is not None:
        if not isinstance(forms.get(name), dict):
            raise MpqError(f"codes.safetensors records no form for layer {name!r}")
        return get_form(forms[name].get("weight")), forms[name].get("act")
    act = (
        "basis"
        if f"{name}.act_quantizer.gamma" in state
        else "pact"
        if f"{name}.act_quantizer.alpha" in state
        else None
    )
    return inferred_form(name, codes), act


def _plain_state(state: dict[str, torch.Tensor], quantized: list[str]) -> dict[str, torch.Tensor]:
    """The run's state under the original model's names, without method parameters.

    A quantized layer ``L`` is stored as ``L.layer.*`` (the wrapped module, weight
    removed), ``L.weight_quantizer.*`` (the method's parameters) and ``L.act_quantizer.*``
    (the input's PACT clip); only ``L.layer.*`` survives, renamed ``L.*``.
    """
    prefixes = {name: (f"{name}.layer.", f"{name}.weight_quantizer.", f"{name}.act_quantizer.") for name in quantized}
    out = {}
    for key, value in state.items():
        for name, (layer, method, act) in prefixes.items():
            if key.startswith(layer):
                out[f"{name}.{key[len(layer) :]}"] = value
                break
            if key.startswith((method, act)):
                break
        else:
            out[key] = value
    return out


def pack_run(run_dir: str | Path) -> PackedModel:
    """Encode a finished search/finetune run; every layer is verified to decode exactly."""
    run_dir = Path(run_dir)
    record = RunRecord.load(run_dir, quantized=True)
    if not (run_dir / "scheme.json").is_file():
        raise MpqError(f"{run_dir} has no scheme.json: the run did not finish")
    scheme = Scheme.load(run_dir / "scheme.json")
    codes, forms = _read_codes(run_dir / "codes.safetensors")
    state, _ = read_state_dict(run_dir / "model.safetensors")
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    quantized = [e.name for e in scheme.quantized]
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for layer in scheme.layers:
        if layer.is_fp:
            tensors[f"{layer.name}.weight"] = state[f"{layer.name}.weight"].float()
            entries.append(layer_entry(layer.name, layer.kind, layer.shape, None, None, None))
            continue
        weight_form, act_kind = _form(forms, layer.name, codes, state)
        encoded = weight_form.encode(str(run_dir), layer.name, tuple(layer.shape), codes)
        for suffix, tensor in encoded.tensors.items():
            tensors[weight_tensor_name(layer.name, suffix)] = tensor
        act = None
        if layer.act_bits is not None and act_kind == "basis":  # ALQ's levels
            act = {"kind": "basis", "bits": layer.act_bits}
            for tensor in act_tensor_names(layer.name, act):
                tensors[tensor] = state[tensor.replace(".input_quant.", ".act_quantizer.")].float()
        elif layer.act_bits is not None:
            act = {"bits": layer.act_bits, "signed": bool(state[f"{layer.name}.act_quantizer.signed"])}
            tensors[act_tensor_name(layer.name)] = state[f"{layer.name}.act_quantizer.alpha"].float()
        entries.append(layer_entry(layer.name, layer.kind, layer.shape, layer.bits, encoded, act))
    weight_keys = {f"{e['name']}.weight" for e in entries}
    for key, value in _plain_state(state, quantized).items():
        if key not in weight_keys:
            tensors[key] = value
    model = record.model_dict()
    data = {k: v for k, v in record.data_dict().items() if k not in ("data_dir", "workers")}
    # the run's --normalize (or its torchvision weights' statistics) when it recorded one, else the dataset's
    mean, std = normalisation(data["name"], model["in_channels"], data.get("normalize"))
    header = {
        "producer": versions(),
        "model": model,
        "method": record.method,
        "method_config": record.fields.get("method_config", {}),
        "data": {
            "name": data["name"],
            "mean": list(mean),
            "std": list(std),
            "input_shape": [model["in_channels"], *model["input_size"]],
        },
        "eval": {"data": data, "seed": record.seed},
        "source": {
            "run": Path(run_dir).name,  # the name only: a shipped file carries no local path, and its size none
            "top1": summary.get("top1"),
            "fp_top1": record.fp_top1,
            "fp32_checkpoint_bytes": record.checkpoint_bytes or _checkpoint_bytes(run_dir, record),
        },
        "layers": entries,
    }
    return PackedModel(header, tensors)


def _checkpoint_bytes(run_dir: Path, record: RunRecord) -> int | None:
    """Size of the FP32 checkpoint of a run recorded before runs kept it: its path as given, relative
    to the folder the search ran in (unknown here), so tried as given and relative to the run's parent."""
    checkpoint = record.checkpoint
    if not checkpoint:
        return None
    for path in (Path(checkpoint), run_dir.parent / checkpoint):
        if path.is_dir():
            path = path / "model.safetensors"
        if path.is_file():
            return path.stat().st_size
    return None
