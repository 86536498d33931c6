"""Statistics over seeds for ``mpq sweep --seeds``: mean ± std, and a paired difference with its interval
and an exact p-value. Pure functions of lists of numbers (no torch, no files).

The interval is Student's t on the paired differences (exact when the differences are normal). A
percentile bootstrap over 3 seeds is not used: it has only 10 distinct resamples of the mean and its
interval excludes zero whenever all differences share a sign, which the sign-flip test (below) puts at
p = 0.25. The p-value is the exact two-sided sign-flip (paired permutation) test, which assumes only that
a difference is as likely to be +d as -d under "no effect"; with n pairs the smallest p it can give is
2/2^n (0.25 for 3 seeds, 0.0625 for 5), so a few seeds can never make it small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import MpqError

# 2^n sign patterns are enumerated: 2^20 sums is about a second; more seeds than this is not a sweep's scale
MAX_EXACT_PAIRS = 20


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n - 1 in the denominator; ``None`` for one value)."""

    n: int
    mean: float
    std: float | None


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` paired element by element (by seed in a sweep).

    Args:
        n: pairs.
        mean: mean difference.
        std: sample standard deviation of the differences (``None`` with one pair).
        low, high: the ``level`` Student t interval of the mean difference (``None`` with one pair).
        p: exact two-sided sign-flip p-value (``None`` with one pair).
        p_min: the smallest p that n pairs can give, 2/2^n.
        level: the interval's coverage.
    """

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    p: float | None
    p_min: float | None
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def spread(values: list[float]) -> Spread:
    """Mean ± sample standard deviation of ``values`` (at least one)."""
    if not values:
        raise MpqError("no values to average")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(n, mean, std)


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float]:
    """The two-sided ``level`` Student t interval of the mean of ``diffs`` (at least two): mean ± t * s / sqrt(n).
    With every difference equal the interval is that point (s = 0)."""
    from scipy.stats import t

    s = spread(diffs)
    if s.std is None:
        raise MpqError("an interval needs at least two pairs")
    half = float(t.ppf(0.5 + level / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return s.mean - half, s.mean + half


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip p-value of ``diffs``: the share of the 2^n ways of flipping their signs
    whose sum is at least as far from zero as the observed sum (the observed one included)."""
    n = len(diffs)
    if not 1 <= n <= MAX_EXACT_PAIRS:
        raise MpqError(f"the exact sign-flip test takes 1 to {MAX_EXACT_PAIRS} pairs, got {n}")
    magnitudes = [abs(float(d)) for d in diffs]
    observed = abs(math.fsum(diffs))
    # sums equal in exact arithmetic may differ in the last bits once the signs are reordered
    tol = 1e-9 * max(1.0, math.fsum(magnitudes))
    sums = [0.0]
    for m in magnitudes:  # every signed sum, 2^n of them
        sums = [s + m for s in sums] + [s - m for s in sums]
    return sum(1 for s in sums if abs(s) >= observed - tol) / len(sums)


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> PairedDifference:
    """``a[i] - b[i]`` summarised: mean, std, the t interval and the sign-flip p (the last three need two pairs)."""
    if len(a) != len(b) or not a:
        raise MpqError(f"a paired difference needs equally many values on each side, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    s = spread(diffs)
    if s.n < 2:
        return PairedDifference(s.n, s.mean, None, None, None, None, None, level)
    low, high = t_interval(diffs, level)
    return PairedDifference(s.n, s.mean, s.std, low, high, sign_flip_p(diffs), 2 / 2**s.n, level)
