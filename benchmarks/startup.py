"""How long a user waits for the commands that need no tensors: `mpq --help` and `mpq inspect FILE`.

Run from the repository root after `bash scripts/setup.sh`:

    .venv/bin/python benchmarks/startup.py            # writes benchmarks/results/startup.md

Each command is a whole new process (what a user starts), run `--repeats` times in turns with the
references of the same machine and moment: `python -c pass` (Python's own start) and
`python -c "import torch"` (what the commands waited for before they imported torch on use). The page
gives each command's median wall time, its ratio to `import torch` measured in the same rounds, and
whether the command imported torch (`python -X importtime`). The packed file is exported from a
small uniform search on synthetic data (lenet5, one epoch of 4 batches), made here first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, write_results

PY = sys.executable


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def imports_torch(command: list[str]) -> bool:
    """Whether the process imported torch, from its ``-X importtime`` trace."""
    trace = subprocess.run([PY, "-X", "importtime", *command], cwd=ROOT, check=True, capture_output=True, text=True)
    return any(line.rstrip().endswith("| torch") for line in trace.stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, packed = Path(tmp) / "run", Path(tmp) / "m.safetensors"
        search = ["search", "--method", "uniform", "--target-bits", "2", "--data", "synthetic", "--epochs", "1"]
        search += ["--limit-train-batches", "4", "--limit-val-batches", "1", "--out", str(run_dir), "--quiet"]
        subprocess.run([PY, "-m", "mpq_cli", *search], cwd=ROOT, check=True, capture_output=True)
        subprocess.run([PY, "-m", "mpq_cli", "export", str(run_dir), "-o", str(packed)], cwd=ROOT, check=True)
        commands = {
            "python -c pass": ["-c", "pass"],
            'python -c "import torch"': ["-c", "import torch"],
            "mpq --help": ["-m", "mpq_cli", "--help"],
            "mpq search --help": ["-m", "mpq_cli", "search", "--help"],
            "mpq inspect FILE": ["-m", "mpq_cli", "inspect", str(packed)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):  # in turns, so a slow moment of the machine hits every command alike
            for name, command in commands.items():
                times[name].append(wall([PY, *command]))
        torch_used = {name: imports_torch(command) for name, command in commands.items() if name.startswith("mpq")}
    median = {name: statistics.median(t) for name, t in times.items()}
    reference = median['python -c "import torch"']
    lines = ["# Start-up time of the commands that need no tensors", "", __doc__.split("\n\n", 2)[2].strip(), ""]
    lines += ["| command | median s | min s | / import torch | imports torch |", "|---|---|---|---|---|"]
    for name in commands:
        used = {True: "yes", False: "no"}.get(torch_used.get(name), "")
        lines.append(
            f"| `{name}` | {median[name]:.2f} | {min(times[name]):.2f} | {median[name] / reference:.2f} | {used} |"
        )
    lines += ["", f"{args.repeats} rounds; Python {sys.version.split()[0]}.", "", "Command:", "", "```"]
    lines += [".venv/bin/python benchmarks/startup.py", "```"]
    write_results("benchmarks/results/startup.md", lines)


if __name__ == "__main__":
    main()
