"""mpq sweep (issue 17): several methods and budgets from one checkpoint, resumable, with the Pareto front."""

import json
import statistics

import pytest
from conftest import SMALL, invoke, run_json

from mpq_cli.sweep import SweepRow, pareto_front, run_name, seed_cells


def test_pareto_front_keeps_the_undominated_rows():
    rows = [
        SweepRow("a", 2, "r1", file_bytes=100, top1=50.0),
        SweepRow("a", 3, "r2", file_bytes=150, top1=60.0),
        SweepRow("b", 2, "r3", file_bytes=120, top1=49.0),  # more bytes and lower top-1 than r1
        SweepRow("b", 3, "r4", file_bytes=150, top1=60.0),  # ties r2: neither beats the other
        SweepRow("b", 9, "r5", status="refused", error="no"),
    ]
    pareto_front(rows)
    assert [r.pareto for r in rows] == [True, True, False, True, False]


def test_run_names():
    assert run_name("csq", 2.0) == "csq-2bits" and run_name("alq", 0.5) == "alq-0.5bits"
    assert run_name("csq", 2.0, seed=1) == "csq-2bits-seed1"


def _runs(method, top1s, bits, target=2.0, seeds=None):
    return [
        SweepRow(method, target, f"{method}-{seed}", seed=seed, top1=t, avg_stored_bits=b, file_bytes=100)
        for seed, t, b in zip(seeds or range(len(top1s)), top1s, bits, strict=True)
    ]


def test_seed_cells_mark_better_only_above_zero_at_no_more_bits():
    rows = _runs("uniform", [90.0, 90.0, 90.0], [2.5] * 3)
    rows += _runs("csq", [91.0, 91.1, 90.9], [2.4, 2.5, 2.45])  # +1 +- 0.1 at fewer bits: better
    rows += _runs("bsq", [91.0, 91.1, 90.9], [2.6] * 3)  # as much higher, at more bits: not "better"
    rows += _runs("alq", [89.0, 92.0, 90.5], [2.0] * 3)  # +-1.5: a tie
    rows += _runs("bmpq", [89.0, 88.9, 89.1], [2.0] * 3)  # -1 +- 0.1: worse
    cells = {c.method: c for c in seed_cells(rows)}
    assert {m: c.verdict for m, c in cells.items()} == {
        "uniform": "baseline",
        "csq": "better",
        "bsq": "more bits",
        "alq": "tie",
        "bmpq": "worse",
    }
    assert [m for m, c in cells.items() if c.better] == ["csq"]
    csq = cells["csq"]
    assert (csq.n, csq.seeds, csq.top1_mean, csq.top1_std) == (3, [0, 1, 2], pytest.approx(91.0), pytest.approx(0.1))
    assert csq.stored_bits_mean == pytest.approx(2.45) and csq.stored_bits_std == pytest.approx(0.05)
    d = csq.vs_uniform
    half = 4.302652729749462 * 0.1 / 3**0.5  # t(0.975, 2 df) from a table, s = 0.1
    assert (d["mean"], d["low"], d["high"]) == (pytest.approx(1.0), pytest.approx(1 - half), pytest.approx(1 + half))
    assert (d["p"], d["p_min"]) == (0.25, 0.25)  # three seeds cannot say more, however consistent
    assert d["stored_bits"] == pytest.approx(2.45) and d["uniform_stored_bits"] == pytest.approx(2.5)


def test_seed_cells_pair_by_seed_and_give_no_verdict_from_one_pair():
    rows = _runs("uniform", [90.0, 80.0], [2.5, 2.5], seeds=[0, 2])  # seed 1's uniform run was refused
    rows.append(SweepRow("uniform", 2.0, "uniform-1", seed=1, status="refused", error="no"))
    rows += _runs("csq", [91.0, 50.0, 81.0], [2.4] * 3, seeds=[0, 1, 2])
    rows += _runs("csq", [91.0], [2.0], target=3.0)
    rows += _runs("uniform", [90.0], [3.0], target=3.0)
    cells = {(c.method, c.target_bits): c for c in seed_cells(rows)}
    paired = cells[("csq", 2.0)].vs_uniform
    assert paired["seeds"] == [0, 2] and paired["mean"] == pytest.approx(1.0) and paired["std"] == pytest.approx(0)
    assert cells[("uniform", 2.0)].runs == 3 and cells[("uniform", 2.0)].n == 2
    one = cells[("csq", 3.0)]
    assert one.vs_uniform["mean"] == pytest.approx(1.0) and one.vs_uniform["low"] is None
    assert one.verdict is None and not one.better and one.top1_std is None
    two = cells[("csq", 2.0)]  # two pairs, both +1: an interval that excludes zero, yet no verdict (p >= 0.5)
    assert two.vs_uniform["low"] is not None and two.vs_uniform["low"] > 0 and two.vs_uniform["p_min"] == 0.5
    assert two.verdict is None and not two.better


