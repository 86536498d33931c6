"""Which layers are quantized, and the wrapper that gives them a method's weight.

Every ``nn.Conv2d`` and ``nn.Linear`` is quantized by default (first and last
included, as CSQ does); BatchNorm and biases stay FP32. A :class:`LayerSelection`
keeps layers in FP (``--keep-fp PATTERN``), fixes their bits (``--fix-bits NAME=BITS``)
or fixes the first and last layer's (``--edge-bits BITS``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import MpqError

QUANTIZABLE = (nn.Conv2d, nn.Linear)
# Normalisation layers hold a scale and a shift per channel; they stay FP32 by design, and
# listings count them apart from the weights a user might expect to be quantized.
NORMALIZATION = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass
class LayerSelection:
    """Per-layer overrides shared by every method.

    Args:
        keep_fp: glob patterns (``fnmatch``) of layer names kept in FP32.
        fix_bits: glob pattern -> bits; the first matching pattern wins.
        edge_bits: bits of the first and last Conv2d/Linear layer in module order (as ``mpq models
            --layers`` lists them), fixed like ``fix_bits`` and counted in the average like any fixed
            layer (the papers' 8-bit first and last layers); ``None``: off. A ``fix_bits`` pattern that
            matches an edge wins over it, and an edge kept FP stays FP (the next layer does not become one).
        edge_names: every name of the edge layers, filled by :meth:`with_edges` (``Method.prepare``
            does it); ``None`` until then.
        scheme: ``--scheme``: a run directory or ``scheme.json`` whose per-layer bits the method trains
            under (the scheme transplant); :meth:`with_scheme` turns it into ``fix_bits`` (one exact name
            per layer) and ``keep_fp``, and every quantized layer must then have its bits from it.
    """

    keep_fp: list[str] = field(default_factory=list)
    fix_bits: dict[str, int] = field(default_factory=dict)
    edge_bits: int | None = None
    edge_names: frozenset[str] | None = None
    scheme: str | None = None

    def __post_init__(self) -> None:
        for pattern, bits in self.fix_bits.items():
            if not 0 <= int(bits) <= 16:
                raise MpqError(f"--fix-bits {pattern}={bits}: bits must be in 0..16")
        edge = self.edge_bits
        if edge is not None and (not isinstance(edge, int) or isinstance(edge, bool) or not 1 <= edge <= 16):
            raise MpqError(f"--edge-bits must be a whole number in 1..16, got {self.edge_bits}")

    def is_fp(self, *names: str) -> bool:
        """Whether a layer (by any of its names: a module can be registered under several) stays FP."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.keep_fp for name in names)

    def fixed_bits(self, *names: str) -> int | None:
        """The bits of the first pattern that matches any of the layer's names, else ``edge_bits`` for an
        edge layer (once :meth:`with_edges` resolved them), or None."""
        for pattern, bits in self.fix_bits.items():
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                return int(bits)
        if self.edge_bits is not None and self.edge_names and any(name in self.edge_names for name in names):
            return int(self.edge_bits)
        return None

    def with_edges(self, model: nn.Module) -> LayerSelection:
        """This selection with the edges of ``model`` resolved (itself when there is nothing to resolve).
        Call it before any layer is wrapped: the edges are the first and last layer still holding its FP
        weight."""
        if self.edge_bits is None or self.edge_names is not None:
            return self
        layers, paths = list(quantizable_layers(model).values()), module_paths(model)
        edges = [layers[0], layers[-1]] if layers else []
        names = frozenset(p for m in edges if not self.is_fp(*paths[id(m)]) for p in paths[id(m)])
        return replace(self, edge_names=names)

    def with_scheme(self, method: str) -> LayerSelection:
        """This selection with ``scheme``'s layers as ``method`` counts bits: each layer's bits fixed under its
        exact name, its FP layers kept FP (itself without a scheme)."""
        if self.scheme is None:
            return self
        if self.fix_bits or self.edge_bits is not None:
            raise MpqError("--scheme fixes every layer's bits: give it without --fix-bits or --edge-bits")
        from .scheme import Scheme

        bits = Scheme.load_from(self.scheme).transplanted_bits(method)
        fixed = {_literal(name): b for name, b in bits.items() if b is not None}
        fp = [_literal(name) for name, b in bits.items() if b is None]
        return replace(self, keep_fp=[*self.keep_fp, *fp], fix_bits=fixed)

    def check_scheme_covers(self, layers: dict[str, tuple[str, ...]]) -> None:
        """With ``--scheme``, every quantized layer (name -> all its names) has its bits from the scheme."""
        if self.scheme is None:
            return
        missing = [n for n, names in layers.items() if not self.is_fp(*names) and self.fixed_bits(*names) is None]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise MpqError(
                f"--scheme {self.scheme} gives no bits for layer {', '.join(missing[:3])}{more} of this model"
            )

    def to_dict(self) -> dict:
        """The run record's ``selection`` (``edge_bits`` and ``scheme`` only when set: older runs keep their
        fingerprints)."""
        out = {"keep_fp": list(self.keep_fp), "fix_bits": dict(self.fix_bits)}
        if self.edge_bits is not None:
            out["edge_bits"] = int(self.edge_bits)
        if self.scheme is not None:
            out["scheme"] = str(self.scheme)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> LayerSelection:
        return cls(
            keep_fp=list(d["keep_fp"]),
            fix_bits=dict(d["fix_bits"]),
            edge_bits=d.get("edge_bits"),
            scheme=d.get("scheme"),
        )

    def check_patterns(self, names: list[str]) -> None:
        """A pattern that matches no layer is a typo: say so instead of ignoring it."""
        for pattern in [*self.keep_fp, *self.fix_bits]:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise MpqError(f"layer pattern {pattern!r} matches no Conv2d/Linear layer (see `mpq models --layers`)")

    @staticmethod
    def parse_fix_bits(items: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in items:
            m = re.fullmatch(r"\s*([^=]+?)\s*=\s*(\d+)\s*", item)
            if not m:
                raise MpqError(f"--fix-bits expects NAME=BITS, got {item!r}")
            out[m.group(1)] = int(m.group(2))
        return out


# Modules that read a child Linear's weight themselves instead of calling it (MultiheadAttention hands
# out_proj.weight to F.multi_head_attention_forward): a wrapped child would never be applied, so it stays FP.
READ_BY_PARENT = (nn.MultiheadAttention,)
READ_BY_PARENT_REASON = "its parent reads the weight directly (MultiheadAttention): stays FP"


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All Conv2d/Linear layers in module order that still own an FP weight (not yet wrapped) and that
    run through their own forward (not a child whose parent reads its weight, :data:`READ_BY_PARENT`)."""
    read_directly = {id(child) for m in model.modules() if isinstance(m, READ_BY_PARENT) for child in m.children()}
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE) and isinstance(m.weight, torch.Tensor) and id(m) not in read_directly
    }


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which the model registers each module (by ``id``): a module can have several."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def unquantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules in module order that own a parameter themselves and are not Conv2d/Linear (a Conv1d,
    a ConvTranspose2d, an Embedding, normalisation, a user's module with its own ``nn.Parameter``):
    their parameters stay FP32 whatever the method."""
    quantizable = set(quantizable_layers(model))
    return {
        name: m
        for name, m in model.named_modules()
        if name not in quantizable and next(m.parameters(recurse=False), None) is not None
    }


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear whose weight is produced by a method's weight quantizer.

    The original module is kept as ``self.layer`` with its FP weight removed, so a quantized
    model holds no shadow FP weight unless the method itself keeps one (e.g. the uniform
    baseline's latent weight). The layer's own ``forward`` runs, with the method's weight in
    the place of its FP weight: a user's subclass that pads in its forward (TensorFlow's SAME
    padding), standardises its weight or reshapes its input computes what it computes in FP,
    and what the packed file's model computes with the decoded weight.
    """

    def __init__(self, layer: nn.Module, weight_quantizer: nn.Module, act_quantizer: nn.Module | None = None):
        super().__init__()
        self.weight_shape = tuple(layer.weight.shape)
        self.weight_strides = tuple(layer.weight.stride())
        layer.register_parameter("weight", None)
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer if act_quantizer is not None else nn.Identity()

    @property
    def params(self) -> int:
        return int(torch.Size(self.weight_shape).numel())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self.act_quantizer(x)
        # The weight goes into the module's parameter slot for the length of one call: what
        # torch.func.functional_call does, without its per-call bookkeeping (a step calls this once per
        # layer). Not torch.nn.utils.parametrize: it derives a weight from a stored original, and
        # the methods build theirs from their own parameters (bit planes, codes, binary bases).
        weight = self.weight_quantizer()
        if weight.stride() != self.weight_strides:
            # the FP weight's layout, which the packed file's model gets when placed the same way: a kernel
            # with one channel per group (depthwise) has NCHW and NHWC strides that differ in value only, and
            # oneDNN picks its kernel, so the last bit of a sum, from them
            weight = torch.empty_strided(
                self.weight_shape, self.weight_strides, dtype=weight.dtype, device=weight.device
            ).copy_(weight)
        slots = self.layer._parameters
        slots["weight"] = weight
        try:
            return self.layer(x, *args, **kwargs)  # a user's layer may take more than its input
        finally:
            slots["weight"] = None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def _literal(name: str) -> str:
    """A glob pattern (``fnmatch``) that matches exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)
