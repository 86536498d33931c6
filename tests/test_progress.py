"""Progress a person can read (issue 17): bars with an ETA on a terminal, one line per epoch in a pipe."""

import os
import pty
import subprocess
import sys

from conftest import SMALL

ARGS = ["search", "--method", "uniform", "--target-bits", "4", "--model", "lenet5", *SMALL, "--epochs", "2"]


def _run_in_terminal(args, tmp_path) -> str:
    """Run mpq with stderr (and stdout) on a pseudo-terminal; everything it wrote there."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "mpq_cli", *args], stdout=follower, stderr=follower, env=env, cwd=tmp_path
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not data:
            break
        chunks.append(data)
    assert process.wait(timeout=300) == 0
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_progress_bars_with_an_eta(tmp_path):
    output = _run_in_terminal([*ARGS, "--out", tmp_path / "run"], tmp_path)
    assert "ETA" in output and "search 1/2" in output
    assert "\x1b[" in output  # drawn (and redrawn) with terminal control sequences
    assert output.count("stage=search epoch=") == 2  # the epoch lines stay


def test_a_pipe_gets_one_line_per_epoch_and_json_keeps_stdout_clean(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mpq_cli", *ARGS, "--out", tmp_path / "run", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    epochs = [line for line in lines if line.startswith("stage=search epoch=")]
    assert len(epochs) == 2 and "ETA" not in done.stderr and "\x1b[" not in done.stderr
    assert done.stdout.strip().startswith("{") and len(done.stdout.strip().splitlines()) == 1
