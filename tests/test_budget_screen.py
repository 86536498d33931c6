"""The budget step's screen (issue 32): estimates that rank like the exact probe, the same ceiling and window
as the exact step, ``--budget-probe exact`` as before, and a cost that does not grow with layers x options."""

import copy
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq_cli.budget import budget_step, narrow_candidates
from mpq_cli.budget_screen import FINALIST_PROBES, layer_sensitivity, screened_budget_step
from mpq_cli.engine import loss_probe
from mpq_cli.errors import MpqError
from mpq_cli.methods import get_method


# -- the estimate against the exact probe, on a small trained model --------------------------------------------
def _trained_net(layers=3, width=24, seed=0):
    """A few Linear layers trained for a while on a learnable task: loss changes of rounding are then real."""
    torch.manual_seed(seed)
    mods, inp = [], 12
    for _ in range(layers - 1):
        mods += [nn.Linear(inp, width), nn.BatchNorm1d(width), nn.ReLU()]
        inp = width
    model = nn.Sequential(*mods, nn.Linear(inp, 4))
    teacher = torch.randn(12, 4)
    x = torch.randn(512, 12)
    y = (x @ teacher).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]


def _csq(model, probe, **cfg):
    method = get_method("csq")(get_method("csq").config_class.from_dict({"target_bits": 3, **cfg}))
    method.prepare(model, loss_probe=probe)
    model.train()
    return method


def _apply(method):
    from mpq_cli.budget import trial

    def apply(name, bits):
        q = method.layers[name].weight_quantizer
        return trial(
            q,
            lambda: q.load_codes(*q.requantized(bits, relaxed=True), fixed=True),
            lambda: q.mask_logits.requires_grad_(True),
        )

    return apply


def _spearman(a, b):
    rank = lambda v: torch.tensor(v).argsort().argsort().double()  # noqa: E731 (no ties in these floats)
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_the_screens_estimates_rank_the_options_as_the_exact_probe_does():
    from mpq_cli.budget_screen import estimate_changes

    model, batches = _trained_net()
    probe = loss_probe(model, batches, len(batches))
    method = _csq(model, probe)
    apply = _apply(method)
    grads, curvature = layer_sensitivity(probe, method.layers)
    base = probe()
    exact, estimated = [], []
    for name, layer in method.layers.items():
        now = layer.weight_quantizer.exact_weight().flatten()
        for bits in range(1, 8):
            undo = apply(name, bits)
            delta = layer.weight_quantizer.exact_weight().flatten() - now
            exact.append(probe() - base)
            estimated.append(float(estimate_changes(delta[None], grads[name], curvature[name])))
            undo()
    assert _spearman(exact, estimated) > 0.9, list(zip(exact, estimated, strict=True))
    # and the option each layer would lose most by is the same
    per_layer = len(exact) // len(method.layers)
    for i in range(len(method.layers)):
        e, s = exact[i * per_layer : (i + 1) * per_layer], estimated[i * per_layer : (i + 1) * per_layer]
        assert e.index(max(e)) == s.index(max(s))


def test_the_gradient_and_curvature_are_the_probes_own():
    """Against autograd on the probe's loss written out (float64 finite differences along a direction)."""
    model, batches = _trained_net(layers=2, width=8)
    probe = loss_probe(model, batches, 2)
    method = _csq(model, probe)
    grads, curvature = layer_sensitivity(probe, method.layers)
    name = "0"
    q = method.layers[name].weight_quantizer
    w0 = q.exact_weight().detach()
    direction = torch.randn_like(w0)
    h = 1e-3

    def loss_at(w):
        handle = q.register_forward_hook(lambda *_: w)
        try:
            return probe()
        finally:
            handle.remove()

    slope = (loss_at(w0 + h * direction) - loss_at(w0 - h * direction)) / (2 * h)
    assert float(grads[name] @ direction.flatten()) == pytest.approx(slope, rel=2e-2, abs=1e-5)
    # Tr(H) / n against the exact Hessian (autograd's, on the probe's loss written out): Hutchinson's estimate is
    # unbiased, with a standard deviation per Rademacher vector of sqrt(2 sum_{i != j} H_ij^2) / n
    reference = copy.deepcopy(model).eval()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.train()  # the probe's mode: the batches' own statistics
    reference_q = reference.get_submodule(name).weight_quantizer

    def mean_loss(w):
        handle = reference_q.register_forward_hook(lambda *_: w.reshape(w0.shape))
        try:
            total = sum(F.cross_entropy(reference(x), y, reduction="sum") for x, y in batches[:2])
        finally:
            handle.remove()
        return total / sum(len(y) for _, y in batches[:2])

    hessian = torch.autograd.functional.hessian(mean_loss, w0.flatten().clone())
    n = w0.numel()
    spread = (2 * ((hessian**2).sum() - (hessian.diagonal() ** 2).sum())).sqrt() / n / 2**0.5  # 2 probe batches
    assert curvature[name].shape == ()
    assert abs(float(curvature[name]) - float(hessian.trace()) / n) <= 4 * float(spread) + 1e-6


