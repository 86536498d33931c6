"""ALQ as a method: groups, the schedule, the steps in a model, the run, export and eval."""

import json

import pytest
import torch
from conftest import SMALL, invoke, rewrite_packed, run_json
from torch import nn

from mpq_cli.errors import MpqError
from mpq_cli.layers import LayerSelection
from mpq_cli.methods.alq import ALQ, ALQConfig, group_layout, parse_structure, plan_epochs
from mpq_cli.models.zoo import lenet5, resnet20
from mpq_cli.packing.format import load_packed
from mpq_cli.quant.act import BasisActivation
from mpq_cli.quant.basis import to_groups


# -- groups and schedule ------------------------------------------------------------------------------------
def test_group_layouts_make_the_papers_slices_rows():
    w = torch.randn(6, 4, 3, 3)
    perm, groups = group_layout(tuple(w.shape), "pixel")
    rows = to_groups(w, perm, groups)
    assert rows.shape == (6 * 9, 4)
    assert torch.equal(rows[(2 * 3 + 1) * 3 + 2], w[2, :, 1, 2])  # w[c, :, y, x]: the input channels at one pixel
    perm, groups = group_layout(tuple(w.shape), "kernel")
    assert torch.equal(to_groups(w, perm, groups)[2 * 4 + 3], w[2, 3].reshape(-1))
    perm, groups = group_layout(tuple(w.shape), "channel")
    assert torch.equal(to_groups(w, perm, groups)[5], w[5].reshape(-1))
    fc = torch.randn(5, 8)
    perm, groups = group_layout(tuple(fc.shape), "subchannel", 2)
    assert torch.equal(to_groups(fc, perm, groups)[3], fc[1, 4:])
    with pytest.raises(MpqError, match="does not divide"):
        group_layout((5, 9), "subchannel", 2)
    with pytest.raises(MpqError, match="needs a convolution"):
        group_layout((5, 9), "pixel")
    with pytest.raises(MpqError, match="unknown ALQ group structure"):
        parse_structure("rows")


def test_default_groups_follow_the_paper():
    model = lenet5(10, 1, (28, 28))
    method = ALQ(ALQConfig())
    method.prepare(model)
    q = method.quantizers()
    assert [(q[n].structure, q[n].groups, q[n].group_size) for n in q] == [
        ("kernel", 20, 25),
        ("kernel", 1000, 25),
        ("subchannel:2", 1000, 400),
        ("channel", 10, 500),
    ]
    resnet = ALQ(ALQConfig(groups="layer1.*=kernel"))
    resnet.prepare(resnet20(10, 3, (32, 32)))
    rq = resnet.quantizers()
    assert rq["conv1"].structure == "channel" and rq["layer2.0.conv2"].structure == "pixel"
    assert rq["layer1.0.conv1"].structure == "kernel" and rq["fc"].structure == "subchannel:2"


def test_max_bits_default_is_6_for_built_in_models_and_8_for_others():
    method = ALQ(ALQConfig())
    method.prepare(lenet5(10, 1, (28, 28)))
    assert method.average_bits() == 6.0  # random weights never reach sigma within 6 bases
    user = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 30 * 30, 10))
    other = ALQ(ALQConfig())
    other.prepare(user)
    assert other.average_bits() == 8.0
    fixed = ALQ(ALQConfig(max_bits=3))
    fixed.prepare(lenet5(10, 1, (28, 28)))
    assert fixed.average_bits() == 3.0


def test_plan_gives_each_round_a_pruning_epoch_then_bases_then_coordinates():
    plan = plan_epochs(10, 3, 1 / 3)
    assert [k for _, k in plan] == [
        "prune",
        "basis",
        "coord",
        "prune",
        "basis",
        "coord",
        "prune",
        "basis",
        "coord",
        "coord",
    ]
    assert [k for _, k in plan_epochs(31, 1, 1 / 3)].count("basis") == 10  # the paper's 10 + 20
    assert [k for _, k in plan_epochs(2, 1, 1 / 3)] == ["prune", "basis"]


def test_config_errors_are_clear():
    with pytest.raises(MpqError, match="act-bits must be in 1..8"):
        ALQConfig(act_bits=12)
    with pytest.raises(MpqError, match="prune-ratio"):
        ALQConfig(prune_ratio=1.5)
    with pytest.raises(MpqError, match="unknown ALQ group structure"):
        ALQConfig(groups="fc*=diagonal")


# -- the steps in a model -------------------------------------------------------------------------------------
def _train(model, method, epochs, steps=2, shape=(8, 1, 28, 28), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, *shape, generator=gen)
    y = torch.randint(0, 10, (steps, shape[0]), generator=gen)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for epoch in range(epochs):
        method.on_epoch_start(epoch, epochs, steps)
        for i in range(steps):
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.on_step_end()


