"""Bit packing and the per-layer encodings: exact round trips, sizes, and refusals."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_cli.packing.bitpack import (
    from_twos_complement,
    pack_bits,
    packed_nbytes,
    to_twos_complement,
    twos_complement_width,
    unpack_bits,
)
from mpq_cli.packing.encodings import decode_codes, decode_weight, encode_basis, encode_codes, plan_codes
from mpq_cli.quant.basis import basis_weight, from_groups, to_groups
from mpq_cli.quant.primitives import dequantize, max_code


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_worked_example_from_the_docstring():
    assert pack_bits(np.array([5, 3, 6]), 3).tolist() == [0x9D, 0x01]
    assert unpack_bits(np.array([0x9D, 0x01], dtype=np.uint8), 3, 3).tolist() == [5, 3, 6]


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 32), data=st.data())
def test_pack_unpack_round_trip(width, data):
    count = data.draw(st.integers(0, 300))
    values = np.array(
        data.draw(st.lists(st.integers(0, (1 << width) - 1), min_size=count, max_size=count)), dtype=np.int64
    )
    packed = pack_bits(values, width)
    assert packed.dtype == np.uint8 and packed.size == packed_nbytes(count, width) == math.ceil(count * width / 8)
    assert np.array_equal(unpack_bits(packed, width, count), values)


@pytest.mark.parametrize("width", range(1, 33))
def test_layout_equals_a_plain_bit_stream(width):
    """Every width against the layout's definition (field j's bit t is stream bit j * width + t, bytes
    little-endian), built with Python integers: independent of NumPy's dtype promotion rules."""
    rng = np.random.default_rng(width)
    values = rng.integers(0, 1 << width, size=70, dtype=np.int64)  # two groups of 32 and a partial one
    values[:3] = (1 << width) - 1  # every bit set, the highest included
    stream = sum(int(v) << (j * width) for j, v in enumerate(values))
    expected = stream.to_bytes(packed_nbytes(values.size, width), "little")
    for fields in (values, values.astype(np.uint64), values.astype(np.uint32 if width > 16 else np.uint16)):
        assert pack_bits(fields, width).tobytes() == expected
    assert np.array_equal(unpack_bits(np.frombuffer(expected, np.uint8), width, values.size), values)


@pytest.mark.parametrize("width", [3, 8, 13, 16, 17, 31, 32])
def test_pack_across_chunk_boundaries(width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 1 << width, size=(1 << 20) + 37, dtype=np.int64)
    assert np.array_equal(unpack_bits(pack_bits(values, width), width, values.size), values)


def test_unpack_refuses_wrong_sizes_and_dirty_padding():
    packed = pack_bits(np.array([1, 2, 3]), 3)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack_bits(packed[:1], 3, 3)
    dirty = packed.copy()
    dirty[-1] |= 0x80
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(dirty, 3, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*2\)"):
        pack_bits(np.array([4]), 2)


@given(st.lists(st.integers(-(1 << 16), (1 << 16) - 1), min_size=1, max_size=50))
def test_twos_complement_round_trip(values):
    width = twos_complement_width(min(values), max(values))
    assert width == 1 or not (-(1 << (width - 2)) <= min(values) and max(values) <= (1 << (width - 2)) - 1)
    fields = to_twos_complement(np.array(values), width)
    assert fields.min() >= 0 and fields.max() < (1 << width)
    assert from_twos_complement(fields, width).tolist() == values


@pytest.mark.parametrize("bits,width", [(1, 2), (2, 3), (3, 4), (8, 9), (16, 17)])
def test_sign_magnitude_codes_cost_bits_plus_sign(bits, width):
    codes = torch.arange(-max_code(bits), max_code(bits) + 1)
    plan = plan_codes(codes)
    assert (plan.encoding, plan.width) == ("int", width)


def test_twos_complement_codes_cost_their_bits():
    """BMPQ's k-bit codes [-2**(k-1), 2**(k-1) - 1] take k bits, not k + 1."""
    assert plan_codes(torch.arange(-8, 8)).width == 4


def test_power_of_two_factor_is_shifted_out():
    codes = torch.tensor([-96, 32, 0, 64, 96])  # CSQ bits {5, 6} selected
    plan = plan_codes(codes)
    assert (plan.encoding, plan.width, plan.shift) == ("int", 3, 5)


def test_non_contiguous_bits_use_a_table():
    """CSQ with bits {0, 3}: codes in {0, +-1, +-7, +-8, +-9}; 4-bit indices beat 5-bit codes."""
    values = torch.tensor([0, 1, -1, 7, -7, 8, -8, 9, -9])
    codes = values[torch.randint(0, 9, (10_000,), generator=torch.Generator().manual_seed(0))]
    encoded = encode_codes(codes, torch.tensor(0.01))
    assert encoded.encoding == "lut" and encoded.fields["width"] == 4
    assert encoded.tensors["table"].tolist() == sorted(values.tolist())
    decoded = decode_weight("lut", encoded.fields, encoded.tensors, (10_000,))
    assert torch.equal(bits_of(decoded), bits_of(dequantize(codes, torch.tensor(0.01))))


