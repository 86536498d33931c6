"""Build a model from a spec and load checkpoints without unpickling code."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MpqError
from .zoo import BUILTIN


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model's architecture.

    Args:
        name: a built-in name (``lenet5``), a torchvision classification model
            (``resnet18``), or a user factory ``package.module:fn`` / ``path/file.py:fn``.
        weights: torchvision weights (``DEFAULT`` or an enum name), or ``None``.
        num_classes: classifier outputs.
        in_channels: input channels the model takes.
        input_size: ``(height, width)`` of its input.
    """

    name: str
    weights: str | None = None
    num_classes: int = 10
    in_channels: int = 3
    input_size: tuple[int, int] = (32, 32)

    def __post_init__(self) -> None:
        problem = _spec_problem(self)
        if problem:
            raise MpqError(f"model spec: {problem}")

    @property
    def kind(self) -> str:
        if self.name in BUILTIN:
            return "builtin"
        if ":" in self.name:
            return "user"
        return "torchvision"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> ModelSpec:
        """The spec a run or file recorded; ``source`` names it in the error for a malformed record."""
        where = f"{source}: " if source else ""
        if (
            not isinstance(d, dict)
            or set(d) - {"name", "weights", "num_classes", "in_channels", "input_size"}
            or "name" not in d
            or not isinstance(d.get("input_size", ()), list | tuple)
        ):
            raise MpqError(f"{where}malformed model record {str(d)[:200]}")
        d = dict(d)
        if "input_size" in d:
            d["input_size"] = tuple(d["input_size"])
        try:
            return cls(**d)
        except MpqError as exc:
            raise MpqError(f"{where}{exc}") from None


# Bounds on a model spec: generous for vision models, and they keep a hostile record from
# asking for a model or an input batch that cannot fit in memory.
MAX_CLASSES = 100_000
MAX_CHANNELS = 64
MAX_SIDE = 4096


def _spec_problem(spec: ModelSpec) -> str | None:
    def small_int(v, hi):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi

    if not isinstance(spec.name, str) or not spec.name or len(spec.name) > 1000:
        return f"name must be a non-empty string, got {spec.name!r}"
    if spec.weights is not None and not isinstance(spec.weights, str):
        return f"weights must be a string or null, got {spec.weights!r}"
    if not small_int(spec.num_classes, MAX_CLASSES):
        return f"num_classes must be an integer in 1..{MAX_CLASSES}, got {spec.num_classes!r}"
    if not small_int(spec.in_channels, MAX_CHANNELS):
        return f"in_channels must be an integer in 1..{MAX_CHANNELS}, got {spec.in_channels!r}"
    size = spec.input_size
    if not (isinstance(size, tuple) and len(size) == 2 and all(small_int(v, MAX_SIDE) for v in size)):
        return f"input_size must be two integers in 1..{MAX_SIDE}, got {size!r}"
    return None


def recorded_model(spec_dict, source: str, model: str | None) -> ModelSpec:
    """The model spec a run directory or packed file records, its user factory replaced by
    ``model``: mpq never imports code because a file names it, only code its caller names.

    Raises:
        MpqError: the record is malformed, or names a user factory and ``model`` is not given.
    """
    spec = ModelSpec.from_dict(spec_dict, source=source)
    if model is not None:
        return ModelSpec(model, None, spec.num_classes, spec.in_channels, spec.input_size)
    if spec.kind == "user":
        raise MpqError(
            f"{source} was made with the user model {spec.name}; mpq does not run code that a file "
            f"names: pass --model {spec.name} (Python: model=...) if you trust it"
        )
    return ModelSpec(spec.name, None, spec.num_classes, spec.in_channels, spec.input_size)


def torchvision_models() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def list_models() -> dict[str, list[str]]:
    return {"builtin": sorted(BUILTIN), "torchvision": torchvision_models()}


