import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq_cli.engine import loss_probe


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_probe_normalises_with_batch_statistics_and_leaves_running_ones_alone():
    model = _bn_net()
    batches = [(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))) for _ in range(2)]
    with torch.no_grad():  # running statistics that do not fit the weights, as after relaxed training
        model[1].running_mean.fill_(-50.0)
        model[1].running_var.fill_(1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    probe = loss_probe(model, batches, 2)
    value = probe()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    reference = copy.deepcopy(model).eval()
    reference[1].train()
    with torch.no_grad():  # what batch statistics give, computed by hand
        expected = sum(float(F.cross_entropy(reference(x), y, reduction="sum")) for x, y in batches) / 64
    assert abs(value - expected) < 1e-5
    model.eval()
    with torch.no_grad():
        stale = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in batches) / 64
    assert stale > 2 * value  # the running statistics alone would have read the network as broken
    model.train()
    probe()
    assert model.training and model[1].training  # the caller's mode comes back


def test_probe_without_batchnorm_is_the_evaluation_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    batches = [(torch.randn(16, 5), torch.randint(0, 3, (16,)))]
    model.eval()
    with torch.no_grad():
        expected = float(F.cross_entropy(model(batches[0][0]), batches[0][1]))
    model.train()
    assert abs(loss_probe(model, batches, 1)() - expected) < 1e-6
    assert model.training


def test_gradients_are_clipped_before_a_method_rescales_them(monkeypatch):
    """``--clip-grad`` measures the loss's own gradients; a method's rescaling (CSQ's preconditioned
    bit logits, ~100x the rest) comes after it and so cannot scale every other parameter down."""
    from mpq_cli import engine
    from mpq_cli.data import DataConfig, load_data
    from mpq_cli.engine import PlainTraining, TrainConfig, fit

    class Rescales(PlainTraining):
        def __init__(self, model, factor):
            self.model, self.factor = model, factor

        def before_optimizer_step(self):
            self.model[1].weight.grad.mul_(self.factor)  # like CSQ's preconditioner on its logits

    def run(factor, clip):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        seen = []
        real = engine.make_optimizer

        def spy(groups, cfg):
            optimizer = real(groups, cfg)
            step = optimizer.step

            def recorded(*args, **kwargs):
                seen.append(model[1].bias.grad.clone())
                return step(*args, **kwargs)

            optimizer.step = recorded
            return optimizer

        monkeypatch.setattr(engine, "make_optimizer", spy)
        _, train, val = load_data(
            DataConfig("synthetic", batch_size=32, input_size=(1, 8, 8), limit_train_batches=1, limit_val_batches=1)
        )
        fit(model, train, val, TrainConfig(epochs=1, lr=0.01, clip_grad=clip), hooks=Rescales(model, factor))
        return seen

    plain = run(1.0, None)
    clipped = run(1.0, 0.05)
    rescaled = run(1e4, 0.05)
    assert not torch.equal(plain[0], clipped[0])  # the clip does act on these gradients
    assert torch.equal(clipped[0], rescaled[0])  # the first step's clip ignores the rescale (later steps differ)


# -- schedules and --amp (issue 13) ------------------------------------------------------------------------------
def test_learning_rate_schedules():
    from mpq_cli.engine import TrainConfig, lr_at

    warm = TrainConfig(epochs=10, lr=0.1, warmup_epochs=2, schedule="constant")
    assert [round(lr_at(warm, e), 6) for e in (0.0, 1.0, 2.0, 5.0)] == [round(0.1 * 1e-3 / 2, 6), 0.05005, 0.1, 0.1]
    step = TrainConfig(epochs=10, lr=0.1, schedule="step", step_epochs=3, gamma=0.5)
    assert [lr_at(step, e) for e in (0, 2.9, 3, 6.5, 9)] == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.0125])
    cosine = TrainConfig(epochs=10, lr=0.1, warmup_epochs=2, schedule="cosine")
    assert lr_at(cosine, 2) == pytest.approx(0.1) and lr_at(cosine, 6) == pytest.approx(0.05)
    assert lr_at(cosine, 10) == pytest.approx(0.0, abs=1e-12)


def test_amp_trains_in_bf16_on_the_cpu():
    from mpq_cli.data import DataConfig, load_data
    from mpq_cli.engine import TrainConfig, fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    dtypes = set()
    model[1].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    _, train, val = load_data(DataConfig("synthetic", batch_size=32, input_size=(1, 8, 8), limit_train_batches=2))
    records = fit(model, train, val, TrainConfig(epochs=1, lr=0.01, amp=True))
    assert dtypes == {torch.bfloat16} and math.isfinite(records[0]["train_loss"])
    dtypes.clear()
    fit(model, train, val, TrainConfig(epochs=1, lr=0.01, amp=False))
    assert dtypes == {torch.float32}


@pytest.mark.parametrize(
    "method,config",
    [
        ("csq", {"target_bits": 3}),
        ("bsq", {"target_bits": 3}),
        ("uniform", {"target_bits": 3, "act_bits": 4}),
        ("bmpq", {"target_bits": 3}),
    ],
)
def test_every_bit_method_steps_under_amp(method, config):
    """bf16 autocast reaches the methods' own autograd Functions (CSQ's gated planes, PACT's clip): their
    backward passes take a bf16 gradient, and alpha's gradient is summed in fp32."""
    from mpq_cli.engine import TrainConfig, make_optimizer, train_step
    from mpq_cli.methods import get_method
    from mpq_cli.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("lenet5", None, 10, 1, (28, 28)))
    cls = get_method(method)
    hooks = cls(cls.config_class.from_dict(config))
    hooks.prepare(model)
    hooks.on_epoch_start(0, 1, 100)
    cfg = TrainConfig(epochs=1, lr=0.01, amp=True)
    optimizer = make_optimizer(hooks.param_groups(model, 0.0), cfg)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(2):
        loss, _ = train_step(model, x, y, optimizer, hooks, cfg)
    assert math.isfinite(float(loss))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
