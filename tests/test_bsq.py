"""BSQ: bit representation, STE gradients, group Lasso, re-quantization, budget mode."""

import json

import pytest
import torch
from conftest import SMALL, TinyNet, run_json

from mpq_cli.layers import LayerSelection
from mpq_cli.methods.bsq import BSQ, BSQConfig, BSQWeight
from mpq_cli.quant.primitives import dequantize, quantize_codes


def test_bit_decomposition_is_exact():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    q = BSQWeight(w, 8, 8, fixed=False)
    codes, step = q.exact_codes()
    scale = w.abs().max()
    assert torch.equal(codes, quantize_codes(w, scale, 8))
    assert float(step) == pytest.approx(float(scale) / 255, rel=1e-6)
    planes = q.planes_pos - q.planes_neg
    assert set(torch.unique(q.planes_pos).tolist()) <= {0.0, 1.0}
    assert bool(((q.planes_pos * q.planes_neg) == 0).all())  # a weight is positive or negative, not both
    assert torch.equal(torch.round((planes * 2.0 ** torch.arange(8)).sum(-1)).int(), codes)
    q.eval()
    assert torch.equal(q(), dequantize(codes, step))
    q.train()
    assert torch.equal(q(), dequantize(codes, step))  # relaxed and exact agree while planes are binary


