"""BMPQ: fixed-point and ternary quantizers, bit gradients, the integer program, ties, the whole run."""

import itertools
import json
import random

import pytest
import torch
from conftest import SMALL, invoke, run_json
from torch import nn

from mpq_cli.budget import assign_bits
from mpq_cli.errors import MpqError
from mpq_cli.layers import LayerSelection
from mpq_cli.methods.bmpq import (
    BMPQ,
    BMPQConfig,
    BMPQWeight,
    bit_gradients,
    fixed_point_codes,
    normalized_bit_gradient,
    place_values,
    ternary_codes,
)
from mpq_cli.models.zoo import lenet5, resnet20
from mpq_cli.quant.act import PACT
from mpq_cli.quant.primitives import dequantize


# -- quantizers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_fixed_point_codes_are_eq_3_4(bits):
    torch.manual_seed(bits)
    w = torch.randn(7, 9)
    codes, step = fixed_point_codes(w, bits)
    levels = 2 ** (bits - 1) - 1
    assert float(step) == pytest.approx(float(w.abs().max()) / levels, rel=1e-6)
    assert int(codes.abs().max()) == levels  # the largest weight lands on the largest code
    assert torch.equal(codes, torch.round(w / step).clamp(-levels, levels).int())
    assert -(2 ** (bits - 1)) <= int(codes.min()) and int(codes.max()) < 2 ** (bits - 1)  # fits two's complement


def test_ternary_codes_follow_twn():
    w = torch.tensor([0.9, -0.1, 0.5, -0.8, 0.05, 0.0, -0.45, 0.2])
    codes, step = ternary_codes(w)
    delta = 0.7 * w.abs().mean()
    keep = w.abs() > delta
    assert torch.equal(codes, (torch.sign(w) * keep).int())
    assert float(step) == pytest.approx(float(w.abs()[keep].mean()), rel=1e-6)


def test_train_weight_equals_exact_weight_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    for bits in (2, 4):
        q = BMPQWeight(torch.randn(4, 6), bits, 4, ternary=True)
        upstream = torch.randn(4, 6)
        (q.train_weight() * upstream).sum().backward()
        assert torch.equal(q.weight.grad, upstream)  # STE: identity
        codes, step = q.exact_codes()
        assert torch.allclose(q.train_weight().detach(), dequantize(codes, step), rtol=0, atol=1e-7)
        q.eval()
        assert torch.equal(q(), dequantize(codes, step))
        if bits == 2:
            assert set(codes.unique().tolist()) <= {-1, 0, 1}


