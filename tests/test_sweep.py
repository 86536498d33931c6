"""mpq sweep (issue 17): several methods and budgets from one checkpoint, resumable, with the Pareto front."""

import json

from conftest import SMALL, invoke, run_json

from mpq_cli.sweep import SweepRow, pareto_front, run_name


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


def test_sweep_refuses_bad_lists(tmp_path):
    for args in (["--method", "csq,nope"], ["--target-bits", "2,x"], ["--method", "csq,csq"]):
        result = invoke("sweep", *args, "--out", tmp_path / "s")
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


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