def test_ste_gradient_is_two_to_the_b_over_levels():
    torch.manual_seed(1)
    q = BSQWeight(torch.randn(5, 7), 4, 6, fixed=False)
    upstream = torch.randn(5, 7)
    (q.train_weight() * upstream).sum().backward()
    expected = upstream.unsqueeze(-1) * (float(q.scale.detach()) / 15) * torch.tensor([1.0, 2, 4, 8, 0, 0])
    assert torch.allclose(q.planes_pos.grad, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(q.planes_neg.grad, -expected, rtol=1e-5, atol=1e-7)


def test_group_lasso_is_the_sum_of_plane_norms():
    torch.manual_seed(2)
    q = BSQWeight(torch.randn(3, 4), 3, 5, fixed=False)
    with torch.no_grad():
        q.planes_pos.uniform_(0, 2)
        q.planes_neg.uniform_(0, 2)
    expected = sum(
        torch.sqrt((q.planes_pos[..., b] ** 2).sum() + (q.planes_neg[..., b] ** 2).sum() + 1e-8) for b in range(3)
    )
    assert float(q.group_lasso().detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_requantization_drops_zero_msbs_and_lsbs_without_changing_the_function():
    q = BSQWeight(torch.zeros(4, 5), 8, 8, fixed=False)
    codes = torch.tensor([[4, -8, 12, 0, 20]] * 4, dtype=torch.int32)  # bits 2..4 used: 3 bits after
    q.load_codes(codes, torch.tensor(0.01), 8)
    with torch.no_grad():  # training moved the planes off 0/1 but not across a rounding boundary
        q.planes_pos.add_(0.01 * q.planes_pos)
    before = q.train_weight().detach().clone()
    info = q.requantize()
    assert info == {"bits_before": 8, "bits_after": 3, "rounded": False}
    assert (torch.abs(q.train_weight().detach() - before).max()) <= 1e-5
    assert torch.equal(q.exact_codes()[0], codes // 4)
    assert float(q.scale) == pytest.approx(0.01 * 4 * 7, rel=1e-6)  # s' = s 2^k (2^n' - 1) / (2^n - 1)


def test_precision_grows_by_one_bit_when_planes_exceed_one():
    q = BSQWeight(torch.zeros(2, 3), 3, 8, fixed=False)
    q.load_codes(torch.tensor([[7, -7, 1], [3, 0, -2]], dtype=torch.int32), torch.tensor(0.5), 3)
    with torch.no_grad():
        q.planes_pos[0, 0, 2] = 1.9  # code 7 -> 4 * 1.9 + 3 = 10.6 -> 11, which needs 4 bits
    before = q.train_weight().detach().clone()
    assert q.requantize()["bits_after"] == 4
    assert torch.allclose(q.train_weight().detach(), before, atol=1e-5)
    assert int(q.exact_codes()[0][0, 0]) == 11


def test_fixed_layers_keep_their_bits_and_are_not_regularised():
    model = TinyNet()
    method = BSQ(BSQConfig(alpha=1.0), LayerSelection(fix_bits={"fc": 4}))
    method.prepare(model)
    fc = method.layers["fc"].weight_quantizer
    assert fc.bits == 4 and bool(fc.fixed)
    with torch.no_grad():
        fc.planes_pos.fill_(1.7)
    fc.clamp_planes()
    assert float(fc.planes_pos.max()) == 1.0 and float(fc.planes_pos[..., 4:].abs().max()) == 0
    fc.requantize()
    assert fc.bits == 4


def test_open_loop_larger_alpha_gives_fewer_bits(tmp_path):
    """The paper's mode: alpha fixed, the scheme is whatever it reaches (monotone on this tiny run)."""
    bits = []
    for alpha in (0.0, 5.0, 50.0):
        summary = run_json(
            "search",
            "--method",
            "bsq",
            "--model",
            "lenet5",
            *SMALL,
            "--epochs",
            "2",
            "--set",
            f"alpha={alpha}",
            "--set",
            "requant_every=0.5",
            "--out",
            tmp_path / f"a{alpha}",
        )
        assert summary["target_bits"] is None and "budget_met" not in summary
        bits.append(summary["avg_bits"])
    assert bits[0] >= bits[1] >= bits[2] and bits[0] > bits[2]


def test_budget_mode_lands_in_the_window_and_exports_exactly(tmp_path):
    run = tmp_path / "bsq"
    summary = run_json(
        "search", "--method", "bsq", "--target-bits", "2", "--model", "lenet5", *SMALL, "--epochs", "2", "--out", run
    )
    assert 1.9 - 1e-9 <= summary["avg_bits"] <= 2.0 + 1e-9 and summary["budget_met"]
    exported = run_json("export", run, "-o", tmp_path / "bsq.safetensors")
    assert exported["avg_bits"] == pytest.approx(summary["avg_bits"])
    assert run_json("eval", tmp_path / "bsq.safetensors", "--device", "cpu")["top1"] == summary["top1"]
    ft = run_json("finetune", run, "--epochs", "1", "--out", tmp_path / "ft")
    assert ft["avg_bits"] == pytest.approx(summary["avg_bits"])
    before = json.loads((run / "scheme.json").read_text())["layers"]
    after = json.loads((tmp_path / "ft" / "scheme.json").read_text())["layers"]
    assert [e["bits"] for e in before] == [e["bits"] for e in after]
    assert run_json("eval", tmp_path / "ft", "--device", "cpu")["top1"] == ft["top1"]


def test_config_round_trip_and_validation():
    cfg = BSQConfig(target_bits=2.0, init_bits_by_layer={"conv*": 8, "*": 6}, alpha=0.01)
    assert BSQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.initial_bits("conv1") == 8 and cfg.initial_bits("fc") == 6
    with pytest.raises(Exception, match="max_bits"):
        BSQConfig(init_bits=9)


@pytest.mark.parametrize("act_bits,clip_fixed", [(4, True), (2, False)])
def test_activation_quantization_as_the_paper_runs_it(act_bits, clip_fixed):
    from mpq_cli.models import ModelSpec, build_model

    model = build_model(ModelSpec("lenet5", None, 10, 1, (28, 28)))
    method = BSQ(BSQConfig(act_bits=act_bits))
    method.prepare(model)
    acts = {name: layer.act_quantizer for name, layer in method.layers.items()}
    assert acts["features.0"].bits == 8 and not acts["features.0"].fixed_clip  # the image
    assert acts["classifier.3"].bits == 8 and acts["classifier.3"].fixed_clip  # the last layer's input
    for name in ("features.3", "classifier.1"):
        assert acts[name].bits == act_bits and acts[name].fixed_clip == clip_fixed
        assert acts[name].alpha.requires_grad == (not clip_fixed)
        if clip_fixed:
            assert float(acts[name].alpha) == 6.0


def test_projected_bits_match_what_requantization_gives():
    for seed in range(5):
        torch.manual_seed(seed)
        q = BSQWeight(torch.randn(8, 9), 6, 8, fixed=False)
        with torch.no_grad():
            q.planes_pos.mul_(torch.rand_like(q.planes_pos) * 2)
            q.planes_pos[..., : seed % 3] = 0
            q.planes_neg[..., : seed % 3] = 0
        projected = q.bits_after_requantization()
        assert projected == q.requantize()["bits_after"]


def test_scales_learn_slowly_in_search_and_finetune():
    """A scale's gradient sums over its whole layer; at the full rate it diverged (search) or collapsed (finetune)."""
    model = TinyNet()
    method = BSQ(BSQConfig(scale_lr=0.01))
    method.prepare(model)
    scales = {id(q.scale) for q in method.quantizers().values()}
    for start in (lambda: None, method.start_finetune):
        start()
        groups = method.param_groups(model, 1e-4)
        scale_group = next(g for g in groups if {id(p) for p in g["params"]} == scales)
        assert scale_group["lr_scale"] == 0.01
        assert all(g.get("lr_scale", 1.0) == 1.0 for g in groups if g is not scale_group)


# -- the budget-mode alpha controller (issue 13) ---------------------------------------------------------
def _controller(monkeypatch, projected, **config):
    """A BSQ method whose projected average bits follow ``projected``, one value per controller update."""
    method = BSQ(
        BSQConfig(target_bits=2.0, alpha=0.01, budget_tolerance=0.1, controller_gain=0.1, controller_window=3, **config)
    )
    method.prepare(TinyNet())
    values = iter(projected)
    monkeypatch.setattr(method, "_projected_average_bits", lambda: next(values))
    return method


@pytest.mark.parametrize(
    "projected,factors",
    [
        # above the target and not falling: raise by exp(gain) each update
        ([4.0, 4.0, 4.2], [1, 1, 1]),
        # above and falling: hold while the newest is below the window's highest, raise once it is not
        ([4.0, 3.5, 3.0, 2.8, 2.9, 2.9, 2.9], [1, 0, 0, 0, 0, 0, 1]),
        # inside [target - tol, target]: hold; below: lower by exp(-2 gain)
        ([2.0, 1.95, 1.5, 1.0], [0, 0, -2, -2]),
        # a fall older than the window no longer holds alpha (window 3)
        ([5.0, 3.0, 3.0, 3.0, 3.0], [1, 0, 0, 0, 1]),
    ],
    ids=["above", "falling", "inside-and-below", "window"],
)
def test_alpha_controller_raises_holds_and_lowers(monkeypatch, projected, factors):
    import math

    method = _controller(monkeypatch, projected)
    alpha = method.alpha
    for factor in factors:
        method._update_alpha()
        alpha *= math.exp(0.1 * factor)
        assert method.alpha == pytest.approx(alpha, rel=1e-12)


def test_alpha_controller_acts_every_controller_every_steps(monkeypatch):
    method = _controller(monkeypatch, [4.0] * 10, controller_every=4, project_at=1.0)
    calls = []
    monkeypatch.setattr(method, "_update_alpha", lambda: calls.append(method._step))
    method.on_epoch_start(0, 1, 100)
    for _ in range(13):
        method.on_step_end()
    assert calls == [4, 8, 12]