# -- bit gradients ------------------------------------------------------------------------------------------
def _two_complement_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(d, bits)`` 0/1 bits of Eq. 5, LSB first."""
    unsigned = codes.to(torch.int64).reshape(-1) % (1 << bits)
    return ((unsigned[:, None] >> torch.arange(bits)) & 1).to(torch.float64)


def test_bit_gradients_match_autograd_and_finite_differences():
    torch.manual_seed(3)
    bits = 4
    x, target = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    codes, step = fixed_point_codes(torch.randn(2, 3), bits)
    step = float(step)
    b = _two_complement_bits(codes, bits)
    values = place_values(bits).to(torch.float64)
    assert torch.equal((b @ values).round().long(), codes.reshape(-1).long())  # Eq. 5 reconstructs the codes

    def loss_of_bits(bit_tensor):
        w = (bit_tensor @ values * step).reshape(2, 3)
        return ((x @ w.T - target) ** 2).sum()

    b_var = b.clone().requires_grad_(True)
    loss_of_bits(b_var).backward()
    w = (b @ values * step).reshape(2, 3).requires_grad_(True)
    ((x @ w.T - target) ** 2).sum().backward()
    analytic = bit_gradients(w.grad, step, bits)
    assert torch.allclose(analytic.to(torch.float64), b_var.grad, rtol=1e-5, atol=1e-6)
    eps = 1e-4
    finite = torch.zeros_like(b)
    for j, i in itertools.product(range(b.shape[0]), range(bits)):
        plus, minus = b.clone(), b.clone()
        plus[j, i] += eps
        minus[j, i] -= eps
        finite[j, i] = (loss_of_bits(plus) - loss_of_bits(minus)) / (2 * eps)
    assert torch.allclose(analytic.to(torch.float64), finite, rtol=1e-4, atol=1e-5)


def test_nbg_closed_form_equals_the_bit_gradient_matrix():
    torch.manual_seed(4)
    w, grad = torch.randn(6, 5), torch.randn(6, 5)
    for q_max in (2, 4, 8):
        step = w.abs().max() / (2 ** (q_max - 1) - 1)
        explicit = bit_gradients(grad, step, q_max).abs().sum(1).mean()
        assert float(normalized_bit_gradient(grad, w, q_max)) == pytest.approx(float(explicit), rel=1e-5)


def test_nbg_is_recorded_from_the_training_gradient_without_another_backward():
    torch.manual_seed(5)
    q = BMPQWeight(torch.randn(3, 4), 2, 4, ternary=True)
    x = torch.randn(8, 4)
    expected = []
    for _ in range(3):
        wq = q.train_weight()
        wq.retain_grad()
        (x @ wq.T).pow(2).mean().backward()
        expected.append(float(normalized_bit_gradient(wq.grad, q.weight, 4)))
    assert int(q.nbg_steps) == 3
    assert q.take_epoch_nbg() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert int(q.nbg_steps) == 0 and q.take_epoch_nbg() is None


# -- the integer program --------------------------------------------------------------------------------
def _brute_force(sens, params, support, budget, fixed, ties):
    names = list(params)
    best = None
    for combo in itertools.product(*[[fixed[n]] if n in fixed else support for n in names]):
        bits = dict(zip(names, combo, strict=True))
        if any(len({bits[n] for n in group}) > 1 for group in ties):
            continue
        if sum(params[n] * bits[n] for n in names) > budget + 1e-9:
            continue
        value = sum(sens[n] * bits[n] for n in names)
        if best is None or value > best:
            best = value
    return best


@pytest.mark.parametrize("seed", range(30))
def test_assignment_matches_brute_force_and_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(rng.randint(1, 6))]
    params = {n: rng.choice([10, 100, 250, 1000, 4000]) for n in names}
    sens = {n: rng.uniform(0, 2) for n in names}
    support = sorted(rng.sample([2, 3, 4, 8], rng.randint(1, 3)))
    fixed = {n: 8 for n in names if rng.random() < 0.2}
    ties = [rng.sample(names, 2)] if len(names) >= 3 and rng.random() < 0.5 else []
    ties = [t for t in ties if not any(n in fixed for n in t)]
    total = sum(params.values())
    budget = rng.uniform(min(support), 8) * total
    expected = _brute_force(sens, params, support, budget, fixed, ties)
    if expected is None:
        with pytest.raises(MpqError, match="below the smallest scheme"):
            assign_bits(sens, params, support, budget, fixed, ties)
        return
    bits = assign_bits(sens, params, support, budget, fixed, ties)
    assert sum(params[n] * bits[n] for n in names) <= budget + 1e-9
    assert all(bits[n] == b for n, b in fixed.items())
    assert all(bits[n] in support for n in names if n not in fixed)
    assert all(len({bits[n] for n in t}) == 1 for t in ties)
    assert sum(sens[n] * bits[n] for n in names) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_infeasible_budget_is_a_clear_error_before_training():
    with pytest.raises(MpqError, match="below the smallest scheme"):
        assign_bits({"a": 1.0}, {"a": 10, "b": 10}, [2, 4], 39.0, {"b": 2})
    model = lenet5(10, 1, (28, 28))  # edges at 16 bits: the smallest scheme averages 2.18 bits
    with pytest.raises(MpqError, match="below the smallest scheme: 2.1"):
        BMPQ(BMPQConfig(target_bits=2.0)).prepare(model)
    with pytest.raises(MpqError, match="tied but fixed at different bits"):
        assign_bits({}, {"a": 10, "b": 10}, [2, 4], 1e9, {"a": 2, "b": 4}, [["a", "b"]])


def test_bad_config_is_refused():
    for bad in (
        {"bits": "2,x"},
        {"bits": [1, 4]},
        {"edge_bits": 17},
        {"warmup_epochs": 0},
        {"target_bits": 3, "budget_bytes": 100},
        {"ties": [3]},
    ):
        with pytest.raises(MpqError):
            BMPQConfig(**bad)
    assert BMPQConfig(bits="4,2").bits == [2, 4]
    assert BMPQConfig().target_bits == 3.0 and BMPQConfig(budget_bytes=10).target_bits is None


# -- the method in a model ------------------------------------------------------------------------------
def _train_steps(model, method, epochs=2, steps=2, shape=(4, 1, 28, 28)):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for epoch in range(epochs):
        method.on_epoch_start(epoch, epochs, steps)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(torch.randn(*shape)), torch.randint(0, 10, (shape[0],)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.on_step_end()


def test_edges_start_at_edge_bits_others_at_the_largest_width_and_activations_follow():
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = BMPQ(BMPQConfig(bits=[2, 4], warmup_epochs=1, interval=1))
    method.prepare(model)
    assert method.layer_bits() == {"features.0": 16, "features.3": 4, "classifier.1": 4, "classifier.3": 16}
    assert not isinstance(method.layers["classifier.3"].act_quantizer, PACT)  # the last layer reads FP
    _train_steps(model, method)
    bits = method.layer_bits()
    assert bits["classifier.1"] == 2 and bits["features.0"] == 16  # a 3-bit budget cannot hold the 400k layer at 4
    for name, layer in method.layers.items():
        if name != "classifier.3":
            assert layer.act_quantizer.bits == bits[name]
    assert method.history[0]["epoch"] == 1 and method.history[0]["enbg"]["classifier.1"] > 0


def test_a_search_shorter_than_the_warm_up_assigns_every_tenth_of_its_steps_and_trains_under_the_scheme():
    """One epoch (the default warm-up is one epoch): the paper's proportions in steps, not one untrained assignment
    at the end (MobileNetV2 from its trained reference: 12 % top-1 that way)."""
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = BMPQ(BMPQConfig(bits=[2, 4]))
    method.prepare(model)
    _train_steps(model, method, epochs=1, steps=23)  # not a multiple of ten: the tenths are rounded
    assert [round(h["epoch"] * 23) for h in method.history] == [2, 5, 7, 9, 12, 14, 16, 18, 21]
    assert all(h["enbg"]["classifier.1"] > 0 for h in method.history)  # each from the NBG of the tenth before it
    result = method.finalize()
    assert result.facts["assigned_at_end"] is False and result.budget_met
    assert method.history[-1]["epoch"] == "end" and method.history[-1]["bits"] == method.history[-2]["bits"]
    # a schedule the user set is theirs: a one-epoch warm-up over one epoch still assigns at the end
    other = lenet5(10, 1, (28, 28))
    fixed = BMPQ(BMPQConfig(bits=[2, 4], warmup_epochs=1, interval=1))
    fixed.prepare(other)
    _train_steps(other, fixed, epochs=1, steps=20)
    assert fixed.history == [] and fixed.finalize().facts["assigned_at_end"] is True


def test_the_shared_edge_bits_replace_bmpqs_own_and_stay_outside_the_program():
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = BMPQ(BMPQConfig(bits=[2, 4], warmup_epochs=1, interval=1), LayerSelection(edge_bits=8))
    method.prepare(model)
    assert method.layer_bits() == {"features.0": 8, "features.3": 4, "classifier.1": 4, "classifier.3": 8}
    assert method.fixed_widths() == {"features.0": 8, "classifier.3": 8}
    _train_steps(model, method)
    assert method.layer_bits()["features.0"] == method.layer_bits()["classifier.3"] == 8
    with pytest.raises(MpqError, match="--edge-bits 1: BMPQ widths"):
        BMPQ(BMPQConfig(), LayerSelection(edge_bits=1)).prepare(lenet5(10, 1, (28, 28)))


def test_downsample_convs_are_tied_to_their_block_input_readers():
    torch.manual_seed(0)
    model = resnet20(10, 1, (28, 28))
    method = BMPQ(BMPQConfig(bits=[2, 4], warmup_epochs=1, interval=1, target_bits=3.0))
    method.prepare(model)
    _train_steps(model, method, epochs=2, steps=1, shape=(2, 1, 28, 28))
    ties = {frozenset(t) for t in method.traced_ties}
    assert frozenset({"layer2.0.conv1", "layer2.0.downsample.0"}) in ties
    assert frozenset({"layer3.0.conv1", "layer3.0.downsample.0"}) in ties
    bits = method.layer_bits()
    assert bits["layer2.0.conv1"] == bits["layer2.0.downsample.0"]
    assert sum(method.layers[n].params * b for n, b in bits.items()) <= method.budget_bits


def test_user_ties_and_fixed_bits_are_respected():
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = BMPQ(
        BMPQConfig(bits=[2, 4, 8], warmup_epochs=1, interval=1, target_bits=4.0, edge_bits=None, ties=[["features.*"]]),
        LayerSelection(fix_bits={"classifier.3": 8}),
    )
    method.prepare(model)
    _train_steps(model, method)
    bits = method.layer_bits()
    assert bits["classifier.3"] == 8 and bits["features.0"] == bits["features.3"]
    with pytest.raises(MpqError, match="matches no quantized layer"):
        BMPQ(BMPQConfig(ties=["nothing*"])).prepare(lenet5(10, 1, (28, 28)))


# -- the command line, export and eval --------------------------------------------------------------------
@pytest.fixture(scope="module")
def bmpq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bmpq"
    summary = run_json(
        "search",
        "--method",
        "bmpq",
        "--model",
        "lenet5",
        *SMALL,
        "--epochs",
        "3",
        "--bits",
        "2,4",
        "--warmup-epochs",
        "1",
        "--interval",
        "1",
        "--target-bits",
        "4.5",
        "--out",
        out,
    )
    return out, summary


def test_cli_search_meets_the_budget_and_reports_the_assignments(bmpq_run):
    out, summary = bmpq_run
    assert summary["budget_met"] and summary["avg_bits"] <= 4.5 and summary["assignments"] == 2
    scheme = json.loads((out / "scheme.json").read_text())
    bits = {e["name"]: e["bits"] for e in scheme["layers"]}
    assert bits["features.0"] == 16 and bits["classifier.3"] == 16
    report = (out / "report.md").read_text()
    assert "## BMPQ assignments" in report and "two's complement width, sign included" in report
    assert sorted(bits.values()) == [2, 4, 16, 16]  # the 16x16 input makes both middle layers 25k weights
    for e in scheme["layers"]:  # two's complement codes take their nominal width in the file (ternary: 2)
        assert e["stored_bits"] == e["bits"] if e["bits"] == 2 else e["stored_bits"] <= e["bits"]


def test_export_keeps_edge_bits_and_eval_of_the_file_matches_the_run(bmpq_run, tmp_path):
    out, summary = bmpq_run
    packed = tmp_path / "bmpq.safetensors"
    run_json("export", out, "-o", packed)
    layers = {r["name"]: r for r in run_json("inspect", packed)["layers"]}
    assert layers["features.0"]["bits"] == 16 and layers["classifier.3"]["bits"] == 16
    assert all(r["encoding"] == "int" for r in layers.values())
    evaluated = run_json("eval", packed, "--device", "cpu")
    assert evaluated["top1"] == summary["top1"]


def test_finetune_keeps_the_scheme(bmpq_run, tmp_path):
    out, summary = bmpq_run
    tuned = run_json("finetune", out, "--epochs", "1", "--limit-train-batches", "2", "--out", tmp_path / "ft")
    before = {e["name"]: e["bits"] for e in json.loads((out / "scheme.json").read_text())["layers"]}
    after = {e["name"]: e["bits"] for e in json.loads((tmp_path / "ft" / "scheme.json").read_text())["layers"]}
    assert before == after and tuned["avg_bits"] == summary["avg_bits"]


def test_unknown_method_option_is_one_line_and_exit_2(tmp_path):
    result = invoke("search", "--method", "bmpq", *SMALL, "--epochs", "1", "--bitz", "2,4", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "no such option --bitz" in result.output and "--bits" in result.output
    result = invoke(
        "search", "--method", "bmpq", *SMALL, "--epochs", "1", "--target-bits", "1.5", "--out", tmp_path / "y"
    )
    assert result.exit_code == 2 and "below the smallest scheme" in result.output
    assert "Traceback" not in result.output


def test_state_round_trip_restores_widths_activation_bits_and_history():
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = BMPQ(BMPQConfig(bits=[2, 4], warmup_epochs=1, interval=1))
    method.prepare(model)
    _train_steps(model, method)
    state, method_state = model.state_dict(), json.loads(json.dumps(method.state_dict()))
    fresh_model = lenet5(10, 1, (28, 28))
    fresh = BMPQ(BMPQConfig(bits=[2, 4], warmup_epochs=1, interval=1))
    fresh.prepare(fresh_model)
    assert fresh.layer_bits() != method.layer_bits()  # a fresh model starts at the widest width
    fresh_model.load_state_dict(state)
    fresh.load_state_dict(method_state)
    assert fresh.layer_bits() == method.layer_bits()
    assert fresh.layers["classifier.1"].act_quantizer.bits == 2
    assert fresh.history == method.history and fresh.last_assigned_epoch == 1
    model.eval()
    fresh_model.eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), fresh_model(x))


def test_search_from_a_checkpoint(fp_run, tmp_path):
    summary = run_json(
        "search",
        "--method",
        "bmpq",
        "--model",
        "lenet5",
        "--checkpoint",
        fp_run[0],
        *SMALL,
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--interval",
        "1",
        "--target-bits",
        "4.5",
        "--out",
        tmp_path / "ck",
    )
    assert summary["fp_top1"] == pytest.approx(fp_run[1]["top1"]) and summary["budget_met"]
    assert summary["assignments"] == 1


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_a_stored_bits_ceiling_pays_for_the_steps(granularity):
    """Under --budget-on stored the program's budget is what remains after each layer's steps and padding: the
    file's stored bits (as budget_average measures the codes) stay under the ceiling, where counting the codes
    alone let one float32 step per output channel go over it (version 1)."""
    torch.manual_seed(0)
    model = resnet20(10, 3, (8, 8))
    ceiling = 3.05
    method = BMPQ(BMPQConfig(bits=[2, 3, 4], target_bits=ceiling, budget_on="stored", granularity=granularity))
    method.prepare(model)
    codes_only = BMPQ(BMPQConfig(bits=[2, 3, 4], target_bits=ceiling, granularity=granularity))
    codes_only.prepare(resnet20(10, 3, (8, 8)))
    overhead = codes_only.budget_bits - method.budget_bits
    layers = method.layers.values()
    steps = sum(q.weight_quantizer.shape[0] for q in layers) if granularity == "channel" else len(method.layers)
    assert overhead == 32 * steps + 7 * len(method.layers)
    _train_steps(model, method, shape=(4, 3, 8, 8))
    result = method.finalize()
    assert result.budget_met
    assert method.budget_average() <= ceiling
