import math

import pytest
import torch
import torch.nn.functional as F

from mpq_cli.errors import MpqError
from mpq_cli.methods import get_method
from mpq_cli.methods.base import Phase
from mpq_cli.methods.csq import CSQConfig, CSQWeight
from mpq_cli.quant.primitives import dequantize, quantize_codes


def _csq(model, loss_probe=None, **cfg):
    method = get_method("csq")(CSQConfig(**cfg))
    method.prepare(model, loss_probe=loss_probe)
    return method


def test_reconstruction_matches_eq5_bit_by_bit():
    torch.manual_seed(0)
    q = CSQWeight(torch.randn(4, 3), CSQConfig(straight_through_masks=False), None)
    with torch.no_grad():
        q.bit_logits_pos.normal_()
        q.bit_logits_neg.normal_()
        q.mask_logits.normal_()
    q.temperature = 3.0
    f = lambda m: torch.sigmoid(3.0 * m)  # noqa: E731
    # the gain of an unmoved bit (logits +-1) through a searched gate (m_B = 0.5), from the sigmoids themselves
    gain = (f(torch.tensor(1.0)) - f(torch.tensor(-1.0))) * f(torch.tensor(0.5))
    assert q.gate_gain() == pytest.approx(float(gain), rel=1e-6)
    expected = (
        sum((f(q.bit_logits_pos[..., b]) - f(q.bit_logits_neg[..., b])) * 2**b * f(q.mask_logits[b]) for b in range(8))
        * q.scale
        / 255
        / gain
    )
    assert torch.allclose(q.train_weight(), expected, atol=1e-6)


def test_straight_through_masks_forward_the_hard_mask_and_backward_the_sigmoid():
    torch.manual_seed(0)
    weight = torch.randn(4, 3)
    masks = torch.tensor([-0.3, 0.2, -0.05, 0.4, 0.1, -0.2, 0.3, 0.5])
    layers = {}
    for ste in (True, False):
        q = layers[ste] = CSQWeight(weight, CSQConfig(straight_through_masks=ste), None)
        with torch.no_grad():
            q.mask_logits.copy_(masks)
        q.temperature = 3.0
    hard, soft = layers[True], layers[False]
    f = lambda m: torch.sigmoid(3.0 * m)  # noqa: E731
    gain = float(f(torch.tensor(1.0)) - f(torch.tensor(-1.0)))  # no mask factor: a kept bit's gate is 1
    assert hard.gate_gain() == pytest.approx(gain, rel=1e-6)
    digits = f(hard.bit_logits_pos) - f(hard.bit_logits_neg)
    expected = (digits * 2 ** torch.arange(8) * (masks >= 0)).sum(-1) * hard.scale / 255 / gain
    assert torch.allclose(hard.train_weight(), expected, atol=1e-6)  # forward: Eq. 5 with the hard mask
    # backward: d/dm_B is the soft form's, up to the gate-gain factor the two forms divide by
    upstream = torch.randn(4, 3)
    (hard.train_weight() * upstream).sum().backward()
    (soft.train_weight() * upstream).sum().backward()
    soft_gate = f(masks)
    # the soft form's gradient per gate, d/df_b, with its own gain; the hard form's d/df_b is the same sum over
    # weights with its gain, and both then multiply by f'(m_b) = 3 f (1 - f)
    d_df = ((digits * 2 ** torch.arange(8)) * (upstream * hard.scale / 255).unsqueeze(-1)).sum((0, 1))
    assert torch.allclose(hard.mask_logits.grad, d_df / gain * 3 * soft_gate * (1 - soft_gate), atol=1e-5)
    assert not torch.allclose(hard.mask_logits.grad, soft.mask_logits.grad, atol=1e-5)  # a different forward


def test_hard_gate_weights_are_scale_over_levels_times_integer(tiny):
    method = _csq(tiny, target_bits=2)
    with torch.no_grad():
        for q in method.quantizers().values():
            q.bit_logits_pos.normal_()
            q.bit_logits_neg.normal_()
            q.mask_logits.copy_(torch.tensor([-1.0, 1, -1, 1, 1, -1, -1, 1]))
    tiny.eval()
    for layer in method.layers.values():
        q = layer.weight_quantizer
        w = q()
        integer = w / (q.scale / 255)
        assert torch.allclose(integer, torch.round(integer), atol=1e-4)
        digits = (q.bit_logits_pos >= 0).int() - (q.bit_logits_neg >= 0).int()
        expected_codes = (digits * torch.tensor([0, 2, 0, 8, 16, 0, 0, 128])).sum(-1)
        assert torch.equal(w, expected_codes.float() * (q.scale / 255))
        assert q.nominal_bits() == 4


