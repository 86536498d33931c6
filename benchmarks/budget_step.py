"""The loss-aware budget step's time as a ratio to a training step, exact probe against the screen (issue 32).

Run from the repository root (random initialisation and synthetic data are fine for timing):

    .venv/bin/python benchmarks/budget_step.py                                  # resnet20, synthetic
    .venv/bin/python benchmarks/budget_step.py --data cifar10 --data-dir ../shared/data
    .venv/bin/python benchmarks/budget_step.py --checkpoint benchmarks/references/resnet20-cifar10.safetensors \\
        --data cifar10 --data-dir ../shared/data                               # a trained model: the schemes too

In one process: the model under the method (CSQ by default, at a 3-bit target from 8 bits, so the step
has every layer's every option to weigh: resnet20 has 22 layers x 8 options) trains ``--steps`` steps
(the engine's own ``train_step``, after ``--warmup`` untimed ones) and the median step is the unit. Then
from the same state (saved and loaded back before each) the method's ``finalize()``, which runs the
budget step, is timed once per ``--budget-probe`` mode, probe batch count (``--probe-batches 2,8``) and
span (``--spans 2,0``: options within 2 bits of a layer's learned bits, or 0: all of them), with the
model's forward passes counted and the chosen scheme's loss measured afterwards on the run's largest
probe set (the same batches for every row). The ratio is the step's seconds over the median training
step's. Every number is one run: on a busy machine the ratio is noisy. The exact probe's cost grows with
layers x options x batches; the screen's should grow with the batches only (issue 32).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpq_cli.data import DataConfig, load_data  # noqa: E402
from mpq_cli.engine import TrainConfig, loss_probe, make_optimizer, train_step  # noqa: E402
from mpq_cli.methods import get_method  # noqa: E402
from mpq_cli.models import ModelSpec, build_model  # noqa: E402
from mpq_cli.models.loading import load_checkpoint  # noqa: E402

PROBE_EPOCH = 10**6  # the probe's batches: a fixed epoch of the training split, as mpq search takes them


def _batches(args):
    """``(info, training batches, probe batches)``: synthetic tensors or the dataset's training split."""
    if args.data == "synthetic":
        gen = torch.Generator().manual_seed(1)
        size = 32

        def make():
            return torch.randn(args.batch_size, 3, size, size, generator=gen), torch.randint(
                0, 10, (args.batch_size,), generator=gen
            )

        train = [make() for _ in range(args.warmup + args.steps)]
        probe = [make() for _ in range(args.probe_batches)]
        return (10, 3, (size, size)), train, probe
    info, train, _ = load_data(DataConfig(name=args.data, data_dir=args.data_dir, batch_size=args.batch_size))
    train.set_epoch(PROBE_EPOCH)
    probe = [b for _, b in zip(range(args.probe_batches), train, strict=False)]
    train.set_epoch(0)
    steps = [b for _, b in zip(range(args.warmup + args.steps), train, strict=False)]
    return (info.num_classes, info.in_channels, tuple(info.input_size)), steps, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--method", default="csq", choices=["csq", "bsq"])
    parser.add_argument("--target-bits", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probe-batches", default="8", help="comma list: a row per count")
    parser.add_argument("--spans", default="2", help="comma list of budget_span values (0: every option)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="exact,screen")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    counts = [int(c) for c in args.probe_batches.split(",")]
    spans = [int(c) for c in args.spans.split(",")]
    args.probe_batches = max(counts)
    (classes, channels, size), steps, probe_batches = _batches(args)
    model = build_model(ModelSpec(args.model, num_classes=classes, in_channels=channels, input_size=size))
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    cls = get_method(args.method)
    # BSQ's budget step runs at its projection; from a fresh model its scheme is already its max bits
    method = cls(cls.config_class.from_dict({"target_bits": args.target_bits}))
    probes = {count: loss_probe(model, probe_batches[:count], count) for count in counts}
    measure = probes[max(counts)]  # every row's scheme measured on the same batches
    method.prepare(model, loss_probe=probes[counts[0]])
    method.on_epoch_start(0, 1, 10**9)  # steady state: no scheduled decision in reach of the timed steps
    defaults = cls.training_defaults
    cfg = TrainConfig(epochs=1, optimizer=defaults["optimizer"], lr=defaults["lr"], device="cpu")
    optimizer = make_optimizer(method.param_groups(model, defaults["weight_decay"]), cfg)
    model.train()
    times = []
    for i, (x, y) in enumerate(steps):
        started = time.perf_counter()
        train_step(model, x, y, optimizer, method, cfg)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    step = statistics.median(times)
    model_state = copy.deepcopy(model.state_dict())
    method_state = copy.deepcopy(method.state_dict())
    rows = []
    for mode in args.modes.split(","):
        for count in counts:
            for span in spans:
                model.load_state_dict(model_state)
                method.load_state_dict(copy.deepcopy(method_state))
                method.config.budget_probe, method.config.budget_span = mode, span
                method.loss_probe = probes[count]
                model.train()
                forwards = [0]
                handle = model.register_forward_hook(lambda *_, n=forwards: n.__setitem__(0, n[0] + 1))
                started = time.perf_counter()
                result = method.finalize()
                seconds = time.perf_counter() - started
                handle.remove()
                scheme = method.layer_bits()
                label = f"{mode} | {count} | {span or 'all'}"
                rows.append(
                    (label, seconds, seconds / step, forwards[0], measure(), method.average_bits(), result, scheme)
                )
    print(f"# Budget step against a training step: {args.model}, {args.method}, target {args.target_bits} bits")
    print()
    print(f"`{' '.join(['benchmarks/budget_step.py', *sys.argv[1:]])}` on {platform.processor() or 'cpu'}, ")
    print(f"torch threads {torch.get_num_threads()}; one run, on a busy machine the ratios are noisy.")
    print(f"Training step (median of {len(times)}, batch {args.batch_size}): {step * 1000:.1f} ms.")
    print()
    print(
        "| probe | probe batches | span | budget step s | / training step | forward passes | loss after "
        f"({max(counts)} batches) | avg bits | budget met |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, seconds, ratio, passes, loss, bits, result, _ in rows:
        print(f"| {mode} | {seconds:.1f} | {ratio:.0f} | {passes} | {loss:.4f} | {bits:.3f} | {result.budget_met} |")
    print()
    for mode, *_, scheme in rows:
        print(f"- {mode}: " + " ".join(f"{b}" for b in scheme.values()))


if __name__ == "__main__":
    main()
