"""A search's health (issue 31): how much of its scheme its own mechanism chose, reported by every run."""

import json
from types import SimpleNamespace

import pytest
import torch

from mpq_cli.commands.save import health_note, search_health
from mpq_cli.engine import loss_probe
from mpq_cli.methods.base import FinalizeResult


def _method(params, aim, budget_step_seconds=None):
    layers = {name: SimpleNamespace(params=n) for name, n in params.items()}
    return SimpleNamespace(layers=layers, search_target=lambda: aim, budget_step_seconds=budget_step_seconds)


def test_health_counts_what_the_budget_step_changed():
    method = _method({"a": 100, "b": 300, "c": 600}, 2.0)
    changes = [
        {"layer": "c", "bits_before": 3, "bits_after": 2, "probe_loss_before": 1.0, "probe_loss_after": 1.2,
         "probe_top1_before": 80.0, "probe_top1_after": 71.5},
        {"layer": "a", "bits_before": 2, "bits_after": 2},  # re-rounded, not moved
    ]  # fmt: skip
    health = search_health(method, FinalizeResult(True, 2.4, changes))
    assert health["distance_to_aim"] == pytest.approx(0.4) and health["layers_changed"] == 1
    assert health["share_of_layers_changed"] == pytest.approx(1 / 3)
    assert health["share_of_weights_changed"] == pytest.approx(0.6)
    assert (health["probe_top1_before"], health["probe_top1_after"]) == (80.0, 71.5)
    assert health["healthy"] is False  # 0.4 bits away: the budget step, not the method, chose
    assert search_health(method, FinalizeResult(True, 2.1, changes))["healthy"] is True
    assert search_health(method, FinalizeResult(True, None, [])) is None  # no budget step: nothing to judge
    note = health_note(health)
    assert "## Search health" in note and "80.00 % -> 71.50 %" in note and "not healthy" in note


def test_health_gives_the_budget_steps_cost_in_training_steps():
    method = _method({"a": 100, "b": 300}, 2.0, budget_step_seconds=12.5)
    changes = [{"layer": "a", "bits_before": 3, "bits_after": 2}]
    health = search_health(method, FinalizeResult(True, 2.2, changes), step_seconds=0.25)
    assert health["budget_step_seconds"] == 12.5 and health["budget_step_in_training_steps"] == 50.0
    assert "took 12.5 s, the time of 50 training steps (median step 250.0 ms)" in health_note(health)
    unknown = search_health(method, FinalizeResult(True, 2.2, changes))  # no step time measured: no ratio
    assert unknown["budget_step_in_training_steps"] is None and "took 12.5 s." in health_note(unknown)


def test_the_probe_measures_top1_on_its_own_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    batches = [(torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))) for _ in range(3)]
    probe = loss_probe(model, batches, 3)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    assert probe.top1() == pytest.approx(100 * correct / 24)


def test_a_search_reports_its_health(csq_run):
    summary = json.loads((csq_run[0] / "summary.json").read_text())
    health = summary["search_health"]
    moved = [c for c in summary["budget_changes"] if c["bits_before"] != c["bits_after"]]
    assert health["layers_changed"] == len(moved) and health["layers"] == 4
    assert health["bits_before_budget_step"] == summary["avg_bits_before_budget_step"]
    assert health["aimed_bits"] == summary["target_bits"]
    if summary["budget_changes"]:
        assert 0 <= health["probe_top1_before"] <= 100 and 0 <= health["probe_top1_after"] <= 100
    assert "## Search health" in (csq_run[0] / "report.md").read_text()
    # the cost, from this run's own clock: the step's seconds against its median training step
    steps = [json.loads(line).get("step_seconds") for line in (csq_run[0] / "metrics.jsonl").read_text().splitlines()]
    assert all(s > 0 for s in steps[:-1])  # every epoch's record (the last line is the final measurement)
    if summary["budget_changes"]:  # the step ran in this process
        assert health["budget_step_seconds"] > 0
        ratio = health["budget_step_seconds"] / health["training_step_seconds"]
        assert health["budget_step_in_training_steps"] == pytest.approx(ratio, abs=0.06)