def test_initial_exact_model_is_8bit_and_relaxed_model_the_checkpoint(tiny):
    weight = tiny.conv.weight.detach().clone()
    method = _csq(tiny)
    q = method.quantizers()["conv"]
    max_abs = weight.abs().max()
    codes, step = q.exact_codes()  # hard gates give the 8-bit codes and their step
    assert torch.equal(codes, quantize_codes(weight, max_abs, 8))
    assert torch.allclose(step, max_abs / 255)
    # the 8-bit rounding residual sits in the lowest bit's logits: at beta_start the relaxed weight is the
    # checkpoint's (residuals are clipped to 0.49 of a step, so within 0.01 of a step)
    assert torch.allclose(q.train_weight(), weight, atol=0.0101 * float(step))
    assert not torch.allclose(q.train_weight(), dequantize(codes, step), atol=0.05 * float(step))


def test_without_residuals_relaxed_model_equals_8bit_model_at_every_beta(tiny):
    weight = tiny.conv.weight.detach().clone()
    method = _csq(tiny, carry_residual=False)
    q = method.quantizers()["conv"]
    max_abs = weight.abs().max()
    expected = dequantize(quantize_codes(weight, max_abs, 8), max_abs / 255)
    for beta in (1.0, 7.0, 200.0):  # the gate-gain normalisation keeps relaxed == exact until logits move
        q.temperature = beta
        assert torch.allclose(q.train_weight(), expected, atol=1e-6)


@pytest.mark.parametrize("beta,c", [(1.0, 1.0), (2.0, 0.25)], ids=["default", "small-logits"])
def test_restart_with_target_keeps_codes_and_carries_the_residual(beta, c):
    torch.manual_seed(0)
    target = torch.randn(30, 40)
    q = CSQWeight(torch.randn(30, 40), CSQConfig(init_bit_logit=c), None)
    q.temperature = beta
    step = torch.tensor(0.05)
    unit = 8 * step  # bits {3, 4} selected: codes are multiples of 8
    codes = (torch.clamp(torch.round(target / unit), -3, 3) * 8).to(torch.int32)
    mask = torch.tensor([0.0, 0, 0, 1, 1, 0, 0, 0])
    q.load_codes(codes, step, mask, fixed=True, target=target)
    exact, exact_step = q.exact_codes()
    assert torch.equal(exact, codes) and torch.allclose(exact_step, step)
    residual = ((target - codes * step) / unit).clamp(-0.49, 0.49)
    assert torch.allclose(q.train_weight(), codes * step + residual * unit, atol=1e-5)
    # a weight near a threshold its lowest bit decides (wanted digit near +-1/2) has that bit's logit near 0
    digit = ((codes.abs() >> 3) & 1) * codes.sign() + residual
    near = (digit.abs() - 0.5).abs() < 0.04
    low = torch.minimum(q.bit_logits_pos[..., 3].abs(), q.bit_logits_neg[..., 3].abs())
    assert near.any() and (low[near] < 0.1 * q.init_bit_logit).all()


def _logit_grads(q):
    q.bit_logits_pos.grad = None
    torch.manual_seed(1)
    (q.train_weight() * torch.randn(q.shape)).sum().backward()
    q.precondition_grads()
    return q.bit_logits_pos.grad.clone()


def test_preconditioner_divides_logit_gradients_by_bit_weight_squared():
    torch.manual_seed(0)
    q = CSQWeight(torch.randn(5, 4), CSQConfig(), None)
    q.temperature = 2.0
    plain = _logit_grads(q)
    q.precondition = True
    kappa = q.scale.detach() * 2.0 ** torch.arange(8) / (255 * q.gate_gain())
    assert torch.allclose(_logit_grads(q), plain / kappa.pow(2), rtol=1e-4)


@pytest.mark.parametrize(
    "mode,search,fixed",
    [("none", False, False), ("fixed", False, True), ("always", True, True)],
    ids=["none", "fixed", "always"],
)
def test_precondition_modes(tiny, mode, search, fixed):
    from mpq_cli.layers import LayerSelection

    method = get_method("csq")(CSQConfig(target_bits=2, precondition=mode), LayerSelection(fix_bits={"fc": 2}))
    method.prepare(tiny)
    method.on_epoch_start(0, 1, 10)
    qs = method.quantizers()
    assert qs["conv"].precondition is search  # still searching its bits
    assert qs["fc"].precondition is fixed  # scheme fixed from the start
    method.start_finetune()
    method.on_epoch_start(0, 1, 10)
    assert qs["conv"].precondition is fixed


def test_regulariser_sign_follows_budget(tiny):
    method = _csq(tiny, target_bits=2)  # 8 bits selected > 2: positive, pushes masks down
    assert method.regularizer().item() > 0
    method.regularizer().backward()
    assert all((q.mask_logits.grad > 0).all() for q in method.quantizers().values())
    method = _csq(tiny.__class__(), target_bits=8)
    for q in method.quantizers().values():
        with torch.no_grad():
            q.mask_logits[:4] = -1.0  # 4 bits < 8: negative, grows bits
    assert method.regularizer().item() < 0