def build_model(spec: ModelSpec) -> nn.Module:
    """Construct the model; raises :class:`MpqError` with a clear message on failure."""
    if spec.kind == "builtin":
        if spec.weights not in (None, "none"):
            raise MpqError(f"built-in model {spec.name} has no pretrained weights; use --checkpoint")
        try:
            return BUILTIN[spec.name](spec.num_classes, spec.in_channels, tuple(spec.input_size))
        except RuntimeError as exc:  # e.g. an input too small for the model's kernels and strides
            first = (str(exc).strip().splitlines() or [""])[0]
            raise MpqError(
                f"model {spec.name} cannot take inputs of shape {[spec.in_channels, *spec.input_size]}: {first}"
            ) from None
    if spec.kind == "user":
        return _build_user(spec)
    return _build_torchvision(spec)


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    import torchvision.models as tvm

    if spec.name not in torchvision_models():
        raise MpqError(f"unknown model {spec.name!r}: see `mpq models` (or give package.module:factory)")
    weights = _torchvision_weights(spec.name, spec.weights)
    if weights is None:
        return tvm.get_model(spec.name, weights=None, num_classes=spec.num_classes)
    try:
        model = tvm.get_model(spec.name, weights=weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise MpqError(
            f"could not fetch {spec.name} weights {weights.name} ({exc.__class__.__name__}); offline, put the file "
            f"in $TORCH_HOME/hub/checkpoints or pass --weights none --checkpoint FILE"
        ) from None
    if len(weights.meta.get("categories", [])) != spec.num_classes:
        _replace_classifier(model, spec.num_classes)
    return model


def _torchvision_weights(name: str, weights: str | None):
    """The torchvision weights enum member ``weights`` names for model ``name`` (``None``: no weights)."""
    import torchvision.models as tvm

    if weights in (None, "none"):
        return None
    try:
        enum = tvm.get_model_weights(name)
        return enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        names = ", ".join(w.name for w in tvm.get_model_weights(name))
        raise MpqError(f"--weights {weights}: {name} has DEFAULT, {names}") from None


def weights_normalisation(name: str, weights: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` of torchvision weights' own preprocessing (``weights.transforms()``): the inputs those
    weights were trained on. ``None`` for a model without torchvision weights. Nothing is downloaded."""
    if ":" in name or name in BUILTIN or weights in (None, "none") or name not in torchvision_models():
        return None  # build_model names an unknown model
    transforms = _torchvision_weights(name, weights).transforms()
    mean, std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
    if mean is None or std is None:  # not an image classification preset: leave the dataset's statistics
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear for a fresh one with ``num_classes`` outputs (fine-tuning a pretrained body)."""
    from ..layers import replace_module

    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    replace_module(model, name, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))


def _build_user(spec: ModelSpec) -> nn.Module:
    target, _, fn_name = spec.name.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise MpqError(f"model file {target} not found")
            mod_name = f"mpq_user_model_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except MpqError:
        raise
    except Exception as exc:  # a user's module can fail in any way; report it on one line
        raise MpqError(f"could not import {target}: {exc.__class__.__name__}: {exc}") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise MpqError(f"{target} has no callable {fn_name!r}")
    offered = {"num_classes": spec.num_classes, "in_channels": spec.in_channels, "input_size": tuple(spec.input_size)}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature (e.g. os:system) is no model factory
        raise MpqError(f"{spec.name} is not a model factory (no Python signature)") from None
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_kwargs or k in params}
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code can fail in any way; report it on one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise MpqError(f"model factory {spec.name} failed: {exc.__class__.__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise MpqError(f"{spec.name} returned {type(model).__name__}, not an nn.Module")
    return model


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of a checkpoint (``.safetensors``, ``.pt``, ``.pth``).

    ``.pt`` files are read with ``weights_only=True``: no code is ever unpickled.
    A wrapping ``state_dict``/``model`` key and ``module.`` prefixes are removed.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise MpqError(f"checkpoint {path} not found")
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for a bad file
            raise MpqError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, unsafe globals, truncated zips
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise MpqError(f"{path}: cannot be loaded safely as a state dict ({first})") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise MpqError(f"{path}: expected a dict of tensors (a state_dict)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, metadata


def classifier_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's classifier: its last Linear layer (weight, bias), under every name the
    model registers it (``self.fc = self.classifier = nn.Linear(...)``: the state dict holds both)."""
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return []
    last = linears[-1]
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is last]
    return [f"{name}.{k}" for name in names for k, _ in last.named_parameters()]


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` did.

    Args:
        metadata: the file's safetensors metadata (e.g. the FP accuracy ``mpq train`` recorded).
        initialised: the model's keys left at their initialisation (its classifier's, for a backbone or
            with ``new_head``; else none).
        replaced: the checkpoint's classifier keys that ``new_head`` set aside, with their shapes.
    """

    metadata: dict[str, str]
    initialised: list[str]
    replaced: dict[str, list[int]]


def load_checkpoint(model: nn.Module, path: str | Path, *, new_head: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint into ``model`` strictly, with one clear error for any mismatch, except two:

    - a backbone, a state dict that lacks exactly the classifier (the last Linear's tensors), loads with
      the model's freshly initialised head;
    - with ``new_head``, a classifier of another shape (an ImageNet head for a 10-class model) is set
      aside and the model's freshly initialised head kept; every other tensor still loads strictly.

    Raises:
        MpqError: any other missing key, unexpected key or shape mismatch; a classifier of another shape
            without ``new_head`` (the message names the option).
    """
    state, metadata = read_state_dict(path)
    state = with_aliases(model, state)
    expected = model.state_dict()
    head = classifier_keys(model)
    mismatched_head = [k for k in head if k in state and state[k].shape != expected[k].shape]
    replaced = {}
    if new_head and mismatched_head:
        # the whole layer, not only the tensors that differ: a head of another input width but the same
        # classes would otherwise keep a bias trained for another weight
        replaced = {k: list(state[k].shape) for k in head if k in state}
        state = {k: v for k, v in state.items() if k not in replaced}
    # BatchNorm's step counter matters only without momentum; checkpoints often leave it out, and BatchNorm's
    # own loader then sets it (to 0), as for the shared MobileNetV2 backbone
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing and sorted(missing) == sorted(head) and not unexpected and not shapes:
        model.load_state_dict(state, strict=False)
        return LoadedCheckpoint(metadata, missing, replaced)
    described = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes]
    if shapes and not missing and not unexpected and set(shapes) <= set(head):
        raise MpqError(
            f"checkpoint {path} has another classifier than the model (shape mismatch {_first(described)}); "
            "pass --new-head to re-initialise it (Python: ModelOptions(new_head=True)), every other tensor "
            "still loads strictly"
        )
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_first(described)}")
    if problems:
        raise MpqError(f"checkpoint {path} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)
    return LoadedCheckpoint(metadata, [], replaced)


def _first(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every tensor once, under the first name that holds it.

    A module registered under two names (one layer applied twice, an alias kept for a user's
    convenience) is one layer with one set of tensors; safetensors refuses to write tensors that
    share memory, and counting them twice would overstate the model's size. :func:`with_aliases`
    restores the other names when the state is loaded.
    """
    seen: set[int] = set()
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out[key] = value.detach()
    return out


def with_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every name of a tensor the model holds under several names filled from whichever
    of them the state holds (the inverse of :func:`unique_state_dict`, and of writers that keep another
    name, e.g. safetensors' ``save_model``); names the state already holds are left as they are."""
    names: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), []).append(key)
    out = dict(state)
    for group in names.values():
        present = [k for k in group if k in out]
        for key in group:
            if key not in out and present:
                out[key] = out[present[0]]
    return out
