"""The method interface, the registry, and what every method shares.

A method's lifecycle inside the shared training loop (``engine.fit``):

1. ``prepare(model)`` wraps every selected Conv2d/Linear in a
   :class:`~mpq_cli.layers.QuantizedLayer` whose weight comes from the method's
   :class:`WeightQuantizer`;
2. per epoch ``on_epoch_start``, per step ``regularizer`` (added to the loss) and
   ``on_step_end``; ``progress`` feeds the progress bar and the metrics file;
3. ``finalize`` makes the model exact (and meets the bit budget);
4. ``start_finetune`` fixes the scheme for ``mpq finetune``.

In evaluation mode every weight quantizer returns its exact weight,
``dequantize(codes, step)``, so every accuracy mpq reports is that of the exactly
quantized model whose codes the run saves.
"""

from __future__ import annotations

import difflib
import enum
import functools
import math
import time
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn

from ..budget import budget_step, in_window, narrow_candidates
from ..budget_screen import layer_sensitivity, screened_budget_step
from ..errors import MpqError
from ..forms import FORMS, LayerCodes  # noqa: F401  (LayerCodes re-exported)
from ..layers import LayerSelection, QuantizedLayer, module_paths, quantizable_layers, quantized_layers, replace_module
from ..packing.encodings import CodesPlan, plan_codes
from ..quant.act import PACT
from ..quant.basis import BasisForm
from ..quant.host import HostMirrored
from ..quant.primitives import GRANULARITIES, dequantize
from ..scheme import SIGN_EXCLUDED

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a method available as ``--method NAME``."""

    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str) or name not in METHODS:
        raise MpqError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


class Phase(enum.Enum):
    SEARCH = "search"  # the method chooses bits
    FINETUNE = "finetune"  # the scheme is fixed, values train
    FINAL = "final"  # exact integer model, nothing trains


BUDGET_ON = ("nominal", "stored")
BUDGET_PROBES = ("screen", "exact")


@dataclass
class MethodConfig:
    """Fields every method has. Subclasses add their paper's hyperparameters.

    Args:
        target_bits: average bits per weight to reach as the method counts them, weighted by parameters
            (``None`` where a method has an open-loop mode, e.g. BSQ with a fixed alpha). Must be > 0:
            a model whose every weight is zero is no model.
        act_bits: quantize each quantized layer's input to this many bits (PACT); ``None`` = FP.
        first_act_bits: bits of the first quantized layer's input (the papers use 8).
        allow_zero_bits: *ours*: a layer may end with every code zero (0 bits, the layer outputs its
            bias alone). Off by default: the budget steps never offer 0 bits and a search that ends
            with such a layer is refused as collapsed (``--fix-bits NAME=0`` asks for it per layer).
        budget_on: *ours*: what ``target_bits`` caps, ``nominal`` (the bits as the method's paper counts
            them) or ``stored`` (the bits per weight the packed file stores for the quantized layers: fields
            with their sign, steps and code tables, as ``mpq inspect`` measures them), since the file is
            what a user pays for.
        budget_probe: *ours*: how the loss-aware budget step (CSQ, BSQ) measures each layer's options:
            ``screen`` estimates every option's loss change from a few backward passes on the probe batches
            (gradient and Hutchinson curvature) and probes exactly only the finalists and the chosen scheme;
            ``exact`` probes every option of every layer with a full forward pass. The default is the method's:
            ``screen`` for CSQ since its config version 9 (measured over seeds, docs/methods/csq.md), ``exact``
            elsewhere.
        granularity: *ours*: one step per layer (``tensor``, the papers' form) or one per output
            channel (``channel``, as torchao, ONNX Runtime and TensorRT quantize weights), initialised and
            learned per channel as each method does per layer (methods whose form is not integer codes times a
            step, i.e. ALQ, refuse ``channel``). Steps are stored exactly and counted in the stored bits.
    """

    version: int = 1
    target_bits: float | None = 3.0
    act_bits: int | None = None
    first_act_bits: int = 8
    allow_zero_bits: bool = False
    budget_on: str = "nominal"
    budget_probe: str = "exact"
    granularity: str = "tensor"

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.target_bits is not None and not 0 < self.target_bits <= 16:
            raise MpqError(f"--target-bits must be in (0, 16], got {self.target_bits}")
        if self.act_bits is not None and not 1 <= self.act_bits <= 16:
            raise MpqError(f"--act-bits must be in 1..16, got {self.act_bits}")
        if not 1 <= self.first_act_bits <= 16:
            raise MpqError(f"first_act_bits must be in 1..16, got {self.first_act_bits}")
        if self.budget_on not in BUDGET_ON:
            raise MpqError(f"--budget-on must be one of {', '.join(BUDGET_ON)}, got {self.budget_on!r}")
        if self.budget_probe not in BUDGET_PROBES:
            raise MpqError(f"--budget-probe must be one of {', '.join(BUDGET_PROBES)}, got {self.budget_probe!r}")
        if self.granularity not in GRANULARITIES:
            raise MpqError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d.get("budget_on") == "nominal":  # the default is left out: runs written before it keep their fingerprints
            del d["budget_on"]
        if d.get("budget_probe") == "exact" == _field_default(type(self), "budget_probe"):
            del d["budget_probe"]  # likewise: runs before the option probed exactly, as this default does
        if d.get("granularity") == "tensor":  # likewise: every run before the option had one step per layer
            del d["granularity"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MethodConfig:
        if not isinstance(d, dict):
            raise MpqError(f"{cls.__name__}: expected an object of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            # a typo in --set FIELD=VALUE gets the nearest field, as an unknown option gets the nearest option
            hints = [
                f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1)) else name
                for name in sorted(unknown)
            ]
            raise MpqError(f"{cls.__name__}: unknown fields {', '.join(hints)} (`mpq methods` lists them)")
        return cls(**d)


def _field_default(config_class: type, name: str):
    return next(f.default for f in fields(config_class) if f.name == name)


def field_help(config_class: type) -> dict[str, str]:
    """Each config field's meaning, from the ``Args:`` sections of the config class's docstring and its
    bases' (so a field's help is written once, beside its default): one line per field, whitespace folded."""
    found: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        lines = (cls.__doc__ or "").splitlines()
        inside, name, indent = False, None, 0
        for line in lines:
            stripped = line.strip()
            if stripped == "Args:":
                inside, name = True, None
                continue
            if not inside:
                continue
            if not stripped:
                name = None
                continue
            here = len(line) - len(line.lstrip())
            head, sep, text = stripped.partition(": ")
            if sep and head.isidentifier() and (name is None or here <= indent):
                name, indent = head, here
                found[name] = text
            elif name is not None and here > indent:
                found[name] += " " + stripped
            else:
                inside = False
    fields_ = {f.name for f in fields(config_class)}
    return {k: v for k, v in found.items() if k in fields_}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_field_types(config) -> None:
    """Every scalar field holds a value of its declared type (``int``, ``float``, ``bool``, ``str``,
    optionally ``None``): a value from the command line or a JSON file is checked here, so that
    ``--reg-strength abc`` or ``--max-bits 2.5`` is a one-line error before anything runs. A float
    field takes an integer (converted); an integer field takes a float only if it is integral.
    Container fields (lists, dicts) are left to the method's own parsing."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        declared = hints[f.name]
        allowed = typing.get_args(declared) if isinstance(declared, types.UnionType) else (declared,)
        value = getattr(config, f.name)
        if value is None:
            if type(None) not in allowed:
                raise MpqError(f"{_option(f.name)} needs a value")
            continue
        scalars = [t for t in allowed if t in (int, float, bool, str)]
        containers = [t for t in allowed if typing.get_origin(t) in (dict, list) or t in (dict, list)]
        if containers:
            setattr(config, f.name, _coerce_container(f.name, value, containers[0]))
            continue
        if len(scalars) != len([t for t in allowed if t is not type(None)]):
            continue  # a field of another type: the method checks it
        coerced = _coerce(value, scalars)
        if coerced is None:
            kinds = " or ".join(
                {int: "an integer", float: "a finite number", bool: "true/false", str: "a string"}[t] for t in scalars
            )
            raise MpqError(f"{_option(f.name)} must be {kinds}, got {value!r}")
        setattr(config, f.name, coerced)