def test_average_bits_weighted_by_parameters(tiny):
    method = _csq(tiny)
    qs = method.quantizers()
    with torch.no_grad():
        qs["conv"].mask_logits.fill_(1.0)  # 8 bits, 54 weights
        qs["fc"].mask_logits.fill_(-1.0)
        qs["fc"].mask_logits[0] = 1.0  # 1 bit, 240 weights
    assert method.average_bits() == pytest.approx((8 * 54 + 1 * 240) / 294)


def test_temperature_schedule_reaches_beta_max(tiny):
    method = _csq(tiny, project_at=1.0)
    method.on_epoch_start(0, 2, 5)
    assert method.beta == pytest.approx(1.0)
    seen = []
    for epoch in range(2):
        method.on_epoch_start(epoch, 2, 5)
        for _ in range(5):
            method.on_step_end()
            seen.append(method.beta)
    # geometric from beta_0 = 1 to 200 over the 10 steps' 9 intervals, then held
    assert seen == pytest.approx([200.0 ** min(i / 9, 1.0) for i in range(1, 11)], rel=1e-9)
    assert all(q.temperature == pytest.approx(200.0) for q in method.quantizers().values())


def _betas_over_a_projected_run(method, epochs=2, steps=5):
    seen, phases = [], []
    for epoch in range(epochs):
        method.on_epoch_start(epoch, epochs, steps)
        for _ in range(steps):
            seen.append(method.beta)  # the temperature this step trains at
            phases.append(method.phase)
            method.on_step_end()
    return seen, phases


def test_search_reaches_beta_max_at_the_projection_then_rewinds(tiny):
    from mpq_cli.engine import loss_probe

    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    method = _csq(tiny, loss_probe=loss_probe(tiny, batches, 1), target_bits=3, project_at=0.5)  # the default ramp
    tiny.train()
    seen, phases = _betas_over_a_projected_run(method)
    # Alg. 1: the search stage (steps 0-4) ends at beta_max with the gates hard; fine-tuning (5-9) ramps again
    assert phases == [Phase.SEARCH] * 5 + [Phase.FINETUNE] * 5
    assert seen == pytest.approx([200.0 ** (i / 4) for i in range(5)] * 2, rel=1e-9)


def test_saved_configs_before_version_6_keep_one_ramp_over_the_run(tiny):
    from mpq_cli.engine import loss_probe

    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    assert CSQConfig().ramp_to_projection is True  # Alg. 1's, the default since version 6
    cfg = CSQConfig.from_dict({"version": 5, "target_bits": 3, "project_at": 0.5})
    assert cfg.ramp_to_projection is False
    method = get_method("csq")(cfg)
    method.prepare(tiny, loss_probe=loss_probe(tiny, batches, 1))
    tiny.train()
    seen, _ = _betas_over_a_projected_run(method)
    # the old schedule: projected at 200^(5/9) with gates soft, then a ramp over the remaining 5 steps
    assert seen == pytest.approx([200.0 ** (i / 9) for i in range(5)] + [200.0 ** (i / 4) for i in range(5)])


def _loss_probe(model, x, y):
    def probe():
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    return probe


@pytest.mark.parametrize("start_bits,target", [(8, 2.0), (1, 5.0), (3, 3.0)], ids=["drop", "add", "already-in"])
def test_budget_guarantee(start_bits, target):
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)
    )
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    method = _csq(model, loss_probe=_loss_probe(model, x, y), target_bits=target)
    with torch.no_grad():
        for q in method.quantizers().values():
            q.mask_logits.copy_(torch.linspace(-1, 1, 8))
            q.mask_logits[: 8 - start_bits] = -torch.rand(8 - start_bits) - 0.1
            q.mask_logits[8 - start_bits :] = torch.rand(start_bits) + 0.1
    info = method.finalize()
    assert info.budget_met
    assert target - 0.1 <= method.average_bits() <= target + 1e-9
    assert method.phase is Phase.FINAL
    if start_bits == 3:
        assert info.budget_changes == []


def test_budget_step_is_loss_aware():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))

    def probe():  # only layer "0" matters to this loss: the budget step must take the bit from layer "1"
        return 1.0 + (8 - method.layer_bits()["0"])

    method = _csq(model, loss_probe=probe, target_bits=7.5)
    info = method.finalize()
    assert info.budget_met
    assert [(c["layer"], c["bits_before"], c["bits_after"]) for c in info.budget_changes] == [("1", 8, 7)]
    assert method.layer_bits() == {"0": 8, "1": 7}