# -- the same ceiling and window as the exact step (brute force, as in test_budget.py) -------------------------
class _Quadratic:
    """Layers whose 'weight' is their bits: the probe's loss is ``sum per_bit * (8 - b)^power``. With power 2
    the screen's quadratic model is exact; with power 3 its estimates are wrong everywhere but at the current
    bits, and the finalists' probes must correct them."""

    def __init__(self, names, bits, per_bit, power):
        self.bits = dict(zip(names, bits, strict=True))
        self.per_bit = dict(zip(names, per_bit, strict=True))
        self.power, self.calls = power, 0

    def apply(self, name, bits):
        before = self.bits[name]
        self.bits[name] = bits
        return lambda: self.bits.__setitem__(name, before)

    def probe(self):
        self.calls += 1
        return sum(self.per_bit[n] * (8 - b) ** self.power for n, b in self.bits.items())

    def weight(self, name):
        return torch.tensor([float(self.bits[name])])

    def sensitivity(self):
        # d/db of per_bit (8 - b)^2 and its second derivative, at the current bits
        grads = {n: torch.tensor([-2.0 * p * (8 - self.bits[n])]) for n, p in self.per_bit.items()}
        return grads, {n: torch.tensor(2.0 * p) for n, p in self.per_bit.items()}


def _average(scheme, names, params):
    return sum(scheme.bits[n] * p for n, p in zip(names, params, strict=True)) / sum(params)


@pytest.mark.parametrize("power", [2, 3], ids=["quadratic", "cubic"])
@pytest.mark.parametrize("seed", range(20))
def test_the_screened_step_lands_in_the_window_whenever_any_choice_does(seed, power):
    rng = random.Random(1000 + seed)
    names = [f"l{i}" for i in range(rng.randint(2, 4))]
    params = [rng.choice([5, 50, 500, 20000]) for _ in names]
    current = [rng.randint(1, 8) for _ in names]
    target, tolerance = rng.choice([1.5, 2.0, 3.0, 4.0]), 0.1
    every = {n: list(range(9)) for n in names}
    per_bit = [rng.uniform(0.01, 1.0) for _ in names]
    narrowed = narrow_candidates(names, params, current, every, 2, target, tolerance, never_zero=names)
    screen = _Quadratic(names, current, per_bit, power)
    screened_budget_step(
        names, params, current, narrowed, screen.apply, screen.probe, target, tolerance, never_zero=names,
        weight=screen.weight, sensitivity=screen.sensitivity,
    )  # fmt: skip
    exact = _Quadratic(names, current, per_bit, power)
    budget_step(names, params, current, narrowed, exact.apply, exact.probe, target, tolerance, never_zero=names)
    total, average = sum(params), _average(screen, names, params)
    reachable = [range(1, 9)] * len(names)  # never zero
    sums = {sum(b * p for b, p in zip(c, params, strict=True)) for c in itertools.product(*reachable)}
    if any((target - tolerance) * total - 1e-6 <= s <= target * total + 1e-6 for s in sums):
        assert target - tolerance - 1e-9 <= average <= target + 1e-9, (current, screen.bits)
    else:
        assert average <= target + 1e-9 or min(sums) > target * total
    # never over the ceiling where the exact step is not, and in the same place relative to the window
    exact_average = _average(exact, names, params)
    assert (average <= target + 1e-9) == (exact_average <= target + 1e-9)
    assert (average >= target - tolerance - 1e-9) == (exact_average >= target - tolerance - 1e-9)
    if power == 2:  # the estimates are the exact changes: the same least loss
        assert screen.probe() == pytest.approx(exact.probe(), rel=1e-9, abs=1e-9)


