import itertools
import random
import warnings

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


def test_an_option_whose_probe_loss_is_not_finite_is_never_chosen():
    class Broken(_Scheme):
        def probe(self):  # c at 7 bits breaks the model (its loss would otherwise be the cheapest change)
            return float("inf") if self.bits["c"] == 7 else super().probe() - 0.5 * (8 - self.bits["c"])

    scheme = Broken(pair_penalty=0.0)
    changes = _step(scheme)
    assert scheme.bits == {"a": 7, "b": 7, "c": 8} and all(c["layer"] != "c" for c in changes)


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


# -- the budget is a ceiling, and discrete (issue 26) -------------------------------------------------------
LENET5 = ["features.0", "features.3", "classifier.1", "classifier.3"], [500, 25000, 400000, 5000]


class _Additive:
    """A probe whose loss is a sum of per-layer terms: each bit taken from a layer costs its own amount."""

    def __init__(self, names, bits, per_bit):
        self.bits, self.per_bit = dict(zip(names, bits, strict=True)), dict(zip(names, per_bit, strict=True))

    def apply(self, name, bits):
        before = self.bits[name]
        self.bits[name] = bits
        return lambda: self.bits.__setitem__(name, before)

    def probe(self):
        return sum(self.per_bit[n] * (8 - b) ** 2 for n, b in self.bits.items())


def test_lenet5_whose_near_options_straddle_the_window_but_land_outside_it_looks_at_every_option():
    """The demo's failure: the span of the lowest and highest options within 2 bits brackets [1.9, 2.0],
    but classifier.1 holds 93 % of the weights, and no combination within reach lands in the window."""
    from mpq_cli.budget import budget_step, narrow_candidates

    names, params = LENET5
    current = [1, 4, 2, 5]  # 2.150 average bits
    every = {n: list(range(9)) for n in names}
    assert narrow_candidates(names, params, current, every, 2, 2.0, 0.1, never_zero=names) == every
    probe = _Additive(names, current, [1.0, 0.3, 0.01, 0.5])
    narrowed = narrow_candidates(names, params, current, every, 2, 2.0, 0.1, never_zero=names)
    budget_step(names, params, current, narrowed, probe.apply, probe.probe, 2.0, 0.1, never_zero=names)
    average = sum(probe.bits[n] * p for n, p in zip(names, params, strict=True)) / sum(params)
    assert 1.9 <= average <= 2.0, probe.bits


def _brute_force(options, params, target, tolerance):
    """Every combination: (in the window, cost) minimum, else the most bits under the ceiling at least cost."""
    total = sum(params)
    combos = []
    for picks in itertools.product(*[range(len(o)) for o in options]):
        bits = sum(options[i][k][0] * params[i] for i, k in enumerate(picks))
        cost = sum(options[i][k][1] for i, k in enumerate(picks))
        combos.append((bits, cost))
    inside = [c for b, c in combos if (target - tolerance) * total - 1e-6 <= b <= target * total + 1e-6]
    if inside:
        return "window", min(inside)
    under = [(b, c) for b, c in combos if b <= target * total + 1e-6]
    if not under:
        return "over", None
    most = max(b for b, _ in under)
    return "under", (most, min(c for b, c in under if b == most))


@pytest.mark.parametrize("seed", range(60))
def test_the_choice_under_a_ceiling_is_what_brute_force_finds(seed):
    from mpq_cli.budget import choose_under_ceiling

    rng = random.Random(seed)
    layers = rng.randint(1, 4)
    params = [rng.choice([1, 3, 10, 50, 400, 9000]) for _ in range(layers)]
    options = [
        [(b, round(rng.uniform(-1, 1), 3)) for b in sorted(rng.sample(range(9), rng.randint(1, 4)))]
        for _ in range(layers)
    ]
    target, tolerance = rng.choice([0.5, 1.0, 2.0, 2.7, 3.0, 5.5]), rng.choice([0.0, 0.05, 0.1, 0.5])
    kind, best = _brute_force(options, params, target, tolerance)
    picks = choose_under_ceiling(options, params, target, tolerance)
    if kind == "over":
        assert picks is None
        return
    bits = sum(options[i][k][0] * params[i] for i, k in enumerate(picks))
    cost = sum(options[i][k][1] for i, k in enumerate(picks))
    total = sum(params)
    assert bits <= target * total + 1e-6  # never over the ceiling
    if kind == "window":
        assert bits >= (target - tolerance) * total - 1e-6 and cost == pytest.approx(best, abs=1e-9)
    else:
        assert (bits, cost) == (best[0], pytest.approx(best[1], abs=1e-9))