def test_all_zero_layer_costs_nothing():
    encoded = encode_codes(torch.zeros(3, 4, dtype=torch.int32), torch.tensor(-0.5))
    assert encoded.encoding == "zero" and encoded.payload_bytes == 0
    decoded = decode_weight("zero", {}, {}, (3, 4))
    assert torch.equal(bits_of(decoded), bits_of(dequantize(torch.zeros(3, 4, dtype=torch.int32), -0.5)))


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(0, 16),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    step=st.floats(-1.0, 1.0, allow_nan=False, width=32).filter(lambda s: s != 0),
    seed=st.integers(0, 2**16),
    sparse=st.booleans(),
)
def test_codes_round_trip_exactly(bits, shape, step, seed, sparse):
    gen = torch.Generator().manual_seed(seed)
    high = max_code(bits)
    codes = torch.randint(-high, high + 1, shape, generator=gen)
    if sparse:
        codes = codes * (torch.rand(shape, generator=gen) < 0.1)
    step = torch.tensor(step, dtype=torch.float32)
    encoded = encode_codes(codes, step)
    plan = plan_codes(codes)
    assert encoded.payload_bytes == plan.payload_bytes(codes.numel())
    assert encoded.payload_bytes <= packed_nbytes(codes.numel(), bits + 1) + 4  # never worse than sign + magnitude
    decoded = decode_weight(encoded.encoding, encoded.fields, encoded.tensors, tuple(shape))
    assert torch.equal(bits_of(decoded), bits_of(dequantize(codes, step)))
    if encoded.encoding != "zero":
        back, back_step = decode_codes(encoded.encoding, encoded.fields, encoded.tensors, tuple(shape))
        assert torch.equal(back.long(), codes) and float(back_step) == float(step)


def _random_basis(seed, shape, perm, groups, max_planes):
    gen = torch.Generator().manual_seed(seed)
    elements = math.prod(shape) // groups
    signs = torch.rand(groups, max_planes, elements, generator=gen) < 0.5
    coords = torch.rand(groups, max_planes, generator=gen) * 0.1
    group_bits = torch.randint(0, max_planes + 1, (groups,), generator=gen)
    return signs, coords, group_bits


@pytest.mark.parametrize(
    "shape,perm,groups",
    [
        ((4, 3, 3, 3), (0, 1, 2, 3), 4),  # channel-wise
        ((4, 3, 3, 3), (0, 1, 2, 3), 12),  # kernel-wise
        ((4, 3, 3, 3), (0, 2, 3, 1), 36),  # pixel-wise: a group is the input channels at one (out, y, x)
        ((10, 24), (0, 1), 30),  # sub-channel-wise linear
    ],
    ids=["channel", "kernel", "pixel", "subchannel"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_basis_round_trip_exactly(shape, perm, groups, seed):
    signs, coords, group_bits = _random_basis(seed, shape, perm, groups, max_planes=4)
    coords = coords * (torch.arange(4) < group_bits.unsqueeze(1))  # unused coordinates are zero
    expected = from_groups(basis_weight(signs, coords, group_bits), shape, perm)
    encoded = encode_basis(signs, coords, group_bits, perm)
    used = int(group_bits.sum())
    elements = math.prod(shape) // groups
    assert encoded.encoding == "basis"
    assert encoded.payload_bytes == packed_nbytes(used * elements, 1) + 4 * used + groups
    decoded = decode_weight("basis", encoded.fields, encoded.tensors, shape)
    assert torch.equal(bits_of(decoded), bits_of(expected))
    assert torch.equal(to_groups(decoded, perm, groups), basis_weight(signs, coords, group_bits))


@pytest.mark.parametrize(
    "encoding,fields,tensors,message",
    [
        (
            "int",
            {"width": 3, "shift": 0},
            {"packed": torch.zeros(1, dtype=torch.uint8), "step": torch.tensor(1.0)},
            "holds 1 bytes",
        ),
        (
            "int",
            {"width": 18, "shift": 0},
            {"packed": torch.zeros(9, dtype=torch.uint8), "step": torch.tensor(1.0)},
            "width",
        ),
        (
            "int",
            {"width": 10, "shift": 9},
            {"packed": torch.zeros(5, dtype=torch.uint8), "step": torch.tensor(1.0)},
            "code range",
        ),
        (
            "int",
            {"width": 2, "shift": 0},
            {"packed": torch.zeros(1, dtype=torch.uint8), "step": torch.tensor(float("nan"))},
            "finite",
        ),
        (
            "lut",
            {"width": 2},
            {
                "packed": torch.tensor([0xFF], dtype=torch.uint8),
                "table": torch.tensor([0, 1, 2], dtype=torch.int32),
                "step": torch.tensor(1.0),
            },
            "exceeds the table",
        ),
        (
            "lut",
            {"width": 2},
            {
                "packed": torch.zeros(1, dtype=torch.uint8),
                "table": torch.tensor([2, 1], dtype=torch.int32),
                "step": torch.tensor(1.0),
            },
            "ascending",
        ),
        ("int", {"width": 2, "shift": 0}, {"packed": torch.zeros(1, dtype=torch.uint8)}, "missing tensor"),
        ("nope", {}, {}, "unknown encoding"),
    ],
    ids=["bytes", "width", "shift", "step", "index", "table", "missing", "encoding"],
)
def test_decoders_refuse_bad_input(encoding, fields, tensors, message):
    with pytest.raises(ValueError, match=message):
        decode_weight(encoding, fields, tensors, (4,))