def _coerce_container(name: str, value, declared):
    """A ``dict[K, V]`` field must be a mapping of such scalars; a ``list`` field a list (or, for the
    methods that parse one, a comma-separated string such as BMPQ's ``--bits 2,4``)."""
    origin = typing.get_origin(declared) or declared
    args = typing.get_args(declared)
    if origin is dict:
        if not isinstance(value, dict):
            raise MpqError(f"{_option(name)} must be a JSON object such as '{{\"layer1.*\": 4}}', got {value!r}")
        if len(args) == 2 and all(a in (int, float, bool, str) for a in args):
            out = {}
            for key, item in value.items():
                k, v = _coerce(key, [args[0]]), _coerce(item, [args[1]])
                if k is None or v is None:
                    raise MpqError(f"{_option(name)}: entry {key!r}: {item!r} has the wrong type")
                out[k] = v
            return out
        return value
    if not isinstance(value, list | str):
        raise MpqError(f"{_option(name)} must be a list, got {value!r}")
    return value


def _coerce(value, kinds: list[type]):
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if kind is int and isinstance(value, int):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind is float and isinstance(value, int | float) and math.isfinite(value):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    return None


class WeightQuantizer(HostMirrored, ABC):
    """Produces one layer's weight; exact in evaluation mode: ``codes * step``, or for a
    quantizer whose exact form is binary bases (ALQ) ``exact_basis().weight(shape)``."""

    # the form of its exact weight, a key of :data:`mpq_cli.forms.FORMS` (how runs, files and ONNX keep it)
    weight_form: ClassVar[str] = "codes"

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    @abstractmethod
    def train_weight(self) -> torch.Tensor:
        """The weight used in training steps (relaxed or straight-through)."""

    @abstractmethod
    def exact_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, step)``: integer codes (int32, the weight's shape) and a float32 step, 0-d (one per layer)
        or ``(C, 1, ..., 1)`` (one per output channel: ``--granularity channel``)."""

    @abstractmethod
    def nominal_bits(self) -> int | float:
        """Bits as the method's paper counts them (see ``Method.bits_convention``)."""

    def exact_basis(self) -> BasisForm | None:
        """The exact weight as binary bases, for quantizers whose ``weight_form`` is ``basis``."""
        return None

    def exact_weight(self) -> torch.Tensor:
        """The weight evaluation uses: ``dequantize(codes, step)``, or the binary bases' sum."""
        basis = self.exact_basis()
        if basis is not None:
            return basis.weight(self.shape)
        codes, step = self.exact_codes()
        return dequantize(codes, step)

    def forward(self) -> torch.Tensor:
        if self.training:
            return self.train_weight()
        codes, step = self.exact_codes()
        return dequantize(codes, step)


@dataclass
class FinalizeResult:
    """What ``Method.finalize`` reports about the scheme it fixed.

    Args:
        budget_met: the final scheme meets the method's budget (``None``: no budget, e.g. BSQ's open loop).
        avg_bits_before_budget_step: average nominal bits before a budget step changed the scheme.
        budget_changes: one record per layer the budget step changed (``mpq_cli.budget.budget_step``).
        facts: the method's own numbers for ``summary.json`` and ``--json`` (JSON-able).
    """

    budget_met: bool | None = None
    avg_bits_before_budget_step: float | None = None
    budget_changes: list[dict] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The flat keys a run's summary carries (``budget_changes`` is kept apart: it is long)."""
        out = dict(self.facts)
        if self.budget_met is not None:
            out["budget_met"] = self.budget_met
        if self.avg_bits_before_budget_step is not None:
            out["avg_bits_before_budget_step"] = self.avg_bits_before_budget_step
        return out


class Method(ABC):
    """One mixed-precision method. Subclasses are registered with :func:`register`."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # How the method's paper counts a layer's bits; reports print it beside the nominal bits.
    bits_convention: ClassVar[str] = SIGN_EXCLUDED
    # Training defaults from the method's paper (its from-scratch or its own schedule: ``--recipe paper``); the
    # command line overrides them.
    training_defaults: ClassVar[dict] = {}
    # A search's defaults when it starts from trained weights (``--recipe checkpoint``, what ``auto`` picks with
    # --checkpoint or pretrained --weights): measured from trained references (issue 27; docs/cli.md says
    # where); ``None``: the paper's.
    checkpoint_defaults: ClassVar[dict | None] = None
    # Method fields ``--recipe checkpoint`` sets unless the command line gives them (measured as above).
    checkpoint_fields: ClassVar[dict] = {}
    finetune_defaults: ClassVar[dict] = {}

    @classmethod
    def recipe_defaults(cls, recipe: str) -> dict:
        """The training defaults of ``recipe`` (``paper`` or ``checkpoint``)."""
        if recipe == "checkpoint" and cls.checkpoint_defaults is not None:
            return cls.checkpoint_defaults
        return cls.training_defaults

    @classmethod
    def recipe_fields(cls, recipe: str, given: dict) -> dict:
        """The method fields of a search under ``recipe``: ``given`` over the recipe's own (``checkpoint_fields``)."""
        return {**cls.checkpoint_fields, **given} if recipe == "checkpoint" else dict(given)

    def __init__(self, config: MethodConfig, selection: LayerSelection | None = None):
        self.config = config
        self.selection = selection or LayerSelection()
        self.phase = Phase.SEARCH
        self.budget_step_seconds: float | None = None  # wall time of the last budget step (in this process)
        self.layers: dict[str, QuantizedLayer] = {}
        # measures the model's loss on a few fixed training batches (given to prepare)
        self.loss_probe: Callable[[], float] | None = None

    # -- building -------------------------------------------------------------------------
    @abstractmethod
    def make_weight_quantizer(self, name: str, layer: nn.Module, fixed_bits: int | None) -> WeightQuantizer:
        """A quantizer for ``layer``, initialised from its current weight."""

    def make_act_quantizer(self, name: str, first: bool) -> nn.Module | None:
        """The quantizer of ``name``'s input (``first``: the model's first layer): PACT at
        ``act_bits`` (``first_act_bits`` for the first layer), or None for FP activations."""
        if self.config.act_bits is None:
            return None
        return PACT(self.config.first_act_bits if first else self.config.act_bits)

    def prepare(self, model: nn.Module, loss_probe: Callable[[], float] | None = None) -> None:
        """Wrap the selected layers of ``model`` in place.

        Args:
            model: the model; its Conv2d/Linear layers are replaced by quantized ones.
            loss_probe: measures the model's mean loss on a few fixed training batches (the
                loss-aware budget steps of CSQ and BSQ need it; ``mpq_cli.engine.loss_probe``).
        """
        self.loss_probe = loss_probe
        self.selection = self.selection.with_edges(model)  # --edge-bits: the first and last layer, before wrapping
        candidates = quantizable_layers(model)
        paths = module_paths(model)
        # a layer registered under several names is selected by any of them
        self.selection.check_patterns([p for name, layer in candidates.items() for p in paths[id(layer)]])
        self.selection.check_scheme_covers({name: paths[id(layer)] for name, layer in candidates.items()})
        first = True
        for name, layer in candidates.items():
            if self.selection.is_fp(*paths[id(layer)]):
                first = False
                continue
            quantizer = self.make_weight_quantizer(name, layer, self.selection.fixed_bits(*paths[id(layer)]))
            quantizer.to(layer.weight.device)
            act = self.make_act_quantizer(name, first)
            if act is not None:
                act = act.to(layer.weight.device)
            wrapped = QuantizedLayer(layer, quantizer, act)
            for path in paths[id(layer)]:  # a module registered under several names is one layer: wrap it once
                replace_module(model, path, wrapped)
            first = False
        self.layers = quantized_layers(model)
        if not self.layers:
            raise MpqError("no layer left to quantize (every Conv2d/Linear is kept in FP)")

    # -- training hooks ---------------------------------------------------------------------
    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Optimizer groups; by default decay everything with more than one dimension."""
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def regularizer(self) -> torch.Tensor | None:
        return None

    def before_optimizer_step(self) -> None:
        """After the backward pass and gradient clipping, before the optimizer: a method may rescale
        its parameters' gradients here (CSQ's preconditioned bit logits)."""

    def on_epoch_start(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        pass

    def on_step_end(self) -> None:
        pass

    def progress(self) -> dict[str, float]:
        return {"avg_bits": self.average_bits()}

    def wants_optimizer_reset(self) -> bool:
        """True when the method re-initialised parameters and their optimizer state is stale."""
        return False

    # -- results ----------------------------------------------------------------------------
    def finalize(self) -> FinalizeResult:
        """Make the model exact and fix its scheme (meeting the budget); returns what it did."""
        self.phase = Phase.FINAL
        return FinalizeResult()

    def _require_probe(self) -> Callable[[], float]:
        if self.loss_probe is None:
            raise MpqError(f"{self.name} needs a loss probe for its budget step: pass loss_probe to prepare()")
        return self.loss_probe

    def start_finetune(self) -> None:
        raise MpqError(f"method {self.name} has no fine-tuning phase")

    def _budget_step(
        self,
        current: dict[str, int],
        candidates: dict[str, Sequence[int]],
        apply: Callable[[str, int], Callable[[], None]],
        lift: Callable[[str, int], object] | None = None,
    ) -> list[dict]:
        """Move the scheme into ``[target - budget_tolerance, target]`` at the least measured loss, or do
        nothing if it is there: :func:`mpq_cli.budget.budget_step` over every layer, with ``current`` bits,
        ``candidates`` per searchable layer (those within the config's ``budget_span`` of the current bits,
        :func:`mpq_cli.budget.narrow_candidates`) and ``apply(name, bits)`` returning its undo. First every
        layer that may not be at 0 bits but is gets ``lift(name, bits)`` (default ``apply``) to its fewest
        nonzero candidate bits (:meth:`_lift_from_zero`). The records' probe loss and top-1 before are the
        model's before the lift, after the step's end."""
        target, tol = self.config.target_bits, self.config.budget_tolerance
        names = list(self.layers)
        never_zero = self._never_zero(names)
        zero = [n for n in never_zero if current.get(n) == 0 and any(b > 0 for b in candidates.get(n, ()))]
        if not zero and in_window(self.budget_average(full_width=True), target, tol):
            return []
        probe = self._require_probe()
        started = time.perf_counter()
        start_loss = probe()
        if not math.isfinite(start_loss):  # every option would measure nan too, and the integer program refuse it
            raise MpqError(
                f"training diverged before the budget step (its probe loss is {start_loss}): lower --lr and start "
                "a new run"
            )
        top1 = getattr(probe, "top1", None)  # engine.LossProbe measures it; a user's plain probe does not
        top1_before = top1() if callable(top1) else None
        lifted = self._lift_from_zero(zero, current, candidates, lift or apply, probe, start_loss)
        changes = []
        if not in_window(self.budget_average(full_width=True), target, tol):
            params = [self.layers[n].params for n in names]
            now = [current[n] for n in names]
            span = getattr(self.config, "budget_span", 0)
            step = budget_step
            if self.config.budget_probe == "screen" and callable(getattr(probe, "losses", None)):
                # a probe that gives its batches' losses to differentiate (engine.LossProbe); a plain callable
                # (a user's probe given to prepare) can only be called, so its step probes every option
                step = functools.partial(
                    screened_budget_step,
                    weight=self._exact_weight,
                    sensitivity=lambda: layer_sensitivity(probe, self.layers),
                )
            changes = self._run_step(step, apply, names, params, now, candidates, probe, never_zero, span)
        if lifted:  # a lifted layer's change counts from 0 bits, its lift's loss change included
            final_loss = changes[0]["probe_loss_after"] if changes else lifted[-1]["probe_loss_after"]
            moved = {c["layer"]: c for c in changes}
            for lift_record in lifted:
                step_record = moved.pop(lift_record["layer"], None)
                if step_record is not None:
                    lift_record.update(
                        bits_after=step_record["bits_after"],
                        probe_loss_change_alone=lift_record["probe_loss_change_alone"]
                        + step_record["probe_loss_change_alone"],
                        passes=step_record.get("passes", 1),
                    )
            start_loss = lifted[0]["probe_loss_before"]
            changes = [*lifted, *moved.values()]
            for record in changes:
                record.update(probe_loss_before=start_loss, probe_loss_after=final_loss)
        # what the step cost, for the search's health (in training steps of the same run). Kept off the method's
        # state: its digest must agree between torchrun's ranks, whose clocks do not
        self.budget_step_seconds = round(time.perf_counter() - started, 3)
        if changes and top1_before is not None:  # the exact model's top-1 on the probe, around the step
            changes[0]["probe_top1_before"], changes[0]["probe_top1_after"] = top1_before, top1()
        return changes

    def _lift_from_zero(
        self, zero: list[str], current: dict[str, int], candidates, lift, probe, loss: float
    ) -> list[dict]:
        """Put every layer of ``zero`` (searched layers that may not be at 0 bits but are: their search dropped
        all their bits) at its fewest nonzero candidate bits, in ``current`` too, before the budget step
        measures anything: a layer left at 0 would end the run as a collapse, and while several are at 0 the
        model every option is probed in is dead (each option alone changes nothing, and the integer program
        chooses blind). ``lift(name, bits)`` sets it for good; ``loss`` is the probe loss before. Returns one
        change record per lifted layer, its probe loss change measured in turn."""
        records = []
        for name in zero:
            bits = min(b for b in candidates[name] if b > 0)
            lift(name, bits)
            current[name] = bits
            after = probe()
            if not math.isfinite(after):  # what its bit logits hold is no weight: the search diverged
                raise MpqError(
                    f"training diverged before the budget step (lifting {name} off 0 bits gave a probe loss of "
                    f"{after}): lower --lr and start a new run"
                )
            records.append(
                {
                    "layer": name,
                    "bits_before": 0,
                    "bits_after": bits,
                    "probe_loss_change_alone": after - loss,
                    "probe_loss_before": loss,
                    "probe_loss_after": after,
                    "passes": 1,
                    "lifted_from_zero": True,
                }
            )
            loss = after
        return records

    def _run_step(self, step, apply, names, params, now, candidates, probe, never_zero, span) -> list[dict]:
        """The budget step over the near options (every option's stored bits measured under --budget-on stored)."""
        target, tol = self.config.target_bits, self.config.budget_tolerance
        if self.config.budget_on == "stored":
            # narrowed on an estimate (b magnitude bits and a sign), each option's stored bits then measured
            near = narrow_candidates(
                names, params, now, candidates, span, target, tol, never_zero, estimate=lambda b: b + 1 if b else 0
            )
            return step(
                names,
                params,
                now,
                near,
                apply,
                probe,
                target,
                tol,
                never_zero,
                counted=self.full_width_stored_bits,
                wider={n: list(c) for n, c in candidates.items()},
            )
        candidates = narrow_candidates(names, params, now, candidates, span, target, tol, never_zero)
        return step(names, params, now, candidates, apply, probe, target, tol, never_zero)

    @torch.no_grad()
    def _exact_weight(self, name: str) -> torch.Tensor:
        return self.layers[name].weight_quantizer.exact_weight()

    def _never_zero(self, names: list[str]) -> list[str]:
        """Layers a budget step may not put at 0 bits: every layer unless ``allow_zero_bits``, and
        then still the output layer (at 0 bits the logits are its bias alone, which a probe of
        a half-trained model can measure as an improvement)."""
        return names[-1:] if self.config.allow_zero_bits else list(names)

    def report_notes(self) -> list[str]:
        """Markdown sections the method adds to report.md (e.g. how its scheme evolved)."""
        return []

    def quantizers(self) -> dict[str, WeightQuantizer]:
        return {name: layer.weight_quantizer for name, layer in self.layers.items()}

    def layer_bits(self) -> dict[str, int | float]:
        return {name: q.nominal_bits() for name, q in self.quantizers().items()}

    def search_target(self) -> float | None:
        """The nominal average a search's own regulariser aims for: ``target_bits``, or under a ceiling on
        stored bits one bit less (a sign on top of every nonzero layer's magnitude bits); the budget step
        then meets the stored ceiling as measured."""
        target = self.config.target_bits
        if target is not None and self.config.budget_on == "stored":
            return max(target - 1.0, 0.0)
        return target

    def budget_average(self, full_width: bool = False) -> float:
        """The average ``target_bits`` caps: nominal bits, or with ``budget_on`` stored the stored code bits (as
        the codes are now, or with ``full_width`` as :meth:`full_width_stored_bits` counts them: the budget step's
        count)."""
        if self.config.budget_on == "stored":
            total = sum(layer.params for layer in self.layers.values())
            count = self.full_width_stored_bits if full_width else self.stored_bits
            return sum(count(n) * layer.params for n, layer in self.layers.items()) / max(total, 1)
        return self.average_bits()

    @torch.no_grad()
    def stored_bits(self, name: str) -> float:
        """Bits per weight the packed file stores for layer ``name`` as it is now: its packed fields
        (sign included, padded to whole bytes), its step and any code table, exactly what ``mpq inspect``
        measures on the file. A binary-basis layer (ALQ) has no such count."""
        codes, step = self.layers[name].weight_quantizer.exact_codes()
        return 8 * plan_codes(codes, steps=step.numel()).payload_bytes(codes.numel()) / max(codes.numel(), 1)

    @torch.no_grad()
    def full_width_stored_bits(self, name: str) -> float:
        """What layer ``name`` stores once its codes use every bit of its nominal width (its magnitude bits and a
        sign; at least what it stores now): the budget step's count under ``--budget-on stored``. Counting the
        codes as they are would let an option that adds bits without changing the codes yet look free, and the
        training after the step fills them (a CSQ layer's second stage trains on its whole k-bit grid): in a
        resnet20 search with a 3.05-bit ceiling the step raised 11 layers by 2 bits at no counted cost and the file
        stored 3.69 bits per weight."""
        now = self.stored_bits(name)
        bits = self.layer_bits()[name]
        if self.bits_convention != SIGN_EXCLUDED or not bits:
            return now
        codes, step = self.layers[name].weight_quantizer.exact_codes()
        # codes filling -(2^bits - 1)..2^bits - 1 are int fields of bits + 1 (no table can beat them): their plan
        count = codes.numel()
        wide = 8 * CodesPlan("int", int(bits) + 1, 0, steps=step.numel()).payload_bytes(count) / max(count, 1)
        return max(now, wide)

    def average_bits(self) -> float:
        """Nominal bits averaged over quantized weights, weighted by each layer's parameters."""
        total = sum(layer.params for layer in self.layers.values())
        bits = self.layer_bits()
        return sum(bits[n] * layer.params for n, layer in self.layers.items()) / max(total, 1)

    @torch.no_grad()
    def layer_codes(self) -> dict[str, LayerCodes]:
        """Each layer's exact weight in its quantizer's form (``WeightQuantizer.weight_form``), on the CPU."""
        return {name: FORMS[q.weight_form].capture(q, q.nominal_bits()) for name, q in self.quantizers().items()}

    # -- several processes (torchrun): what the engine must reduce or compare ---------------------------
    def distributed_gradients(self) -> list[torch.Tensor]:
        """Tensors that are not parameters but whose ``.grad`` the method's step reads (DDP averages only
        the parameters'); the engine averages these gradients over ranks after every backward pass."""
        return []

    @torch.no_grad()
    def agreement_tensors(self) -> list[torch.Tensor]:
        """What every rank must hold alike after an epoch besides the parameters: each layer's exact
        codes and step (or binary basis) and its bits. The engine compares a hash of them."""
        out = []
        for lc in self.layer_codes().values():
            out += [*lc.form.agreement(lc), torch.tensor(float(lc.nominal_bits))]
        return out

    def state_dict(self) -> dict:
        """JSON-able state beyond the model's tensors."""
        return {"phase": self.phase.value}

    def load_state_dict(self, state: dict) -> None:
        self.phase = Phase(state["phase"])