@pytest.mark.parametrize("seed", range(30))
def test_the_narrowed_step_lands_in_the_window_whenever_any_choice_does(seed):
    from mpq_cli.budget import budget_step, narrow_candidates

    rng = random.Random(1000 + seed)
    names = [f"l{i}" for i in range(rng.randint(2, 4))]
    params = [rng.choice([5, 50, 500, 20000]) for _ in names]
    current = [rng.randint(1, 8) for _ in names]
    target, tolerance = rng.choice([1.5, 2.0, 3.0, 4.0]), 0.1
    every = {n: list(range(9)) for n in names}
    per_bit = [rng.uniform(0.01, 1.0) for _ in names]
    probe = _Additive(names, current, per_bit)
    narrowed = narrow_candidates(names, params, current, every, 2, target, tolerance, never_zero=names)
    budget_step(names, params, current, narrowed, probe.apply, probe.probe, target, tolerance, never_zero=names)
    total = sum(params)
    average = sum(probe.bits[n] * p for n, p in zip(names, params, strict=True)) / total
    reachable = [range(1, 9)] * len(names)  # never zero
    sums = {sum(b * p for b, p in zip(c, params, strict=True)) for c in itertools.product(*reachable)}
    if any((target - tolerance) * total - 1e-6 <= s <= target * total + 1e-6 for s in sums):
        assert target - tolerance - 1e-9 <= average <= target + 1e-9, (current, probe.bits)
    else:
        assert average <= target + 1e-9 or min(sums) > target * total


# -- a ceiling on the bits the file stores (--budget-on stored) ----------------------------------------------
def test_a_step_on_counted_bits_lands_its_window_in_that_count():
    """The budget counts each option as measured (stored bits: a sign on top, and a code table's entries),
    not its nominal bits: the window is met in that count."""
    from mpq_cli.budget import budget_step

    names, params = ["a", "b", "c"], [100, 100, 1000]
    probe = _Additive(names, [8, 8, 8], [1.0, 1.0, 1.0])
    stored = {n: (lambda b: b + 1 if b else 0) for n in names}
    stored["c"] = lambda b: b + 1.032 if b else 0  # a code table: 32 bits over 1,000 weights

    def counted(name):
        return stored[name](probe.bits[name])

    every = {n: list(range(1, 9)) for n in names}
    budget_step(names, params, [8, 8, 8], every, probe.apply, probe.probe, 4.0, 0.1, counted=counted)
    average = sum(counted(n) * p for n, p in zip(names, params, strict=True)) / sum(params)
    assert 3.9 - 1e-9 <= average <= 4.0 + 1e-9, probe.bits


def test_budget_on_defaults_out_of_saved_configs_and_is_checked():
    from mpq_cli.methods import get_method

    csq = get_method("csq").config_class
    assert "budget_on" not in csq.from_dict({"target_bits": 2}).to_dict()  # old runs keep their fingerprints
    assert csq.from_dict({"target_bits": 2, "budget_on": "stored"}).to_dict()["budget_on"] == "stored"
    with pytest.raises(MpqError, match="--budget-on must be one of nominal, stored"):
        csq.from_dict({"target_bits": 2, "budget_on": "file"})
    with pytest.raises(MpqError, match="ALQ caps its bases per weight only"):
        get_method("alq").config_class.from_dict({"target_bits": 1, "budget_on": "stored"})


@pytest.mark.parametrize("method", ["csq", "bsq", "uniform"])
def test_a_ceiling_on_stored_bits_holds_in_the_exported_file(method, fp_run, tmp_path):
    from conftest import SMALL, run_json

    run = tmp_path / method
    summary = run_json(
        "search", "--method", method, "--target-bits", "3", "--budget-on", "stored", "--model", "lenet5",
        "--checkpoint", fp_run[0], *SMALL, "--epochs", "1", "--lr", "0.01", "--out", run,
    )  # fmt: skip
    assert summary["budget_met"] is True and summary["budget_on"] == "stored"
    assert summary["avg_counted_bits"] <= 3 + 1e-9 and summary["avg_bits"] < summary["avg_counted_bits"]
    assert summary["bits_under_budget"] == pytest.approx(3 - summary["avg_counted_bits"], abs=1e-6)
    run_json("export", run, "-o", tmp_path / "m.safetensors")
    # the count is the file's own: fields padded to bytes, steps and tables, as inspect measures them
    on_file = run_json("inspect", tmp_path / "m.safetensors")["avg_stored_bits"]
    assert on_file == pytest.approx(summary["avg_counted_bits"], abs=1e-9) and on_file <= 3 + 1e-9