def test_sweep_runs_exports_evaluates_and_resumes(fp_run, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--method", "uniform,csq", "--target-bits", "2,9", "--model", "lenet5"]
    args += ["--checkpoint", fp_run[0], *SMALL, "--epochs", "1", "--lr", "0.01", "--out", out]
    args += ["--limit-val-batches", "4"]  # of 8: each file is measured on the same slice as its run and FP32
    first = run_json(*args)
    rows = {(r["method"], r["target_bits"]): r for r in first["rows"]}
    assert len(rows) == 4
    refused = rows[("csq", 9.0)]  # CSQ has 8 bit planes: the budget is reported, not skipped
    assert refused["status"] == "refused" and "exceeds" in refused["error"]
    for key in [("uniform", 2.0), ("uniform", 9.0), ("csq", 2.0)]:
        r = rows[key]
        assert r["status"] == "done" and r["top1"] is not None
        summary = json.loads((out / run_name(*key) / "summary.json").read_text())
        assert r["top1"] == summary["top1"]  # the file's top-1 is the run's: the export is exact
        assert r["file_bytes"] == (out / f"{run_name(*key)}.safetensors").stat().st_size
    assert rows[("uniform", 9.0)]["avg_stored_bits"] > rows[("uniform", 2.0)]["avg_stored_bits"]
    assert any(r["pareto"] for r in first["rows"])
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "sweep.md").read_text()
    assert "refused" in table and "★" in table and "](sweep.png)" in table
    assert "Partial measurements: every top-1 here is on 128 of 256 test images" in table  # 4 of 8 batches
    assert json.loads((out / "sweep.json").read_text())["rows"] == first["rows"]

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    second = run_json(*args)  # every finished run is read back, not searched again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
    assert [r["status"] for r in second["rows"]] == ["reused", "reused", "reused", "refused"]
    assert [r["top1"] for r in second["rows"]] == [r["top1"] for r in first["rows"]]

    # the same sweep with another setting never shows the old rows under it (issue 27): refused as stale,
    # naming what differs, and run again with --force
    changed = [a if a != "0.01" else "0.02" for a in args]
    third = run_json(*changed)
    assert [r["status"] for r in third["rows"]] == ["stale", "stale", "stale", "refused"]
    assert all("train.lr differ" in r["error"] and "--force" in r["error"] for r in third["rows"][:3])
    assert all(r["top1"] is None for r in third["rows"])
    forced = run_json(*changed, "--force")
    assert [r["status"] for r in forced["rows"]] == ["done", "done", "done", "refused"]
    saved = json.loads((out / run_name("uniform", 2.0) / "config.json").read_text())
    assert saved["train"]["lr"] == 0.02


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "csq,nope"], "unknown method 'nope'"),
        (["--target-bits", "2,x"], "--target-bits expects numbers"),
        (["--method", "csq,csq"], "listed twice"),
        (["--seeds", "0,x"], "--seeds expects integers"),
        (["--seeds", "0,0"], "distinct seeds"),
        (["--seeds", "0,1", "--seed", "3"], "--seeds or --seed"),
        (["--method", "csq,uniform", "--alpha", "0.1"], "no such option --alpha (methods csq, uniform take:"),
        (["--method", "csq,uniform", "--reg-strengh", "0.1"], "did you mean --reg-strength?"),
        (["--epoch", "2"], "did you mean --epochs?"),
        (["--method", "csq,uniform", "--set", "alpha=0.1"], "--alpha is not a field of csq, uniform"),
        (["--set", "target_bits=2"], "the targets are --target-bits's list"),
    ],
    ids=[
        "unknown-method",
        "bad-target",
        "twice",
        "bad-seed",
        "seed-twice",
        "seed-and-seeds",
        "no-method-has-it",
        "typo",
        "own-typo",
        "set-no-method-has-it",
        "set-target",
    ],
)
def test_sweep_refuses_bad_lists_and_fields(tmp_path, args, message):
    result = invoke("sweep", *args, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (tmp_path / "s").exists()  # refused before anything ran


def test_sweep_under_torchrun_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; every rank would write every row
    result = invoke("sweep", "--method", "uniform", "--target-bits", "2", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "mpq sweep runs in one process" in result.output
    assert not (tmp_path / "s").exists()


def test_a_sweep_with_a_hold_out_gives_every_row_the_same_one(fp_run, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--method", "uniform", "--target-bits", "2,4", "--model", "lenet5", "--val-split", "0.1"]
    result = run_json(*args, "--checkpoint", fp_run[0], *SMALL, "--epochs", "1", "--out", out)
    for row in result["rows"]:
        config = json.loads((out / run_name("uniform", row["target_bits"]) / "config.json").read_text())
        summary = json.loads((out / run_name("uniform", row["target_bits"]) / "summary.json").read_text())
        assert config["data"]["val_split"] == 0.1 and summary["val_images"] == 51  # floor(0.1 * 512)
        assert row["val_top1"] == summary["val_top1"] is not None and row["top1"] == summary["top1"]


def test_a_sweep_over_seeds(fp_run, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--method", "uniform,bmpq", "--target-bits", "3", "--seeds", "0,1", "--model", "lenet5"]
    args += ["--checkpoint", fp_run[0], *SMALL, "--epochs", "1", "--lr", "0.01", "--out", out]
    args += ["--limit-val-batches", "2", "--probe-batches", "1"]  # the least work that still runs every step
    options = ["--optimizer", "adam", "--keep-fp", "classifier.3"]  # search's options, to every run
    first = run_json(*args, *options, "--ternary", "false")
    assert [(r["method"], r["seed"], r["status"]) for r in first["rows"]] == [
        ("uniform", 0, "done"),
        ("bmpq", 0, "done"),
        ("uniform", 1, "done"),
        ("bmpq", 1, "done"),
    ]
    top1 = {(r["method"], r["seed"]): r["top1"] for r in first["rows"]}
    for r in first["rows"]:
        config = json.loads((out / run_name(r["method"], 3.0, r["seed"]) / "config.json").read_text())
        assert config["train"]["seed"] == r["seed"] and config["train"]["optimizer"] == "adam"
        assert config["selection"]["keep_fp"] == ["classifier.3"]
        # BMPQ's field reaches BMPQ's runs; uniform has no such field and runs without it
        assert config["method_config"].get("ternary") is (False if r["method"] == "bmpq" else None)
    cells = {c["method"]: c for c in first["cells"]}
    bmpq = cells["bmpq"]
    assert (bmpq["n"], bmpq["runs"], bmpq["seeds"]) == (2, 2, [0, 1])
    assert bmpq["top1_mean"] == pytest.approx(statistics.mean([top1["bmpq", 0], top1["bmpq", 1]]))
    assert bmpq["top1_std"] == pytest.approx(statistics.stdev([top1["bmpq", 0], top1["bmpq", 1]]))
    diffs = [top1["bmpq", s] - top1["uniform", s] for s in (0, 1)]
    d = bmpq["vs_uniform"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(statistics.mean(diffs)) and d["p_min"] == 0.5
    assert d["low"] <= d["mean"] <= d["high"] and d["p"] in (0.5, 1.0)
    assert cells["uniform"]["verdict"] == "baseline" and cells["uniform"]["vs_uniform"] is None
    table = (out / "sweep.md").read_text()
    assert "## Over seeds 0, 1" in table and "| Δ top-1 vs uniform | 95 % interval | p (floor) | verdict |" in table
    assert "| bmpq | 3 | 2 of 2 | " in table and "(0.5) |" in table and "| seed | status |" in table
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    again = run_json(*args, *options, "--ternary", "false")  # every run read back
    assert [r["status"] for r in again["rows"]] == ["reused"] * 4 and again["cells"] == first["cells"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps

    # another BMPQ field makes BMPQ's runs stale; uniform's, which never had it, still hold
    changed = run_json(*args, *options, "--ternary", "true")
    assert [r["status"] for r in changed["rows"]] == ["reused", "stale", "reused", "stale"]
    assert "(method_config.ternary differ)" in changed["rows"][1]["error"]  # and nothing else


def test_a_sweep_with_edge_bits_gives_every_row_the_same_edges_and_a_changed_edge_is_stale(fp_run, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--method", "uniform", "--target-bits", "2", "--model", "lenet5", "--checkpoint", fp_run[0]]
    args += [*SMALL, "--epochs", "1", "--out", out]
    first = run_json(*args, "--edge-bits", "8")
    assert first["rows"][0]["status"] == "done"
    run = out / run_name("uniform", 2.0)
    bits = [e["bits"] for e in json.loads((run / "scheme.json").read_text())["layers"]]
    assert bits == [8, 2, 2, 8] and json.loads((run / "config.json").read_text())["selection"]["edge_bits"] == 8
    without = run_json(*args)  # the same sweep without edges is another setting, never shown under it
    assert without["rows"][0]["status"] == "stale" and "selection.edge_bits" in without["rows"][0]["error"]
