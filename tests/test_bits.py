import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_cli.quant.bits import bit_values, canonicalize_codes, from_bit_planes, to_bit_planes


def test_bit_planes_worked_example():
    # 5 = 0b101 -> pos bits 0 and 2; -6 = -(0b110) -> neg bits 1 and 2 (LSB first)
    pos, neg = to_bit_planes(torch.tensor([5, -6, 0]), 3)
    assert pos.int().tolist() == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert neg.int().tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 0]]


@settings(max_examples=50, deadline=None)
@given(n_bits=st.integers(1, 12), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_bit_planes_round_trip(n_bits, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    limit = 2**n_bits - 1
    codes = torch.randint(-limit, limit + 1, shape, generator=gen)
    pos, neg = to_bit_planes(codes, n_bits)
    assert not (pos & neg).any()
    assert torch.equal(from_bit_planes(pos, neg), codes)


def test_bit_planes_reject_overflow():
    with pytest.raises(ValueError):
        to_bit_planes(torch.tensor([8]), 3)


def test_mask_selects_bits():
    pos, neg = to_bit_planes(torch.tensor([7, -7]), 3)
    assert from_bit_planes(pos, neg, torch.tensor([1, 0, 1])).tolist() == [5, -5]


def test_bit_values():
    assert bit_values(4).tolist() == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    "codes,shift,bits",
    [
        ([0, 0], 0, 0),
        ([1, -3, 2], 0, 2),
        ([32, -96, 224], 5, 3),  # bits {5,6,7} selected: 3 magnitude bits after shifting
        ([9, -8, 1], 0, 4),  # bits {0,3}: not contiguous, costs 4 magnitude bits
        ([-4, 12], 2, 2),
    ],
)
def test_canonicalize_codes(codes, shift, bits):
    reduced, got_shift, got_bits = canonicalize_codes(torch.tensor(codes))
    assert (got_shift, got_bits) == (shift, bits)
    assert torch.equal(reduced * 2**got_shift, torch.tensor(codes))


# -- round_to_bits against a brute-force reference (issue 13) -------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_round_to_bits_picks_the_least_squared_error_block(seed, bits):
    from mpq_cli.quant.bits import round_to_bits

    gen = torch.Generator().manual_seed(seed)
    codes = (torch.randn(200, generator=gen) * 40).round().clamp(-255, 255).to(torch.int64)
    new, shift = round_to_bits(codes, bits, 8)
    step, limit = 2**shift, 2**bits - 1
    assert bool((new % step == 0).all()) and int(new.abs().max()) <= limit * step
    top = max(int(codes.abs().max()).bit_length() - 1, bits - 1)
    best = None
    for s in range(0, max(min(top - bits + 1, 8 - bits), 0) + 1):  # every block at or below the top bit
        cand = [max(-limit, min(limit, round(c / 2**s))) * 2**s for c in codes.tolist()]
        err = sum((a - b) ** 2 for a, b in zip(cand, codes.tolist(), strict=True))
        if best is None or err < best[0]:
            best = (err, s, cand)
    assert shift == best[1] and new.tolist() == best[2]


def test_round_to_bits_zero_bits_is_all_zero():
    from mpq_cli.quant.bits import round_to_bits

    new, shift = round_to_bits(torch.tensor([3, -7, 1]), 0, 8)
    assert new.tolist() == [0, 0, 0] and shift == 0
