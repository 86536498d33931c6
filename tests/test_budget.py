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
    options = [[(b, rng.uniform(-1, 3)) for b in sorted(rng.sample(range(0, 9), rng.randint(1, 4)))]
               for _ in range(layers)]
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