def _hard_program(layers: int, seed: int = 0):
    """Many layers with near-tied random costs: a knapsack HiGHS cannot prove optimal in an instant."""
    rng = random.Random(seed)
    params = [rng.randint(10_000, 1_000_000) for _ in range(layers)]
    options = [[(b, -b * rng.uniform(0.9, 1.1)) for b in range(1, 9)] for _ in params]
    return options, params


def test_at_the_solvers_time_limit_the_best_scheme_found_is_used_and_meets_the_window(monkeypatch):
    """$MPQ_ILP_TIME_LIMIT bounds HiGHS: a model of thousands of layers must not hang a run. What the solver
    returns at its limit is either a scheme inside the window (with a warning: not proven optimal) or a
    one-line error naming the limit, never a scheme outside the window."""
    from mpq_cli.budget import choose_options_within

    options, params = _hard_program(3000)
    high = sum(4 * p for p in params)  # 4 bits on average at most, 3.99 at least
    low = high - sum(params) // 100
    monkeypatch.setenv("MPQ_ILP_TIME_LIMIT", "0.001")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            picks = choose_options_within(options, params, low, high)
        except MpqError as exc:
            assert "0.001 s limit" in str(exc) and "MPQ_ILP_TIME_LIMIT" in str(exc)
            return
    used = sum(options[i][k][0] * params[i] for i, k in enumerate(picks))
    assert low <= used <= high
    assert any("0.001 s limit" in str(w.message) for w in caught)  # the scheme is flagged as not proven optimal


def test_a_scheme_found_at_the_time_limit_is_used_with_a_warning(monkeypatch):
    """HiGHS's answer at its limit (status 1) with a scheme: the scheme is taken, re-checked against the window in
    exact integers, and flagged; the real solver's optimum on the same program is the reference."""
    import scipy.optimize

    from mpq_cli.budget import choose_options_within

    monkeypatch.delenv("MPQ_ILP_TIME_LIMIT", raising=False)
    options, params = _hard_program(6, seed=1)
    high = sum(4 * p for p in params)
    optimum = choose_options_within(options, params, 0, high)
    real_milp = scipy.optimize.milp

    def at_the_limit(*args, **kwargs):
        assert kwargs["options"]["time_limit"] == 120.0  # the default limit reaches HiGHS
        result = real_milp(*args, **kwargs)
        result.status, result.success = 1, False  # as HiGHS reports "time limit reached" with an incumbent
        return result

    monkeypatch.setattr(scipy.optimize, "milp", at_the_limit)
    with pytest.warns(UserWarning, match="120 s limit"):
        assert choose_options_within(options, params, 0, high) == optimum


def test_under_a_stored_ceiling_the_budget_step_counts_each_layer_at_its_full_width(monkeypatch):
    """An option that adds bits without changing the codes yet is not free: the training after the step fills
    the width (CSQ's second stage trains on the whole k-bit grid). A 3-bit layer whose codes use 1 bit stores
    about 2 bits now and is counted at 3 + sign by the step; the final check still measures the codes."""
    from conftest import TinyNet

    from mpq_cli.layers import LayerSelection
    from mpq_cli.methods.base import get_method

    cfg = get_method("csq").config_class.from_dict({"target_bits": 3, "budget_on": "stored"})
    method = get_method("csq")(cfg, LayerSelection(fix_bits={"conv": 3}))
    method.prepare(TinyNet())
    q = method.quantizers()["conv"]
    codes, step = q.exact_codes()
    assert method.layer_bits()["conv"] == 3
    assert method.full_width_stored_bits("conv") == pytest.approx(method.stored_bits("conv"))  # already full
    small = codes.sign()
    assert small.abs().max() == 1
    monkeypatch.setattr(q, "exact_codes", lambda: (small, step))
    now, counted = method.stored_bits("conv"), method.full_width_stored_bits("conv")
    assert counted - now == pytest.approx(2, abs=0.2)  # fields of 3 + sign against 1 + sign, the same step