def test_a_screen_on_counted_bits_lands_its_window_in_that_count():
    names, params = ["a", "b", "c"], [100, 100, 1000]
    scheme = _Quadratic(names, [8, 8, 8], [1.0, 1.0, 1.0], 3)
    stored = {n: (lambda b: b + 1 if b else 0) for n in names}
    stored["c"] = lambda b: b + 1.032 if b else 0  # a code table: 32 bits over 1,000 weights

    def counted(name):
        return stored[name](scheme.bits[name])

    every = {n: list(range(1, 9)) for n in names}
    screened_budget_step(
        names, params, [8, 8, 8], every, scheme.apply, scheme.probe, 4.0, 0.1, counted=counted,
        weight=scheme.weight, sensitivity=scheme.sensitivity,
    )  # fmt: skip
    average = sum(counted(n) * p for n, p in zip(names, params, strict=True)) / sum(params)
    assert 3.9 - 1e-9 <= average <= 4.0 + 1e-9, scheme.bits


def test_the_chosen_options_are_measured_and_recorded_as_such():
    names, params = [f"l{i}" for i in range(6)], [100] * 6
    scheme = _Quadratic(names, [8] * 6, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 3)
    changes = screened_budget_step(
        names, params, [8] * 6, {n: list(range(1, 9)) for n in names}, scheme.apply, scheme.probe, 5.0, 0.1,
        weight=scheme.weight, sensitivity=scheme.sensitivity,
    )  # fmt: skip
    assert changes and all(c["measured_alone"] for c in changes)
    for c in changes:  # what the record says was measured is the probe's change for that layer alone
        alone = _Quadratic(names, [8] * 6, scheme.per_bit.values(), 3)
        base = alone.probe()
        alone.apply(c["layer"], c["bits_after"])
        assert c["probe_loss_change_alone"] == pytest.approx(alone.probe() - base)
    assert changes[0]["probe_loss_after"] == pytest.approx(scheme.probe())


# -- the cost: forward passes do not grow with layers x options -------------------------------------------------
def _forwards(model, method, probe_mode):
    method.config.budget_probe = probe_mode
    count = [0]
    handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        method.finalize()
    finally:
        handle.remove()
    return count[0]


@pytest.mark.parametrize("layers", [3, 10])
def test_the_screens_forward_passes_do_not_grow_with_layers_and_options(layers):
    batches_n = 2
    counts = {}
    for mode in ("screen", "exact"):
        torch.manual_seed(0)  # Hutchinson's random vectors: the count must not depend on the tests run before
        model, batches = _trained_net(layers=layers, width=16)
        method = _csq(model, loss_probe(model, batches, batches_n), target_bits=2.5, budget_span=0, budget_probe=mode)
        counts[mode] = _forwards(model, method, mode)
    # per pass: the base probe, one forward per probe batch for the gradients, the finalists, the chosen scheme;
    # at most two passes (the second when the layers interact)
    bound = 2 * batches_n * (1 + 1 + FINALIST_PROBES + 1) + batches_n
    assert counts["screen"] <= bound, counts
    assert counts["exact"] >= batches_n * layers * 8  # every option of every layer
    if layers == 10:  # already fewer than probing every option once per batch; the gap widens with layers
        assert counts["screen"] < counts["exact"]


# -- the setting: recorded, defaults out of saved configs, exact as before --------------------------------------
def test_budget_probe_defaults_out_of_saved_configs_and_is_checked():
    for method in ("bsq", "uniform"):
        cfg = get_method(method).config_class
        assert cfg().budget_probe == "exact"
        assert "budget_probe" not in cfg.from_dict({"target_bits": 2}).to_dict()  # old runs keep fingerprints
        assert "budget_probe" not in cfg.from_dict({"target_bits": 2, "budget_probe": "exact"}).to_dict()
        assert cfg.from_dict({"target_bits": 2, "budget_probe": "screen"}).to_dict()["budget_probe"] == "screen"
    with pytest.raises(MpqError, match="--budget-probe must be one of screen, exact"):
        get_method("csq").config_class.from_dict({"target_bits": 2, "budget_probe": "fast"})


