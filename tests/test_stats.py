"""mpq_cli.stats against hand-computed cases and independent references (brute force, scipy's paired t-test)."""

import itertools
import math

import pytest

from mpq_cli.errors import MpqError
from mpq_cli.stats import paired_difference, sign_flip_p, spread, t_interval


def test_spread_is_the_mean_and_the_sample_std():
    assert spread([1.0, 2.0, 3.0]) == pytest.approx(spread([3.0, 1.0, 2.0]))
    s = spread([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)  # sum of squares 2, over n - 1 = 2
    assert spread([5.0]).std is None


@pytest.mark.parametrize(
    "diffs, p",
    [
        ([1.0, 2.0, 3.0], 0.25),  # only +-(1+2+3) reach |6|: 2 of 8
        ([0.1, 0.2, 0.3], 0.25),  # the same in floats whose sums differ in the last bits by order
        ([-1.0, -2.0, -3.0], 0.25),  # two-sided
        ([1.0, -2.0, 3.0], 0.75),  # |sum| 2: 6, 2, -4, 4, -2, -6 of {6, 0, 2, -4, 4, -2, 0, -6}
        ([1.0] * 5, 2 / 32),  # five seeds all one way: still above 0.05
        ([1.0] * 6, 2 / 64),
        ([0.0, 0.0], 1.0),
    ],
    ids=["3-positive", "3-float", "3-negative", "mixed", "5-positive", "6-positive", "zeros"],
)
def test_sign_flip_p_by_hand(diffs, p):
    assert sign_flip_p(diffs) == pytest.approx(p)


@pytest.mark.parametrize("diffs", [[0.3, -1.2, 2.5, 0.7, 0.1], [1.5, 1.5, -0.5, 2.0]], ids=["five", "ties"])
def test_sign_flip_p_equals_brute_force(diffs):
    observed = abs(sum(diffs))
    flips = list(itertools.product([1, -1], repeat=len(diffs)))
    hits = sum(abs(sum(s * abs(d) for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12 for signs in flips)
    assert sign_flip_p(diffs) == pytest.approx(hits / len(flips))


def test_sign_flip_refuses_too_many_pairs():
    with pytest.raises(MpqError, match="1 to 20 pairs"):
        sign_flip_p([1.0] * 21)


def test_t_interval_by_hand_and_against_scipys_paired_test():
    low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729749462 / math.sqrt(3)  # t(0.975, 2 df) from a table, s = 1
    assert (low, high) == pytest.approx((2 - half, 2 + half))
    from scipy.stats import ttest_rel

    a, b = [71.2, 70.4, 72.0, 69.9], [70.1, 70.5, 70.8, 69.0]
    ci = ttest_rel(a, b).confidence_interval(0.95)
    assert paired_difference(a, b).low == pytest.approx(ci.low)
    assert paired_difference(a, b).high == pytest.approx(ci.high)


def test_paired_difference():
    d = paired_difference([91.0, 92.0, 93.0], [90.0, 90.0, 90.0])  # differences 1, 2, 3
    assert (d.n, d.mean, d.std, d.p, d.p_min) == (3, pytest.approx(2.0), pytest.approx(1.0), 0.25, 0.25)
    assert d.low < 0 < d.high and not d.excludes_zero  # 3 seeds, spread 1: wide
    tight = paired_difference([91.0, 91.1, 90.9], [90.0, 90.0, 90.0])
    assert tight.excludes_zero and tight.low > 0 and tight.p == 0.25  # the t interval can exclude zero at n = 3
    worse = paired_difference([89.0, 88.9, 89.1], [90.0, 90.0, 90.0])
    assert worse.excludes_zero and worse.high < 0
    one = paired_difference([91.0], [90.0])
    assert one.mean == pytest.approx(1.0) and one.low is None and one.p is None and not one.excludes_zero
    with pytest.raises(MpqError):
        paired_difference([1.0, 2.0], [1.0])
