"""The forms an exactly quantized weight takes, behind one registry: integer codes times a step (CSQ, BSQ,
BMPQ, uniform) and sums of binary bases (ALQ).

A form owns everything that depends on it: how a method's quantizer hands its exact weight over
(:meth:`WeightForm.capture`), the tensors a run keeps for it in ``codes.safetensors`` and how they are read
back, the sizes the scheme reports, when a layer has collapsed to nothing, what ranks must agree on, the
packed file's encoding (verified to decode exactly) and what an ONNX graph can hold of it. The rest of mpq
asks the registry (:data:`FORMS`, :func:`form_of`) and never branches on a form, so a new form is a class here,
its encoding in :mod:`mpq_cli.packing.encodings`, and nothing else. (Steps per output channel are not a form of
their own: integer codes carry one step or one per channel, and the packed file records which.)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import MpqError
from .packing.encodings import EncodedWeight, decode_codes, decode_weight, encode_basis, encode_codes, plan_codes
from .quant.basis import BasisForm


@dataclass
class LayerCodes:
    """The exact form of one quantized layer: ``weight == codes * step``, or, when ``basis``
    is set (and ``codes``, ``step`` are None), ``weight == basis.weight(shape)``."""

    codes: torch.Tensor | None
    step: torch.Tensor | None
    nominal_bits: int | float
    basis: BasisForm | None = None

    @property
    def form(self) -> WeightForm:
        return form_of(self)


@dataclass(frozen=True)
class SchemeSizes:
    """A layer's sizes as the scheme reports them: stored bits per weight (the packed fields), float32
    scales beside them, and index bytes (per-group widths)."""

    stored_bits: float
    scales: int
    index_bytes: int


class WeightForm(ABC):
    name: ClassVar[str]
    # the tensors a run keeps per layer in codes.safetensors, by suffix (LAYER.SUFFIX)
    run_suffixes: ClassVar[tuple[str, ...]]

    @abstractmethod
    def capture(self, quantizer, nominal_bits) -> LayerCodes:
        """The exact weight of a method's quantizer, on the CPU."""

    @abstractmethod
    def run_tensors(self, layer: str, lc: LayerCodes) -> dict[str, torch.Tensor]:
        """The tensors ``codes.safetensors`` keeps for the layer."""

    @abstractmethod
    def scheme_sizes(self, lc: LayerCodes, params: int) -> SchemeSizes: ...

    @abstractmethod
    def is_empty(self, lc: LayerCodes) -> bool:
        """Every weight zero: the layer outputs its bias alone."""

    @abstractmethod
    def agreement(self, lc: LayerCodes) -> list[torch.Tensor]:
        """What every rank must hold alike for the layer (compared by hash under torchrun)."""

    @abstractmethod
    def encode(self, source: str, layer: str, shape: tuple[int, ...], run: dict[str, torch.Tensor]) -> EncodedWeight:
        """The packed file's encoding of the layer from the run's tensors, checked to decode to exactly the
        weight the run evaluated (``source`` names the run in errors)."""

    @abstractmethod
    def dequantize_pair(self, layer: str, run: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | str:
        """``(integer codes, step)`` whose product is the weight, for an ONNX ``DequantizeLinear``; or why the
        form has none (the exporter then keeps the decoded float weight and says so)."""


class IntegerCodes(WeightForm):
    """``weight = codes * step``: signed integer codes and float32 steps, one for the layer (a 0-d ``step``,
    granularity ``tensor``) or one per output channel (``(C,)``, the weight's first axis: ``channel``)."""

    name = "codes"
    run_suffixes = ("codes", "step")

    def capture(self, quantizer, nominal_bits) -> LayerCodes:
        codes, step = quantizer.exact_codes()
        step = step.detach().cpu()
        # a quantizer holds a per-channel step as (C, 1, ..., 1), to multiply the weight; runs and files as (C,)
        if step.dim() > 0 and step.numel() == codes.shape[0] and all(d == 1 for d in step.shape[1:]):
            step = step.reshape(-1)
        elif step.numel() == 1:
            step = step.reshape(())
        else:
            raise MpqError(
                f"internal error: a step of shape {list(step.shape)} for codes of shape {list(codes.shape)} "
                "(one step, or one per output channel as (C, 1, ..., 1))"
            )
        return LayerCodes(codes.detach().cpu(), step, nominal_bits)

    def run_tensors(self, layer: str, lc: LayerCodes) -> dict[str, torch.Tensor]:
        return {f"{layer}.codes": lc.codes.to(torch.int32), f"{layer}.step": lc.step.to(torch.float32)}

    def scheme_sizes(self, lc: LayerCodes, params: int) -> SchemeSizes:
        plan = plan_codes(lc.codes, lc.step.numel())
        return SchemeSizes(plan.width, plan.extra_values, 0)

    def is_empty(self, lc: LayerCodes) -> bool:
        return not bool(lc.codes.any())

    def agreement(self, lc: LayerCodes) -> list[torch.Tensor]:
        return [lc.codes, lc.step]

    @staticmethod
    def _run_pair(source: str, layer: str, run: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A run's codes and step of ``layer``, the step checked to be 0-d or one per output channel."""
        try:
            codes, step = run[f"{layer}.codes"], run[f"{layer}.step"]
        except KeyError:
            raise MpqError(f"{source}/codes.safetensors has no codes for layer {layer!r}") from None
        if not (step.dim() == 0 or (step.dim() == 1 and codes.dim() >= 1 and step.shape[0] == codes.shape[0])):
            raise MpqError(
                f"{source}/codes.safetensors: the step of {layer!r} has shape {list(step.shape)}; codes of shape "
                f"{list(codes.shape)} need one step ([]) or one per output channel ([{codes.shape[0]}])"
            )
        return codes, step

    def encode(self, source, layer, shape, run) -> EncodedWeight:
        codes, step = self._run_pair(source, layer, run)
        if tuple(codes.shape) != shape:
            raise MpqError(
                f"{source}: codes of {layer!r} have shape {list(codes.shape)}, the scheme says {list(shape)}"
            )
        encoded = encode_codes(codes, step)
        # the file decodes to dequantize(codes, step), so equal codes and steps mean bit-identical weights
        decoded, decoded_step = decode_codes(encoded.encoding, encoded.fields, encoded.tensors, shape)
        if not (
            torch.equal(decoded, codes.to(torch.int32))
            and (
                encoded.encoding == "zero"
                or (
                    decoded_step.shape == step.shape
                    and torch.equal(decoded_step.view(torch.int32), step.to(torch.float32).view(torch.int32))
                )
            )
        ):
            raise MpqError(f"internal error: layer {layer!r} does not decode to its exact codes")
        return encoded

    def dequantize_pair(self, layer, run):
        from .quant.bits import canonicalize_codes

        codes, step = self._run_pair("the run", layer, run)
        # as the packed file: codes sharing a power-of-two factor are divided by it and the step multiplied
        # (exact in float32), so a layer on bits {5, 6, 7} stores 3-bit codes, not 8-bit ones; a step per
        # output channel stays one per channel ((C,), DequantizeLinear's axis 0)
        codes, shift, _ = canonicalize_codes(codes.to(torch.int64))
        return codes, step * 2.0**shift


class BinaryBases(WeightForm):
    """``weight = sum_i coords_i * signs_i`` per group (ALQ): sign planes, float32 coordinates, per-group widths."""

    name = "basis"
    run_suffixes = ("signs", "coords", "group_bits", "perm")

    def capture(self, quantizer, nominal_bits) -> LayerCodes:
        basis = quantizer.exact_basis()
        cpu = BasisForm(basis.signs.cpu(), basis.coords.detach().cpu(), basis.group_bits.cpu(), basis.perm)
        return LayerCodes(None, None, nominal_bits, basis=cpu)

    def run_tensors(self, layer: str, lc: LayerCodes) -> dict[str, torch.Tensor]:
        return lc.basis.to_tensors(layer)

    def scheme_sizes(self, lc: LayerCodes, params: int) -> SchemeSizes:
        # a sign bit per weight and basis, a float32 coordinate per basis, a byte per group's width
        used = int(lc.basis.group_bits.sum())
        if used == 0:
            return SchemeSizes(0, 0, 0)
        return SchemeSizes(used * lc.basis.group_size / params, used, lc.basis.group_bits.numel())

    def is_empty(self, lc: LayerCodes) -> bool:
        return int(lc.basis.group_bits.sum()) == 0

    def agreement(self, lc: LayerCodes) -> list[torch.Tensor]:
        return [lc.basis.signs, lc.basis.coords, lc.basis.group_bits]

    def encode(self, source, layer, shape, run) -> EncodedWeight:
        try:
            basis = BasisForm.from_tensors(run, layer)
        except KeyError:
            raise MpqError(f"{source}/codes.safetensors lacks the bases of layer {layer!r}") from None
        groups, _, elements = basis.signs.shape
        if groups * elements != math.prod(shape) or sorted(basis.perm) != list(range(len(shape))):
            raise MpqError(
                f"{source}: the bases of {layer!r} ({groups} groups of {elements}) do not fit shape {list(shape)}"
            )
        encoded = encode_basis(basis.signs, basis.coords, basis.group_bits, basis.perm)
        # the model evaluated basis.weight(shape); the decoder sums the same planes in the same order
        decoded = decode_weight(encoded.encoding, encoded.fields, encoded.tensors, shape)
        if not torch.equal(decoded.view(torch.int32), basis.weight(shape).view(torch.int32)):
            raise MpqError(f"internal error: layer {layer!r} does not decode to its exact weight")
        return encoded

    def dequantize_pair(self, layer, run):
        return "FP32 (ALQ binary bases, decoded: ONNX has no operator for them)"


FORMS: dict[str, WeightForm] = {form.name: form for form in (IntegerCodes(), BinaryBases())}


def form_of(lc: LayerCodes) -> WeightForm:
    return FORMS["basis" if lc.basis is not None else "codes"]


def get_form(name, source: str = "codes.safetensors") -> WeightForm:
    if name not in FORMS:
        raise MpqError(f"{source} records an unknown weight form {str(name)[:40]!r} (known: {', '.join(FORMS)})")
    return FORMS[name]


def inferred_form(layer: str, run: dict[str, torch.Tensor]) -> WeightForm:
    """The form of a layer in a run saved before forms were recorded: the one whose tensors it holds."""
    for form in FORMS.values():
        if f"{layer}.{form.run_suffixes[0]}" in run:
            return form
    return FORMS["codes"]
