import itertools
import random

import pytest

from mpq_cli.budget import choose_options
from mpq_cli.errors import MpqError


def brute_force(options, params, low, high):
    total = sum(params)
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        avg = sum(options[i][k][0] * params[i] for i, k in enumerate(combo)) / total
        if low - 1e-9 <= avg <= high + 1e-9:
            cost = sum(options[i][k][1] for i, k in enumerate(combo))
            if best is None or cost < best[0] - 1e-12:
                best = (cost, combo)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 4)
    options = [
        [(b, rng.uniform(-1, 3)) for b in sorted(rng.sample(range(0, 9), rng.randint(1, 4)))] for _ in range(layers)
    ]
    params = [rng.choice([10, 100, 1000, 5000]) for _ in range(layers)]
    high = rng.uniform(1, 6)
    low = high - 0.5
    expected = brute_force(options, params, low, high)
    if expected is None:
        with pytest.raises(MpqError):
            choose_options(options, params, low, high)
        return
    picks = choose_options(options, params, low, high)
    cost = sum(options[i][k][1] for i, k in enumerate(picks))
    avg = sum(options[i][k][0] * params[i] for i, k in enumerate(picks)) / sum(params)
    assert cost == pytest.approx(expected[0], abs=1e-6)
    assert low - 1e-9 <= avg <= high + 1e-9


def test_infeasible_window_is_a_clear_error():
    with pytest.raises(MpqError, match="no per-layer bit choice"):
        choose_options([[(8, 0.0)], [(8, 0.0)]], [10, 10], 1.9, 2.0)


# -- large models: the window holds to the bit (issue 13) ---------------------------------------------------
def _brute_force_bits(options, params, low_bits, high_bits):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        used = sum(options[i][k][0] * params[i] for i, k in enumerate(combo))
        if low_bits <= used <= high_bits:
            cost = sum(options[i][k][1] for i, k in enumerate(combo))
            if best is None or cost < best[0]:
                best = (cost, combo)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_tens_of_millions_of_weights_stay_within_the_budget_to_the_bit(seed):
    """Layers of millions of weights, a window whose upper edge is exactly some scheme's size (so the
    optimum sits on it): the chosen scheme's exact integer size never exceeds it, and its cost is the
    brute-force optimum."""
    from mpq_cli.budget import choose_options_within

    rng = random.Random(seed)
    params = [rng.randint(1_000_000, 12_000_000) for _ in range(5)]  # 5..60 M weights in all
    options = [[(b, -rng.uniform(0.5, 2.0) * b + rng.uniform(0, 0.01)) for b in (2, 3, 4, 6, 8)] for _ in params]
    edge = [rng.randrange(5) for _ in params]
    high_bits = sum(options[i][k][0] * params[i] for i, k in enumerate(edge))
    low_bits = high_bits - rng.choice([1, 1000, 10**6])
    picks = choose_options_within(options, params, low_bits, high_bits)
    used = sum(options[i][k][0] * params[i] for i, k in enumerate(picks))
    assert low_bits <= used <= high_bits
    expected = _brute_force_bits(options, params, low_bits, high_bits)
    assert sum(options[i][k][1] for i, k in enumerate(picks)) == pytest.approx(expected[0], abs=1e-9)


@pytest.mark.parametrize("p,d", [(5_000_000, 1), (5_000_000, 3), (20_000_000, 2), (40_000_000, 5)])
def test_a_cheaper_scheme_a_few_bits_over_the_budget_is_not_taken(p, d):
    """Two layers of nearly equal size: swapping their widths costs a few bits more and is cheaper.
    A constraint normalised to average bits let HiGHS's absolute tolerance take that scheme (2 to 10
    bits over on these 10-80 M-weight models); in whole bits, re-checked exactly, it is refused."""
    params = [p, p + d, 1_000_000]
    options = [[(2, 0.0), (4, -1.0)], [(2, 0.0), (4, -1.1)], [(2, 0.0), (3, -0.5)]]
    high_bits = 4 * p + 2 * (p + d) + 2 * 1_000_000  # the first layer at 4 bits, the others at 2
    picks = choose_options(options, params, 0.0, high_bits / sum(params))
    assert sum(options[i][k][0] * params[i] for i, k in enumerate(picks)) <= high_bits
    assert picks == [1, 0, 0] == list(_brute_force_bits(options, params, 0, high_bits)[1])


