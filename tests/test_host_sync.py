"""No host synchronisation inside a training step, for every method.

On a GPU, ``tensor.item()``, ``bool(tensor)``, ``tolist()`` and friends wait for every queued
kernel. These tests run short searches with those methods patched to raise during training
steps. Three kinds of step are allowed to sync, each by design:
- the first epoch (first-batch initialisations, such as PACT's clip);
- the step that reads the progress metrics (the last step of each epoch here, since
  LOG_EVERY is raised);
- a method's scheduled decision, kept out of the checked window by its settings
  (CSQ's and BSQ's projection, BSQ's controller and re-quantization). ALQ's pruning steps are not
  checked: Alg. 2 picks a global top-k on the host at every step of a pruning round.
"""

import pytest
import torch

import mpq_cli
import mpq_cli.commands.search
import mpq_cli.commands.train
from mpq_cli import commands, engine
from mpq_cli.api import ModelOptions, SearchOptions
from mpq_cli.data import DataConfig

SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class Guard:
    active = False
    checked_steps = 0


@pytest.fixture
def guard(monkeypatch):
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def forbidden(self, *args, _name=name, _original=original, **kwargs):
            if Guard.active:
                raise AssertionError(f"host sync in a training step: Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(engine, "LOG_EVERY", 10**9)  # metrics are read at the epoch's last step only
    original_fit = engine.fit

    def fit(model, train, val, cfg, **kwargs):
        return original_fit(model, GuardedBatches(train, kwargs.get("hooks")), val, cfg, **kwargs)

    for command in (commands.train, commands.search):  # every command that trains
        monkeypatch.setattr(command, "fit", fit)
    original_optimizer = engine.make_optimizer

    def make_optimizer(*args, **kwargs):
        # torch's Adam keeps its step count on the host (unless capturable) and reads it with .item():
        # a host tensor, no device wait; the optimizer's own step is torch's, not ours to check
        optimizer = original_optimizer(*args, **kwargs)
        step = optimizer.step

        def unguarded_step(*a, **k):
            active, Guard.active = Guard.active, False
            try:
                return step(*a, **k)
            finally:
                Guard.active = active

        optimizer.step = unguarded_step
        return optimizer

    monkeypatch.setattr(engine, "make_optimizer", make_optimizer)
    Guard.active, Guard.checked_steps = False, 0
    yield Guard
    Guard.active = False


class GuardedBatches:
    """The training batches; the guard is on while the engine runs each step that must not sync."""

    def __init__(self, batches, method):
        self.batches, self.method, self.epoch = batches, method, 0

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.batches.set_epoch(epoch)

    def _checked(self, i: int) -> bool:
        if self.epoch == 0 or i == len(self) - 1:
            return False
        return getattr(self.method, "_kind", "basis") in ("basis", "coord")  # ALQ's pruning steps excepted

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            Guard.active = self._checked(i)
            Guard.checked_steps += Guard.active
            yield batch
            Guard.active = False
        Guard.active = False


def _search(tmp_path, method, config, epochs=3):
    data = DataConfig("synthetic", batch_size=16, input_size=(1, 16, 16), limit_train_batches=6, limit_val_batches=1)
    return mpq_cli.search(
        ModelOptions("lenet5"),
        data,
        {"epochs": epochs, "device": "cpu"},
        SearchOptions(method, config, probe_batches=1),
        out=str(tmp_path / method),
    )


METHODS = {
    "uniform": {"target_bits": 4, "act_bits": 4},
    "csq": {"target_bits": 3, "act_bits": 4, "project_at": 1.0},
    # the projection inside the unchecked first epoch: the checked steps train CSQ's second stage (LSQ's form)
    "csq-second-stage": {"target_bits": 3, "act_bits": 4, "project_at": 0.25, "fixed_scheme_training": "lsq"},
    "bsq": {"target_bits": 3, "act_bits": 4, "controller_every": 10**6, "requant_every": 100.0, "project_at": 1.0},
    "bmpq": {"target_bits": 6, "act_bits": 4},
    "alq": {"target_bits": 2, "act_bits": 2},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_steps_do_not_sync(tmp_path, guard, method):
    epochs = 6 if method == "alq" else 3  # ALQ: enough epochs for basis and coordinate blocks
    summary = _search(tmp_path, method.split("-")[0], METHODS[method], epochs)
    assert summary["out"]
    assert guard.checked_steps >= 8, f"only {guard.checked_steps} steps were checked"


def test_the_guard_catches_a_sync(tmp_path, guard, monkeypatch):
    from mpq_cli.methods.uniform import Uniform

    def regularizer(self):
        return torch.zeros(()) if bool(torch.ones(())) else None  # a Python branch on a tensor

    monkeypatch.setattr(Uniform, "regularizer", regularizer)
    with pytest.raises(AssertionError, match="host sync in a training step: Tensor.__bool__"):
        _search(tmp_path, "uniform", METHODS["uniform"])