def test_a_one_epoch_search_prunes_in_rounds_and_trains_bases_and_coordinates_after_each():
    """Fewer epochs than the rounds' prune, bases and coordinates: the epoch is split into three slots per round
    --prune-ratio needs, so no round cuts more than its share and the pruned model trains its bases and
    coordinates before the search ends (one pruning epoch from 8 bases to 2 left MobileNetV2 at 17 %)."""
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = ALQ(ALQConfig(target_bits=2.0, max_bits=4))
    method.prepare(model)
    kinds = []
    step_end = method.on_step_end

    def record_kind():
        kinds.append(method._kind)
        step_end()

    method.on_step_end = record_kind
    rounds = method._needed_rounds(1)  # 4 bases to 2 at --prune-ratio 0.4: two rounds
    _train(model, method, epochs=1, steps=20)  # 6 slots of 3 or 4 steps
    assert rounds == 2 and method.plan == [(r, k) for r in range(2) for k in ("prune", "basis", "coord")]
    starts = [0, 3, 7, 10, 13, 17, 20]  # round(i * 20 / 6)
    assert kinds == [method.plan[i][1] for i in range(6) for _ in range(starts[i + 1] - starts[i])]
    assert [h["round"] for h in method.history] == [1, 2]  # each round closed at its slot's end
    assert all(h["bits_before"] - h["bits_after"] <= 0.4 * h["bits_before"] + 0.05 for h in method.history)
    assert method.history[-1]["bits_after"] <= 2.0 and method.finalize().budget_met


def test_model_holds_no_full_precision_weight_and_trains_only_biases_and_batchnorm():
    model = lenet5(10, 1, (28, 28))
    method = ALQ(ALQConfig())
    method.prepare(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("bias") for n in trainable)  # no latent weights: bases are buffers


def test_pruning_round_lands_on_its_target_and_the_basis_step_changes_bases_not_widths():
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = ALQ(ALQConfig(target_bits=2.0, rounds=1, max_bits=4))
    method.prepare(model)
    assert method.average_bits() == 4.0
    target = method.target_weight_bits()
    _train(model, method, epochs=1, steps=3)  # the pruning epoch
    bits = method.weight_bits()
    largest_group = max(q.group_size for q in method.quantizers().values())
    assert target - largest_group < bits <= target  # reached, overshooting by less than one group
    assert method.history[0]["bits_after"] <= 2.0
    widths = {n: q.active.sum(1).clone() for n, q in method.quantizers().items()}
    signs = {n: q.signs.clone() for n, q in method.quantizers().items()}
    method.plan = [(0, "prune"), (0, "basis"), (0, "coord")]
    for epoch in (1, 2):
        method.on_epoch_start(epoch, 3, 3)
        model.train()
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
            loss.backward()
            method.on_step_end()
    for n, q in method.quantizers().items():
        assert torch.equal(q.active.sum(1), widths[n])  # Step 2 never changes a width
        assert bool((q.coords >= 0).all())  # negative coordinates were flipped
    assert any(not torch.equal(q.signs, signs[n]) for n, q in method.quantizers().items())


def test_fixed_bits_layers_keep_their_width_and_are_not_pruned():
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = ALQ(ALQConfig(target_bits=1.0, rounds=1), LayerSelection(fix_bits={"classifier.3": 2}))
    method.prepare(model)
    _train(model, method, epochs=1, steps=2)
    assert method.layer_bits()["classifier.3"] == 2.0 and method.average_bits() <= 1.0
    with pytest.raises(MpqError, match="below what the --fix-bits layers alone take"):
        ALQ(ALQConfig(target_bits=0.1), LayerSelection(fix_bits={"classifier.1": 1})).prepare(lenet5(10, 1, (28, 28)))


def test_state_round_trip_restores_bases_and_history():
    torch.manual_seed(0)
    model = lenet5(10, 1, (28, 28))
    method = ALQ(ALQConfig(target_bits=2.0, rounds=1, max_bits=3))
    method.prepare(model)
    _train(model, method, epochs=2, steps=2)
    fresh_model = lenet5(10, 1, (28, 28))
    fresh = ALQ(ALQConfig(target_bits=2.0, rounds=1, max_bits=3))
    fresh.prepare(fresh_model)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(json.loads(json.dumps(method.state_dict())))
    assert fresh.layer_bits() == method.layer_bits() and fresh.history == method.history
    model.eval()
    fresh_model.eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), fresh_model(x))


