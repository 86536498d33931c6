"""--recipe (issue 27): a search from trained weights takes the defaults measured from trained references, the
paper's from-scratch schedule stays available by name, and `mpq methods` shows both."""

import json

import pytest
from conftest import SMALL, invoke, run_json

from mpq_cli.commands.context import ModelOptions
from mpq_cli.commands.search import resolve_recipe
from mpq_cli.errors import MpqError
from mpq_cli.methods import METHODS


@pytest.mark.parametrize(
    "recipe, model, expected",
    [
        ("auto", ModelOptions("resnet20", checkpoint="ref.safetensors"), "checkpoint"),
        ("auto", ModelOptions("resnet18", weights="DEFAULT"), "checkpoint"),
        ("auto", ModelOptions("resnet18", weights="none"), "paper"),
        ("auto", ModelOptions("resnet20"), "paper"),
        ("paper", ModelOptions("resnet20", checkpoint="ref.safetensors"), "paper"),
        ("checkpoint", ModelOptions("resnet20"), "checkpoint"),
    ],
)
def test_auto_takes_the_checkpoint_recipe_from_trained_weights(recipe, model, expected):
    assert resolve_recipe(recipe, model) == expected


def test_an_unknown_recipe_is_refused():
    with pytest.raises(MpqError, match="--recipe must be one of auto, paper, checkpoint"):
        resolve_recipe("fast", ModelOptions())


def test_every_method_has_checkpoint_defaults_that_differ_only_where_measured():
    for name, cls in METHODS.items():
        paper, checkpoint = cls.recipe_defaults("paper"), cls.recipe_defaults("checkpoint")
        assert set(paper) == set(checkpoint), name
        # the same optimizer, weight decay and schedule: an explicit --lr gives the same run under either recipe
        assert {k: v for k, v in paper.items() if k != "lr"} == {k: v for k, v in checkpoint.items() if k != "lr"}
        assert checkpoint["lr"] <= paper["lr"], name


def test_a_search_from_a_checkpoint_uses_the_checkpoint_recipe_and_paper_stays_available(fp_run, tmp_path):
    from mpq_cli.methods import get_method

    csq = get_method("csq")
    common = ["search", "--method", "csq", "--target-bits", "2", "--checkpoint", fp_run[0], *SMALL, "--epochs", "1"]
    auto = run_json(*common, "--out", tmp_path / "auto")
    assert auto["recipe"] == "checkpoint"
    assert (
        "| training defaults (--recipe) | checkpoint: measured from trained references |"
        in (tmp_path / "auto" / "report.md").read_text()
    )
    # the paper's from-scratch lr 0.1 may well diverge from this checkpoint (what the recipe is for); its run
    # still records the settings it was started with
    paper = invoke(*common, "--recipe", "paper", "--out", tmp_path / "paper", "--json")
    assert paper.exit_code == 0 or "diverged" in paper.output
    configs = {k: json.loads((tmp_path / k / "config.json").read_text()) for k in ("auto", "paper")}
    assert {k: c["train"]["lr"] for k, c in configs.items()} == {
        "auto": csq.checkpoint_defaults["lr"],
        "paper": csq.training_defaults["lr"],
    }
    # and its method fields: from trained weights CSQ's second stage restarts from them
    starts = {k: c["method_config"]["second_stage_start"] for k, c in configs.items()}
    assert starts == {"auto": "checkpoint", "paper": "search"}
    # an explicit --lr is the user's, whatever the recipe
    given = run_json(*common, "--lr", "0.005", "--out", tmp_path / "given")
    assert json.loads((tmp_path / "given" / "config.json").read_text())["train"]["lr"] == 0.005
    assert given["recipe"] == "checkpoint"


def test_methods_lists_both_recipes():
    result = invoke("methods")
    assert result.exit_code == 0
    assert "training, --recipe paper: optimizer=sgd, lr=0.1" in result.output
    assert "training, --recipe checkpoint:" in result.output
    listing = json.loads(invoke("methods", "--json").output)
    assert listing["csq"]["checkpoint_defaults"] == METHODS["csq"].checkpoint_defaults
    assert listing["csq"]["checkpoint_fields"] == {"second_stage_start": "checkpoint"}
    assert "fields, --recipe checkpoint (unless given): second_stage_start=checkpoint" in result.output
    assert listing["bmpq"]["checkpoint_fields"] == {"act_follow_weights": False}


def test_a_checkpoint_recipe_sets_its_method_fields_unless_given(fp_run, tmp_path):
    """BMPQ from trained weights quantizes weights only (its paper's PACT inputs are a from-scratch recipe); the paper
    recipe keeps them, and a field the command line gives wins over either."""
    common = ["search", "--method", "bmpq", "--target-bits", "4", "--checkpoint", fp_run[0], *SMALL, "--epochs", "1"]
    cases = {"auto": [], "paper": ["--recipe", "paper"], "given": ["--set", "act_follow_weights=true"]}
    follows = {}
    for name, extra in cases.items():
        run_json(*common, "--lr", "0.003", *extra, "--out", tmp_path / name)
        follows[name] = json.loads((tmp_path / name / "config.json").read_text())["method_config"]["act_follow_weights"]
    assert follows == {"auto": False, "paper": True, "given": True}
    assert METHODS["uniform"].recipe_fields("checkpoint", {"target_bits": 2}) == {"target_bits": 2}
