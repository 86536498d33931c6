"""Every `mpq` command shown in a code block of README.md and docs/ runs, shortened.

Commands are taken from ```bash blocks in order, each file's in its own temporary folder,
so a command that needs an earlier one's run directory finds it. Each is shortened:
data become synthetic images of the model's documented shape, epochs and batches few,
the device the CPU, a sweep keeps its first budget and two seeds, and a search, sweep or fine-tuning that
sets no learning rate trains at 0.01 (the papers' SGD 0.1 diverges on two batches of random
images, which mpq refuses).
"""

import re
import shlex
from pathlib import Path

import pytest

from mpq_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"train", "search", "finetune", "sweep"}
INPUT = {"lenet5": "1,28,28"}  # the default model, Fashion-MNIST's size; others (resnet20, ...) at 3,32,32
EPOCH_OPTIONS = {"--epochs": "2", "--warmup-epochs": "1", "--interval": "1", "--rounds": "1"}


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every line of a ```bash block that runs ``mpq``."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                for part in line.split("&&"):
                    part = part.strip()
                    if part.startswith("mpq "):
                        found.append((path.relative_to(ROOT).as_posix(), part))
    return found


def shortened(command: str) -> list[str]:
    args = shlex.split(command)[1:]
    verb = args[0]
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--data", "-d", "--device", "--batch-size") and i + 1 < len(args):
            i += 2
            continue
        if arg in EPOCH_OPTIONS and i + 1 < len(args):
            out += [arg, EPOCH_OPTIONS[arg]]
            i += 2
            continue
        out.append(arg)
        i += 1
    if verb in TRAINING:
        out += [
            "--device",
            "cpu",
            "--batch-size",
            "16",
            "--limit-train-batches",
            "2",
            "--limit-val-batches",
            "1",
            "--quiet",
        ]
        if "--epochs" not in out:
            out += ["--epochs", "2"]
        if verb != "train" and "--lr" not in out:
            out += ["--lr", "0.01"]
    if verb == "sweep" and "--target-bits" in out:  # one budget per method: the runs are the same code
        out[out.index("--target-bits") + 1] = out[out.index("--target-bits") + 1].split(",")[0]
    if verb == "sweep" and "--seeds" in out:  # two seeds still pair and give an interval
        out[out.index("--seeds") + 1] = ",".join(out[out.index("--seeds") + 1].split(",")[:2])
    if verb in ("train", "search", "sweep"):
        model = args[args.index("--model") + 1] if "--model" in args else "lenet5"
        out += ["--data", "synthetic", "--input-size", INPUT.get(model, "3,32,32")]
    if verb == "eval":
        out += ["--limit-val-batches", "1", "--quiet"]
    return out


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    verbs = {shlex.split(c)[1] for _, c in COMMANDS}
    assert {"train", "search", "finetune", "eval", "export", "inspect", "methods", "models"} <= verbs


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path, monkeypatch, capsys):
    failures = []
    for where, command in COMMANDS:
        folder = tmp_path / where.replace("/", "_")
        folder.mkdir(exist_ok=True)
        monkeypatch.chdir(folder)
        code = main(shortened(command))
        err = capsys.readouterr().err
        if code != 0:
            failures.append(f"{where}: `{command}` -> exit {code}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)