# -- the command line, export and eval --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alq_run(tmp_path_factory, fp_run):
    out = tmp_path_factory.mktemp("runs") / "alq"
    summary = run_json(
        "search",
        "--method",
        "alq",
        "--model",
        "lenet5",
        "--checkpoint",
        fp_run[0],
        *SMALL,
        "--epochs",
        "4",
        "--rounds",
        "2",
        "--target-bits",
        "0.7",
        "--out",
        out,
    )
    return out, summary


def test_cli_search_reaches_a_sub_one_bit_target_and_reports_rounds(alq_run):
    out, summary = alq_run
    assert summary["budget_met"] and summary["avg_bits"] <= 0.7 and summary["rounds"] == 2
    assert summary["output_channels"] == 20 + 50 + 500 + 10  # lenet5's output channels and neurons
    from safetensors.torch import load_file

    from mpq_cli.quant.basis import BasisForm

    codes = load_file(str(out / "codes.safetensors"))
    layers = json.loads((out / "scheme.json").read_text())["layers"]
    pruned = 0
    for entry in layers:  # output channels whose every weight the saved bases make zero
        weight = BasisForm.from_tensors(codes, entry["name"]).weight(tuple(entry["shape"]))
        pruned += int((weight.reshape(weight.shape[0], -1) == 0).all(1).sum())
    assert summary["pruned_channels"] == pruned
    report = (out / "report.md").read_text()
    assert "## ALQ pruning rounds" in report and "## ALQ groups and pruned channels" in report
    scheme = json.loads((out / "scheme.json").read_text())
    total = sum(e["params"] for e in scheme["layers"])
    assert sum(e["bits"] * e["params"] for e in scheme["layers"]) / total == pytest.approx(summary["avg_bits"])


def test_export_is_bit_exact_and_eval_of_the_file_matches_the_run(alq_run, tmp_path):
    out, summary = alq_run
    packed = tmp_path / "alq.safetensors"
    exported = run_json("export", out, "-o", packed)
    report = run_json("inspect", packed)
    assert all(r["encoding"] in ("basis", "zero") for r in report["layers"])
    assert exported["avg_bits"] == pytest.approx(summary["avg_bits"])
    # sign bits, float32 coordinates and a byte of width per group: stored above nominal, all of it counted
    assert exported["avg_stored_bits"] > exported["avg_bits"]
    from mpq_cli.api import load_run

    _, ctx, method, _, _ = load_run(out)
    ctx.model.eval()
    decoded = load_packed(packed)
    for name, q in method.quantizers().items():
        assert torch.equal(decoded.get_submodule(name).weight, q()), name
    assert run_json("eval", packed, "--device", "cpu")["top1"] == summary["top1"]


def test_finetune_keeps_every_groups_width(alq_run, tmp_path):
    out, summary = alq_run
    tuned = run_json("finetune", out, "--epochs", "2", "--limit-train-batches", "2", "--out", tmp_path / "ft")
    assert tuned["avg_bits"] == summary["avg_bits"]
    from safetensors.torch import load_file

    before, after = load_file(out / "codes.safetensors"), load_file(tmp_path / "ft" / "codes.safetensors")
    widths = [k for k in before if k.endswith(".group_bits")]
    assert widths and all(torch.equal(before[k], after[k]) for k in widths)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".coords"))


def test_basis_activation_takes_the_nearest_level_and_fits_the_data():
    torch.manual_seed(0)
    act = BasisActivation(2)
    x = torch.relu(torch.randn(4, 8, 5, 5))
    act.train()
    for _ in range(30):
        act(x)
    levels = act.levels()
    assert levels.numel() == 4 and bool((act.gamma >= 0).all())
    act.eval()
    quantized = act(x)
    brute = levels[(x.unsqueeze(-1) - levels).abs().argmin(-1)]
    assert torch.equal(quantized, brute)
    assert (quantized - x).pow(2).mean() < 0.25 * (x - x.mean()).pow(2).mean()  # 4 levels fit the data
    act.train()
    probe = (torch.linspace(-3, 6, 50)).requires_grad_(True)
    act(probe).sum().backward()
    levels = act.levels()  # the forward refits first, then quantizes with these
    inside = (probe.detach() >= levels[0]) & (probe.detach() <= levels[-1])
    assert torch.equal(probe.grad, inside.float())  # straight through inside the levels, zero outside