def test_budget_step_never_zeroes_the_output_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))

    def probe():  # a broken model: the probe "prefers" a constant output (layer "1" at 0 bits)
        bits = method.layer_bits()
        return 1.0 + (0 if bits["1"] == 0 else 5) + 0.01 * (8 - bits["0"])

    method = _csq(model, loss_probe=probe, target_bits=4.0, allow_zero_bits=True)
    info = method.finalize()
    assert info.budget_met and method.layer_bits()["1"] > 0  # never the output layer, even when allowed


@pytest.mark.parametrize("beta, straight_through", [(1.0, False), (200.0, False), (1.0, True)])
def test_budget_step_lifts_a_layer_whose_search_dropped_every_bit(beta, straight_through):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    weight = model[0].weight.detach().clone()
    losses = []

    def probe():  # every bit counts, and a dead layer (all-zero codes) costs most
        dead = sum(int(not q.exact_codes()[0].any()) for q in method.quantizers().values())
        losses.append(1.0 + 5.0 * dead + 0.1 * sum(method.layer_bits().values()))
        return losses[-1]

    method = _csq(model, loss_probe=probe, target_bits=2.0, straight_through_masks=straight_through)
    with torch.no_grad():  # the search left layer "0" at 0 bits and "1" at 4: inside [1.9, 2], yet collapsed
        method.layers["0"].weight_quantizer.mask_logits.fill_(-0.5)
        method.layers["1"].weight_quantizer.mask_logits.copy_(torch.tensor([-0.5] * 4 + [0.5] * 4))
    for q in method.quantizers().values():
        q.temperature = beta  # 200: a search's end, where a dropped plane's relaxed weight is ~0
    info = method.finalize()
    bits, lifted = method.layer_bits(), method.layers["0"].weight_quantizer
    assert info.budget_met and bits["0"] > 0 and 1.9 - 1e-9 <= method.average_bits() <= 2.0 + 1e-9
    codes, step = lifted.exact_codes()
    # lifted from what its bit logits hold (its planes, mask ignored), not from its masked weight (about 0)
    assert codes.count_nonzero() > codes.numel() // 4
    assert torch.corrcoef(torch.stack([(codes * step).flatten(), weight.flatten()]))[0, 1] > 0.7
    first = info.budget_changes[0]
    assert (first["layer"], first["bits_before"], first["lifted_from_zero"]) == ("0", 0, True)
    assert first["bits_after"] == bits["0"]
    assert first["probe_loss_before"] == losses[0] > first["probe_loss_after"]  # from before the lift


def test_projection_meets_budget_then_fixes_scheme(tiny):
    from mpq_cli.engine import loss_probe

    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    method = _csq(tiny, loss_probe=loss_probe(tiny, batches, 1), target_bits=3, project_at=0.5)
    tiny.train()
    method.on_epoch_start(0, 1, 10)
    for _ in range(4):
        method.on_step_end()
    assert method.phase is Phase.SEARCH and method.average_bits() == 8
    method.on_step_end()  # step 5 of 10: project
    assert method.phase is Phase.FINETUNE
    assert tiny.training, "the probe must leave the model in training mode"
    assert 2.9 - 1e-9 <= method.average_bits() <= 3 + 1e-9
    assert method.regularizer() is None
    assert all(bool(q.mask_is_fixed) and not q.mask_logits.requires_grad for q in method.quantizers().values())
    info = method.finalize()
    assert info.budget_met and info.avg_bits_before_budget_step == 8 and info.budget_changes


