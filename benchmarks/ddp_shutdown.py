"""How often a torchrun launch of mpq's process group dies at exit: the flaky-test check of tests/test_distributed.py.

Each launch joins two gloo ranks through ``mpq_cli.distributed.session``, trains a tiny model under DDP for a few
steps, compares digests and all-reduces, and returns. Before ``session`` collected the DDP wrappers ahead of
``destroy_process_group``, about one launch in five under load ended in SIGABRT ("terminate called without an
active exception": a gloo thread needing the GIL while the interpreter shut down). Load the machine (two busy
processes, or the test suite) to see it:

    .venv/bin/python benchmarks/ddp_shutdown.py --launches 40
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RANK_BODY = """
import torch
from torch import nn
from mpq_cli import distributed

def body(world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    wrapped = distributed.data_parallel(model, torch.device("cpu"))
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    for _ in range(5):
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        loss = nn.functional.cross_entropy(wrapped(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    distributed.check_agreement({"p": distributed.digest([p.detach() for p in model.parameters()])}, "parameters")
    distributed.all_reduce_sum([torch.ones(3)])

with distributed.session() as world:
    body(world)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=40)
    args = parser.parse_args()
    script = ROOT / "runs" / "ddp_shutdown_rank.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(RANK_BODY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    failed = 0
    for i in range(args.launches):
        done = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            failed += 1
            lines = [line for line in done.stderr.splitlines() if "terminate" in line or "Error" in line]
            print(f"launch {i + 1}: exit {done.returncode}: {(lines or ['?'])[0]}", flush=True)
    print(f"{failed} of {args.launches} launches failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
