"""The weight forms registry: each form's run tensors encode to a packed layer that decodes to exactly the
weight the form describes, and the questions the rest of mpq asks a form have the answers they must."""

import pytest
import torch

from mpq_cli.errors import MpqError
from mpq_cli.forms import FORMS, LayerCodes, get_form, inferred_form
from mpq_cli.packing.encodings import decode_weight
from mpq_cli.quant.basis import BasisForm
from mpq_cli.quant.primitives import dequantize


def codes_layer(shape=(6, 4, 3, 3), seed=0, zero=False):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.zeros(shape, dtype=torch.int32) if zero else torch.randint(-7, 8, shape, generator=gen).int()
    return LayerCodes(codes, torch.tensor(0.0123), 3)


def basis_layer(groups=6, planes=3, elements=36, seed=0, used=None):
    gen = torch.Generator().manual_seed(seed)
    signs = torch.rand(groups, planes, elements, generator=gen) > 0.5
    bits = torch.full((groups,), planes) if used is None else torch.tensor(used)
    coords = torch.rand(groups, planes, generator=gen) * (torch.arange(planes) < bits[:, None])
    return LayerCodes(None, None, float(bits.float().mean()), basis=BasisForm(signs, coords, bits, (0, 1, 2, 3)))


@pytest.mark.parametrize("lc", [codes_layer(), codes_layer(zero=True), basis_layer(), basis_layer(used=[0] * 6)])
def test_a_form_encodes_its_run_tensors_to_exactly_its_weight(lc):
    shape = (6, 4, 3, 3)
    form = lc.form
    run = form.run_tensors("conv", lc)
    assert inferred_form("conv", run) is form and get_form(form.name) is form
    encoded = form.encode("run", "conv", shape, run)
    decoded = decode_weight(encoded.encoding, encoded.fields, encoded.tensors, shape)
    expected = dequantize(lc.codes, lc.step) if lc.basis is None else lc.basis.weight(shape)
    assert torch.equal(decoded.view(torch.int32), expected.reshape(shape).view(torch.int32))


def test_the_questions_a_form_answers():
    assert FORMS["codes"].is_empty(codes_layer(zero=True)) and not FORMS["codes"].is_empty(codes_layer())
    assert FORMS["basis"].is_empty(basis_layer(used=[0] * 6)) and not FORMS["basis"].is_empty(basis_layer())
    sizes = FORMS["basis"].scheme_sizes(basis_layer(used=[1, 2, 3, 0, 0, 0]), 6 * 36)
    assert (sizes.stored_bits, sizes.scales, sizes.index_bytes) == (6 * 36 / (6 * 36), 6, 6)
    assert FORMS["codes"].scheme_sizes(codes_layer(), 216).stored_bits == 4  # codes in [-7, 7]: 3 bits + sign
    codes, step = FORMS["codes"].dequantize_pair("conv", FORMS["codes"].run_tensors("conv", codes_layer()))
    assert torch.equal(codes.float() * step, dequantize(codes_layer().codes, codes_layer().step))
    assert isinstance(FORMS["basis"].dequantize_pair("conv", {}), str)  # ONNX has no operator for bases


def test_a_run_naming_an_unknown_form_is_refused():
    with pytest.raises(MpqError, match="unknown weight form 'planes'"):
        get_form("planes")
    with pytest.raises(MpqError, match="has no codes for layer 'conv'"):
        FORMS["codes"].encode("run", "conv", (2, 2), {})


def test_every_shipped_quantizer_names_a_registered_form():
    from mpq_cli.methods import METHODS  # noqa: F401  (registers the methods and their quantizers)
    from mpq_cli.methods.base import WeightQuantizer

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    forms = {q.weight_form for q in subclasses(WeightQuantizer)}
    assert forms <= set(FORMS) and forms >= {"codes", "basis"}