def test_bmpq_assignment_on_an_eleven_million_weight_model_is_within_its_budget():
    from mpq_cli.budget import assign_bits

    rng = random.Random(0)
    names = [f"layer{i}" for i in range(20)]
    params = {n: rng.randint(50_000, 1_100_000) for n in names}
    sensitivity = {n: rng.uniform(0.1, 10.0) for n in names}
    budget = 3.0 * sum(params.values()) - 7  # a few bits under an even average, as a byte budget lands
    bits = assign_bits(sensitivity, params, [2, 4], budget)
    assert sum(bits[n] * params[n] for n in names) <= budget


# -- layers that interact: the chosen scheme's measured loss is checked (issue 13) ---------------------------
class _Scheme:
    """Three equal layers at 8 bits; a probe whose loss changes add up except for one pair."""

    def __init__(self, pair_penalty):
        self.bits = {"a": 8, "b": 8, "c": 8}
        self.pair_penalty = pair_penalty

    def apply(self, name, bits):
        before = self.bits[name]
        self.bits[name] = bits

        def undo():
            self.bits[name] = before

        return undo

    def probe(self):
        alone = {"a": 0.1, "b": 0.1, "c": 0.3}
        loss = 1.0 + sum(alone[n] * (8 - b) for n, b in self.bits.items())
        if self.bits["a"] < 8 and self.bits["b"] < 8:
            loss += self.pair_penalty  # a and b cannot both lose bits: measured alone, nobody sees it
        return loss


def _step(scheme):
    from mpq_cli.budget import budget_step

    return budget_step(
        ["a", "b", "c"],
        [100, 100, 100],
        [8, 8, 8],
        {n: [7, 8] for n in "abc"},
        scheme.apply,
        scheme.probe,
        target=22 / 3,
        tolerance=0.05,
    )


def test_when_layers_interact_the_step_measures_again_and_keeps_the_better_scheme():
    scheme = _Scheme(pair_penalty=1.0)
    changes = _step(scheme)
    assert sorted(b for b in scheme.bits.values()) == [7, 7, 8] and scheme.bits["c"] == 7  # not a and b together
    assert abs(scheme.probe() - 1.4) < 1e-9 and changes[0]["passes"] == 2
    assert all(c["probe_loss_after"] == scheme.probe() for c in changes)


def test_additive_layers_keep_the_first_choice():
    scheme = _Scheme(pair_penalty=0.0)
    changes = _step(scheme)
    assert scheme.bits == {"a": 7, "b": 7, "c": 8} and {c["passes"] for c in changes} == {1}


def test_the_budget_step_looks_near_the_learned_bits_unless_the_window_is_out_of_reach():
    from mpq_cli.budget import narrow_candidates

    names, params, every = ["a", "b", "c"], [100, 100, 100], list(range(9))
    cands = {n: every for n in names}
    near = narrow_candidates(names, params, [4, 5, 6], cands, 2, target=4.0, tolerance=0.1)
    assert near == {"a": [2, 3, 4, 5, 6], "b": [3, 4, 5, 6, 7], "c": [4, 5, 6, 7, 8]}
    # average 5 -> at most 3 within two bits of each layer's bits: a target of 2 needs the full range
    assert narrow_candidates(names, params, [4, 5, 6], cands, 2, target=2.0, tolerance=0.1) == cands
    # a layer that may not reach 0 bits counts with its lowest allowed option (1 of 3 layers: 1/3 > 0.3)
    assert narrow_candidates(names, params, [1, 1, 1], cands, 2, 0.3, 0.1, never_zero=["a"]) == cands
    assert narrow_candidates(names, params, [4, 5, 6], cands, 0, 4.0, 0.1) == cands