def test_finetune_fixes_the_scheme(tiny):
    method = _csq(tiny, target_bits=2)
    with torch.no_grad():
        for q in method.quantizers().values():
            q.mask_logits.copy_(torch.tensor([-1.0, -1, -1, -1, -1, -1, 1, 1]))
    before = method.layer_bits()
    method.start_finetune()
    assert method.phase is Phase.FINETUNE and method.beta == pytest.approx(1.0)
    assert method.regularizer() is None
    tiny.train()
    opt = torch.optim.SGD([p for p in tiny.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        loss = tiny(torch.randn(4, 1, 8, 8)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert method.layer_bits() == before
    q = method.quantizers()["fc"]
    assert not q.mask_logits.requires_grad
    assert torch.equal(q.soft_mask(), torch.tensor([0.0, 0, 0, 0, 0, 0, 1, 1]))


def test_fix_bits_keeps_top_bits(tiny):
    from mpq_cli.layers import LayerSelection

    cfg = CSQConfig(target_bits=2, fixed_scheme_training="bits")  # Alg. 1's form: codes on the 8-bit lattice
    method = get_method("csq")(cfg, LayerSelection(fix_bits={"conv": 3}))
    method.prepare(tiny)
    q = method.quantizers()["conv"]
    assert q.nominal_bits() == 3 and bool(q.mask_is_fixed)
    assert "conv" not in method.searchable()
    codes, step = q.exact_codes()
    assert (codes % 32 == 0).all()
    # the LSQ form (version 7's start) holds the same weights as codes on a 3-bit grid with a 32x step
    from conftest import TinyNet

    torch.manual_seed(0)  # the fixture's weights
    lsq_cfg = CSQConfig(target_bits=2, second_stage_start="search")  # version 7's start: the same codes
    lsq = get_method("csq")(lsq_cfg, LayerSelection(fix_bits={"conv": 3}))
    lsq.prepare(TinyNet())
    lsq_codes, lsq_step = lsq.quantizers()["conv"].exact_codes()
    assert torch.equal(lsq_codes * 32, codes) and torch.equal(lsq_step, step * 32)


def test_version_1_configs_keep_their_behaviour():
    old = CSQConfig.from_dict({"version": 1, "target_bits": 2.0})  # a run saved before residuals and preconditioning
    assert (old.carry_residual, old.precondition, old.contiguous_bits) == (False, "none", False)
    new = CSQConfig.from_dict({"target_bits": 2.0})  # command-line options carry no version: today's defaults
    assert (new.version, new.carry_residual, new.precondition, new.ramp_to_projection) == (9, True, "fixed", True)
    assert (new.fixed_scheme_training, new.project_at, new.second_stage_start) == ("lsq", 0.25, "search")
    assert (new.budget_probe, old.budget_probe) == ("screen", "exact")
    five = CSQConfig.from_dict({"version": 5})  # before Alg. 1's ramp became the default
    assert not new.straight_through_masks and not five.ramp_to_projection and not five.straight_through_masks


def test_config_round_trip_and_validation():
    cfg = CSQConfig(target_bits=2.5, reg_strength=0.02)
    assert CSQConfig.from_dict(cfg.to_dict()) == cfg
    from mpq_cli.errors import MpqError

    with pytest.raises(MpqError):
        CSQConfig(target_bits=9)
    with pytest.raises(MpqError):
        CSQConfig.from_dict({"bogus": 1})
    assert math.isclose(CSQConfig().reg_strength, 0.01)


def _fit_teacher(mode: str) -> tuple[float, float]:
    """A fixed 2-bit layer fitting a teacher whose codes are one step away from its own, at the
    paper's SGD lr with beta held at 1: the share of codes matching the teacher's, before and after."""
    from mpq_cli.layers import LayerSelection

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(32, 8))
    cfg = CSQConfig(target_bits=2, precondition=mode, fixed_scheme_training="bits")  # the bit logits' form
    method = get_method("csq")(cfg, LayerSelection(fix_bits={"0": 2}))
    method.prepare(student)
    method.on_epoch_start(0, 1, 10**6)  # beta stays at 1
    q = method.quantizers()["0"]
    codes, step = q.exact_codes()
    top = codes.abs().max()
    teacher_codes = torch.clamp(codes + torch.randint(-1, 2, codes.shape) * (top // 3), -top, top)
    teacher = dequantize(teacher_codes, step)
    bias = student[0].layer.bias.detach().clone()
    opt = torch.optim.SGD([q.bit_logits_pos, q.bit_logits_neg], lr=0.1, momentum=0.9)
    student.train()
    for _ in range(300):
        x = torch.randn(64, 32)
        loss = F.mse_loss(student(x), x @ teacher.T + bias)
        opt.zero_grad()
        loss.backward()
        method.before_optimizer_step()
        opt.step()
    after, _ = q.exact_codes()
    return float((codes == teacher_codes).float().mean()), float((after == teacher_codes).float().mean())


def test_preconditioned_bits_learn_a_teacher_better_than_plain_ones():
    before, plain = _fit_teacher("none")
    _, preconditioned = _fit_teacher("fixed")
    assert preconditioned > max(before, plain) + 0.1


# -- a budget met in nominal bits is met in the file (issue 13) ---------------------------------------------
def _gapped(tiny, contiguous: bool):
    # gaps survive only in Alg. 1's form (the LSQ second stage needs contiguous bits)
    form = "lsq" if contiguous else "bits"
    method = _csq(tiny, loss_probe=lambda: 0.0, target_bits=2, contiguous_bits=contiguous, fixed_scheme_training=form)
    with torch.no_grad():
        for q in method.quantizers().values():  # bits 0 and 7 selected: 2 nominal bits, codes up to 129
            q.mask_logits.copy_(torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1]))
    return method


@pytest.mark.parametrize("contiguous", [True, False])
def test_a_gapped_mask_is_made_contiguous_when_the_scheme_is_fixed(tiny, contiguous):
    from mpq_cli.packing.encodings import plan_codes

    method = _gapped(tiny, contiguous)
    info = method.finalize()

    def stored_bits(q):  # bits per weight the file stores for the codes: packed fields and any code table
        codes = q.exact_codes()[0]
        return (8 * plan_codes(codes).payload_bytes(codes.numel()) - 32) / codes.numel()  # less the step

    stored = {n: stored_bits(q) for n, q in method.quantizers().items()}
    if contiguous:
        assert sorted(info.facts["made_contiguous"]) == ["conv", "fc"] and info.budget_met
        for name, q in method.quantizers().items():
            selected = torch.nonzero(q.hard_mask()).flatten().tolist()
            assert len(selected) == 2 and selected[1] - selected[0] == 1, name
            assert stored[name] <= 3 + 8 / q.exact_codes()[0].numel()  # 2 magnitude bits and a sign (byte padding)
    else:
        assert info.facts["made_contiguous"] == [] and not info.budget_met  # 2 nominal bits, but not in the file
        # codes in {0, +-1, +-128, +-129}: 3-bit indices plus a table of 7 codes, or 9-bit integers
        assert stored["conv"] > 4


def test_old_csq_configs_keep_their_masks():
    assert CSQConfig.from_dict({"version": 2, "target_bits": 2.0}).contiguous_bits is False
    assert CSQConfig.from_dict({"target_bits": 2.0}).contiguous_bits is True
    assert CSQConfig.from_dict({"version": 3, "target_bits": 2.0}).mask_lr is None
    assert CSQConfig.from_dict({"target_bits": 2.0}).mask_lr == 0.1


def test_group_lr_gives_a_group_its_own_peak_under_sgd_only():
    from mpq_cli.engine import TrainConfig, group_lr

    sgd, adam = TrainConfig(lr=0.002), TrainConfig(lr=0.002, optimizer="adam")
    assert group_lr({"sgd_peak_lr": 0.1}, 0.001, sgd) == pytest.approx(0.05)  # half-way down the schedule
    assert group_lr({"sgd_peak_lr": 0.1}, 0.001, adam) == 0.001
    assert group_lr({"lr_scale": 0.01}, 0.001, sgd) == pytest.approx(1e-5)
    assert group_lr({"sgd_peak_lr": None}, 0.001, sgd) == 0.001


@pytest.mark.parametrize("mask_lr", [0.1, None])
def test_masks_move_at_a_fine_tuning_lr(mask_lr):
    """At --lr 0.002 (fine-tuning a pretrained model) the paper's lambda hardly moves masks learning at
    that rate: on MobileNetV2 no bit had dropped before the budget step. At their own rate they do."""
    from conftest import TinyNet

    from mpq_cli.data import DataConfig, load_data
    from mpq_cli.engine import TrainConfig, fit

    torch.manual_seed(0)
    model = TinyNet()
    method = _csq(model, target_bits=2, project_at=1.0, mask_lr=mask_lr)
    _, train, val = load_data(DataConfig("synthetic", batch_size=16, input_size=(1, 8, 8), limit_train_batches=20))
    fit(model, train, val, TrainConfig(epochs=3, lr=0.002), hooks=method)
    bits = method.average_bits()
    assert bits < 7 if mask_lr else bits == 8


# -- the second stage in LSQ's form (fixed_scheme_training=lsq) ----------------------------------------------------
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_lsq_form_keeps_the_codes_at_the_switch(granularity):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    cfg = CSQConfig(target_bits=2, fixed_scheme_training="lsq", second_stage_start="search", granularity=granularity)
    q = CSQWeight(w, cfg, None)
    codes, step, mask = q.requantized(3)  # 3 contiguous bits at the top of the 8 (a shift of 5)
    assert mask.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    q.load_codes(codes, step, mask, fixed=True, target=w)
    exact = q.exact_weight()
    q.to_latent(w)
    assert q.latent_form_bits() == 3 and q.nominal_bits() == 3
    lsq_codes, lsq_step = q.exact_codes()
    assert lsq_codes.abs().max() <= 7  # a 3-bit grid, no longer multiples of 2^5 on the 8-bit lattice
    assert torch.equal(lsq_step, (step * 32).reshape(lsq_step.shape))
    assert torch.equal(q.exact_weight(), exact)  # the switch changes no weight of the exact model
    q.train()
    assert torch.allclose(q.train_weight(), exact, atol=1e-6)  # nor of the training one
    # the latent keeps the relaxed weight (within half a step of its code), and only it and its step train
    assert ((q.latent - exact).abs() <= 0.49 * lsq_step.reshape(-1, *[1] * 3) + 1e-6).all()
    assert not ((q.latent - exact).abs() < 1e-9).all()
    trainable = {n for n, p in q.named_parameters() if p.requires_grad}
    assert trainable == {"latent", "latent_step"}


def test_lsq_second_stage_trains_the_latent_under_the_projected_scheme(tiny):
    from mpq_cli.engine import loss_probe

    torch.manual_seed(0)
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    method = _csq(tiny, loss_probe=loss_probe(tiny, batches, 1), target_bits=3, fixed_scheme_training="lsq")
    tiny.train()
    opt = torch.optim.SGD(method.param_groups(tiny, 0.0), lr=0.05)
    method.on_epoch_start(0, 1, 10)
    for step in range(10):
        x, y = batches[0]
        loss = F.cross_entropy(tiny(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_step_end()
        if step == 4:  # the projection: every layer with bits now trains in LSQ's form
            assert method.phase is Phase.FINETUNE
            scheme = method.layer_bits()
            forms = {n: q.latent_form_bits() for n, q in method.quantizers().items()}
            assert forms == {n: (b or None) for n, b in scheme.items()}
            latent = {n: q.latent.detach().clone() for n, q in method.quantizers().items()}
            if method.wants_optimizer_reset():
                opt.state.clear()
    assert method.layer_bits() == scheme  # the scheme stays fixed
    moved = [n for n, q in method.quantizers().items() if not torch.equal(q.latent, latent[n])]
    assert moved and all(forms[n] for n in moved)
    for q in method.quantizers().values():  # no bit logit trains in the second stage
        assert q.bit_logits_pos.grad is None or q.latent_form_bits() is None
        codes, _ = q.exact_codes()
        assert codes.abs().max() <= 2 ** q.nominal_bits() - 1
    assert method.finalize().budget_met


def test_lsq_form_survives_a_state_dict_round_trip(tiny):
    from mpq_cli.layers import LayerSelection

    cfg = CSQConfig(target_bits=2, fixed_scheme_training="lsq")
    method = get_method("csq")(cfg, LayerSelection(fix_bits={"*": 3}))  # fixed from the start: LSQ's form at once
    method.prepare(tiny)
    assert all(q.latent_form_bits() == 3 for q in method.quantizers().values())
    with torch.no_grad():
        for q in method.quantizers().values():
            q.latent.add_(0.01 * torch.randn_like(q.latent))
    state, method_state = tiny.state_dict(), method.state_dict()
    torch.manual_seed(5)
    other = type(tiny)()
    again = get_method("csq")(cfg, LayerSelection(fix_bits={"*": 3}))
    again.prepare(other)
    other.load_state_dict(state)
    again.load_state_dict(method_state)
    for name, q in again.quantizers().items():
        assert q.latent_form_bits() == 3 and q.latent.requires_grad and not q.bit_logits_pos.requires_grad
        assert torch.equal(q.exact_weight(), method.quantizers()[name].exact_weight())


def test_lsq_form_config():
    six = CSQConfig.from_dict({"version": 6})  # runs before version 7 keep Alg. 1's stage 2 and their projection
    assert (six.fixed_scheme_training, six.project_at) == ("bits", 0.5)
    with pytest.raises(MpqError, match="contiguous_bits"):
        CSQConfig(fixed_scheme_training="lsq", contiguous_bits=False)
    with pytest.raises(MpqError, match="fixed_scheme_training"):
        CSQConfig(fixed_scheme_training="latent")


def test_lsq_form_run_exports_evaluates_and_finetunes_exactly(fp_run, tmp_path):
    from conftest import SMALL, run_json

    out = tmp_path / "csq"
    args = ["--method", "csq", "--target-bits", "2", "--model", "lenet5", "--set", "fixed_scheme_training=lsq"]
    summary = run_json("search", *args, "--checkpoint", fp_run[0], *SMALL, "--epochs", "2", "--out", out)
    run_json("export", out, "-o", tmp_path / "f.safetensors")
    assert run_json("eval", tmp_path / "f.safetensors")["top1"] == summary["top1"]
    assert run_json("inspect", tmp_path / "f.safetensors")["avg_stored_bits"] == summary["avg_stored_bits"]
    tuned = run_json("finetune", out, "--epochs", "1", "--out", tmp_path / "ft")
    assert tuned["avg_bits"] == summary["avg_bits"]
    run_json("export", tmp_path / "ft", "-o", tmp_path / "ft.safetensors")
    assert run_json("eval", tmp_path / "ft.safetensors")["top1"] == tuned["top1"]


@pytest.mark.parametrize("form", ["lsq", "bits"])
def test_a_lifted_layer_restarts_from_what_its_bit_logits_hold(form):
    """The projection's restart carries each layer's relaxed weight; for a layer the budget step lifted off 0 bits
    that is the weight its bit logits hold (mask ignored), not its masked weight (about 0), which would start every
    one of its weights up to 0.49 of a step toward 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))

    def probe():  # a dead layer (all-zero codes) costs most
        dead = sum(int(not q.exact_codes()[0].any()) for q in method.quantizers().values())
        return 1.0 + 5.0 * dead + 0.1 * sum(method.layer_bits().values())

    method = _csq(
        model,
        loss_probe=probe,
        target_bits=2.0,
        fixed_scheme_training=form,
        second_stage_start="search",  # the relaxed weight carried into the latent (version 7)
        straight_through_masks=True,
    )
    method.on_epoch_start(0, 1, 10)
    q = method.layers["0"].weight_quantizer
    with torch.no_grad():  # the search dropped every bit of layer "0"
        q.mask_logits.fill_(-0.5)
        method.layers["1"].weight_quantizer.mask_logits.copy_(torch.tensor([-0.5] * 4 + [0.5] * 4))
        held = q.train_weight(masked=False).clone()
        assert q.train_weight().abs().max() == 0
    method.project()
    assert method.budget_changes[0]["lifted_from_zero"] and method.layer_bits()["0"] > 0
    exact = q.exact_weight()
    with torch.no_grad():
        if form == "lsq":
            restart, unit = q.latent, q.exact_codes()[1]
        else:
            low = int(torch.nonzero(q.fixed_mask).flatten()[0])
            restart, unit = q.train_weight(), q.exact_codes()[1] * 2**low
    expected = exact + torch.minimum(torch.maximum(held - exact, -0.49 * unit), 0.49 * unit)
    assert torch.allclose(restart, expected, atol=1e-4 * float(unit.max()))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_second_stage_from_the_checkpoint_restarts_every_searched_layer_as_uniform_starts(tiny, granularity):
    """``second_stage_start=checkpoint``: at the projection each searched layer's latent is the weight it was loaded
    with (the search trained the bit logits, not the latent) and its step the least-squares clip at its fixed bits,
    what ``uniform`` starts from; the scheme is the search's."""
    from mpq_cli.engine import loss_probe
    from mpq_cli.quant.primitives import least_squares_scale, max_code

    torch.manual_seed(0)
    loaded = {n: m.weight.detach().clone() for n, m in tiny.named_modules() if hasattr(m, "weight")}
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    cfg = {"target_bits": 3, "second_stage_start": "checkpoint", "granularity": granularity}
    method = _csq(tiny, loss_probe=loss_probe(tiny, batches, 1), **cfg)
    tiny.train()
    opt = torch.optim.SGD(method.param_groups(tiny, 5e-4), lr=0.05)
    method.on_epoch_start(0, 1, 10)
    while method.phase is Phase.SEARCH:  # the search stage trains the bit logits, up to the projection
        x, y = batches[0]
        opt.zero_grad()
        F.cross_entropy(tiny(x), y).backward()
        opt.step()
        method.on_step_end()
    assert method._step == 3
    for name, q in method.quantizers().items():
        bits = q.latent_form_bits()
        assert bits == method.layer_bits()[name] and bits > 0
        assert torch.equal(q.latent, loaded[name])
        clip = least_squares_scale(loaded[name], bits, granularity=granularity)
        assert torch.equal(q.latent_step, clip.reshape(q.latent_step.shape) / max_code(bits))
        assert q.latent.requires_grad and not q.bit_logits_pos.requires_grad


def test_second_stage_start_config():
    assert CSQConfig().second_stage_start == "search"  # from scratch the loaded weights are random
    csq = get_method("csq")  # version 8: from trained weights the second stage restarts from them
    assert csq.recipe_fields("checkpoint", {"target_bits": 2})["second_stage_start"] == "checkpoint"
    assert "second_stage_start" not in csq.recipe_fields("paper", {"target_bits": 2})
    given = {"second_stage_start": "search"}
    assert csq.recipe_fields("checkpoint", given)["second_stage_start"] == "search"
    seven = CSQConfig.from_dict({"version": 7})  # runs of version 7 keep the latent from the search
    assert (seven.second_stage_start, seven.fixed_scheme_training) == ("search", "lsq")
    assert CSQConfig.from_dict({"version": 6}).fixed_scheme_training == "bits"  # and older ones the bit logits
    with pytest.raises(MpqError, match="second_stage_start"):
        CSQConfig(second_stage_start="reference")


def test_param_groups_decay_weights_and_latents_not_steps_or_masks(tiny):
    """Weight decay (the paper's 5e-4) on bit logits, latents and the rest of the model; none on a step (``s``, the
    latent's step) or a mask logit, which train in their own groups; every parameter in exactly one group."""
    method = _csq(tiny, target_bits=3)
    groups = method.param_groups(tiny, 5e-4)
    where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(where) == len(list(tiny.parameters()))
    for q in method.quantizers().values():
        for decayed in (q.bit_logits_pos, q.bit_logits_neg, q.latent):
            assert groups[where[id(decayed)]]["weight_decay"] == 5e-4
        for free in (q.scale, q.latent_step):
            assert groups[where[id(free)]]["weight_decay"] == 0.0 and "sgd_peak_lr" not in groups[where[id(free)]]
        masks = groups[where[id(q.mask_logits)]]
        assert masks["weight_decay"] == 0.0 and masks["sgd_peak_lr"] == 0.1