def test_act_bits_quantizes_every_input_but_the_image_and_the_file_matches(tmp_path):
    out = tmp_path / "alq-act"
    summary = run_json(
        "search",
        "--method",
        "alq",
        "--model",
        "lenet5",
        *SMALL,
        "--epochs",
        "2",
        "--rounds",
        "1",
        "--target-bits",
        "2",
        "--act-bits",
        "2",
        "--out",
        out,
    )
    scheme = json.loads((out / "scheme.json").read_text())
    assert [e["act_bits"] for e in scheme["layers"]] == [None, 2, 2, 2]
    packed = tmp_path / "alq-act.safetensors"
    run_json("export", out, "-o", packed)
    model = load_packed(packed)
    assert isinstance(model.get_submodule("features.3").input_quant, BasisActivation)
    assert not hasattr(model.get_submodule("features.0"), "input_quant")
    assert run_json("eval", packed, "--device", "cpu")["top1"] == summary["top1"]
    result = invoke("search", "--method", "alq", *SMALL, "--epochs", "1", "--act-bits", "12", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "--act-bits must be in 1..8" in result.output
    # a file whose activation record or levels are wrong is refused in one line
    for edit, message in (
        (lambda h, t: h["layers"][1]["act"].update(bits=9), "act must be"),
        (lambda h, t: t.pop("features.3.input_quant.gamma"), "input_quant.gamma is missing"),
    ):
        bad = tmp_path / "bad.safetensors"
        box = {}
        rewrite_packed(packed, bad, lambda h, box=box: box.update(h=h), lambda t, e=edit, box=box: e(box["h"], t))
        result = invoke("inspect", bad)
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_methods_lists_alq_with_its_fields():
    listing = run_json("methods")
    fields = listing["alq"]["fields"]
    assert fields["max_bits"]["default"] is None and fields["target_bits"]["default"] == 1.0
    assert listing["alq"]["summary"].startswith("ALQ")


# -- the coordinate step is AMSGrad, flips included (issue 13) ---------------------------------------------
@pytest.mark.parametrize("pull", ["keep-signs", "flip-signs"])
def test_coordinate_step_equals_torch_amsgrad_on_the_unflipped_coordinates(pull):
    """ALQ keeps coordinates >= 0 by flipping a basis' signs when its coordinate goes negative. The
    loss is the same function of ``B0 alpha`` for the original bases ``B0``, so the trajectory must
    equal torch's AMSGrad on unconstrained ``alpha``: with the first moment negated at a flip, it does."""
    from mpq_cli.methods.alq import ALQWeight
    from mpq_cli.quant import alq as alq_ops
    from mpq_cli.quant.basis import from_groups

    torch.manual_seed(0)
    groups, size, lr, decay, steps = 4, 16, 0.05, 1e-3, 300
    q = ALQWeight(torch.randn(groups, size), (0, 1), groups, max_bits=3, sigma=1e-12, fixed=False)
    signs0, active = q.signs.clone(), q.active.clone()
    basis0 = alq_ops.plus_minus(signs0) * active.unsqueeze(-1)  # (G, P, E): the original bases
    alpha = q.coords.clone().requires_grad_(True)  # the reference: unconstrained coordinates
    sign = -1.0 if pull == "flip-signs" else 1.0
    target = sign * torch.einsum("gpe,gp->ge", basis0, q.coords) + 0.1 * torch.randn(groups, size)
    reference = torch.optim.Adam([alpha], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=decay, amsgrad=True)
    flips, worst = 0, 0.0
    for _ in range(steps):
        loss = ((q.train_weight() - target) ** 2).sum()
        loss.backward()
        before = q.signs.clone()
        q.coordinate_step(lr, decay)
        flips += int((q.signs != before).any(-1).sum())
        reference.zero_grad()
        ((torch.einsum("gpe,gp->ge", basis0, alpha) - target) ** 2).sum().backward()
        reference.step()
        ours = from_groups(alq_ops.rows_of(q.signs, q.coords, q.active), (groups, size), (0, 1))
        expected = torch.einsum("gpe,gp->ge", basis0, alpha.detach())
        worst = max(worst, float((ours - expected).abs().max()))  # step by step, not only where both converge
    assert worst < 1e-4, worst
    # each coordinate pulled through zero flips once (a stale first moment flips it back and forth)
    assert (0 < flips <= q.active.sum()) if pull == "flip-signs" else flips == 0


def test_every_scheduled_pruning_round_is_recorded_even_when_its_last_step_has_nothing_to_remove():
    model = lenet5(10, 1, (28, 28))
    method = ALQ(ALQConfig(target_bits=2.0, rounds=2, max_bits=4))
    method.prepare(model)
    method.rounds, method.plan = 2, [(0, "prune"), (0, "coord"), (1, "prune"), (1, "coord")]
    for epoch in (0, 2):
        method.on_epoch_start(epoch, 4, 3)
        state = method._prune
        state["removed"] = state["start"]  # an earlier step of the round overshot: every later quota is <= 0
        for _ in range(3):
            method._prune_step()
    assert [r["round"] for r in method.history] == [1, 2]