def test_csq_screens_by_default_since_version_9_and_older_runs_probe_exactly():
    """The screen became CSQ's default once measured over seeds (config version 9); a run saved by version 8 or
    earlier, whose config leaves the probe out because exact was the default then, reads back as exact, and an
    explicit exact survives a round trip (it is no longer the default, so it cannot be left out)."""
    cfg = get_method("csq").config_class
    assert cfg().budget_probe == "screen" and cfg().version == 9
    assert cfg.from_dict({"target_bits": 2}).budget_probe == "screen"  # the command line: today's version
    assert cfg.from_dict({"target_bits": 2, "version": 8}).budget_probe == "exact"
    exact = cfg.from_dict({"target_bits": 2, "budget_probe": "exact"})
    assert exact.to_dict()["budget_probe"] == "exact"
    assert cfg.from_dict(exact.to_dict()).budget_probe == "exact"
    assert cfg.from_dict(cfg.from_dict({"target_bits": 2}).to_dict()).budget_probe == "screen"


@pytest.mark.parametrize("method_name", ["csq", "bsq"])
def test_exact_probes_every_option_as_before(method_name, monkeypatch):
    """``exact`` runs the step it ran before, with the same arguments; the screen never runs."""
    from mpq_cli.methods import base

    seen = []
    real = base.budget_step
    monkeypatch.setattr(base, "budget_step", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    monkeypatch.setattr(base, "screened_budget_step", lambda *a, **k: pytest.fail("the screen ran"))
    model, batches = _trained_net()
    probe = loss_probe(model, batches, 2)
    config = {"target_bits": 2, "budget_probe": "exact"}
    method = get_method(method_name)(get_method(method_name).config_class.from_dict(config))
    method.prepare(model, loss_probe=probe)
    model.train()
    method.finalize()
    assert len(seen) == 1 and seen[0][0][5] is probe and method.config.budget_probe == "exact"


def test_a_probe_that_can_only_be_called_is_measured_exactly(monkeypatch):
    """A user's probe (a plain callable given to prepare) cannot be differentiated: its step probes every option."""
    from mpq_cli.methods import base

    monkeypatch.setattr(base, "screened_budget_step", lambda *a, **k: pytest.fail("the screen ran"))
    model, batches = _trained_net()
    probe = loss_probe(model, batches, 2)
    method = _csq(model, lambda: probe(), target_bits=2, budget_probe="screen")
    assert method.config.budget_probe == "screen" and method.finalize().budget_met


def test_a_search_records_the_probe_and_each_change_says_whether_it_was_measured(fp_run, tmp_path):
    import json

    from conftest import SMALL, run_json

    runs = {}
    for mode in ("screen", "exact"):
        out = tmp_path / mode
        args = ["--budget-probe", mode] if mode == "exact" else []  # CSQ's default is the screen
        runs[mode] = run_json(
            "search", "--method", "csq", "--target-bits", "2", "--model", "lenet5", "--checkpoint", fp_run[0],
            *SMALL, "--epochs", "1", "--lr", "0.01", *args, "--out", out,
        )  # fmt: skip
        assert runs[mode]["budget_met"] is True
    saved = {m: json.loads((tmp_path / m / "config.json").read_text()) for m in runs}
    assert saved["exact"]["method_config"]["budget_probe"] == "exact"  # not CSQ's default: recorded
    assert saved["screen"]["method_config"]["budget_probe"] == "screen"
    changes = json.loads((tmp_path / "screen" / "summary.json").read_text())["budget_changes"]
    assert changes and all(isinstance(c["measured_alone"], bool) for c in changes)
    exact_changes = json.loads((tmp_path / "exact" / "summary.json").read_text())["budget_changes"]
    assert all("measured_alone" not in c for c in exact_changes)  # the records of before
