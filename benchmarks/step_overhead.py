"""A search's training step against plain FP32 training: time and peak memory, per method and model.

Run from the repository root after `bash scripts/setup.sh`, with nothing else running:

    .venv/bin/python benchmarks/step_overhead.py            # writes benchmarks/results/step_overhead.md

For each model (lenet5 at 28 px, resnet20 at 32 px, torchvision resnet18 at 64 px on a CPU,
all on synthetic data) the FP32 step and each method's step (forward, loss, the method's
regulariser, backward, its gradient hook, the optimizer, its step-end hook: the engine's own
`train_step`) run interleaved in one process: every round times `--steps` steps of each
variant in turn, after `--warmup` untimed ones, and the ratio is the median round of the
method over the median round of FP32. Methods run in their steady state: their scheduled
decisions (CSQ's and BSQ's projection, BSQ's re-quantization and controller, ALQ's pruning
rounds, BMPQ's assignments) happen at epoch boundaries or at a fraction of the search, not
in the steps timed. Each method uses its paper's optimizer (`training_defaults`); FP32 uses
SGD with momentum. Methods quantize weights only, except the `bmpq` row: BMPQ's default also
quantizes each layer's input at its weight bits (PACT), and `bmpq-weights` is BMPQ without it.
`--compile` adds CSQ and BSQ under mpq's `--compile` (their warm-up steps include the compile).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the steps (model, optimizer state
and activations); on a CPU the resident high-water mark (VmHWM) of a fresh process that builds
the model and runs the steps, minus its resident set before the model was built. Before that,
the process runs one step of the FP32 model on a 2-image batch (lazy imports, thread pools), and
each variant has its own process, so one variant's freed memory cannot hide another's peak. Both
include the model, its optimizer state and the activations; the CPU figure is coarse for models
of a few MB (lenet5), where the allocator's own growth dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpq_cli.engine import TrainConfig, make_optimizer, train_step  # noqa: E402
from mpq_cli.methods import get_method  # noqa: E402
from mpq_cli.models import ModelSpec, build_model  # noqa: E402

METHODS = ("uniform", "csq", "bsq", "bmpq", "bmpq-weights", "alq")
# the method's usual search settings at a 3-bit average (ALQ: 2); act_bits 4 in every row would add PACT's
# cost to every method alike, so weights only: the comparison is of the methods' own machinery
# BMPQ's default also quantizes every layer's input at its weight bits (PACT), so it has two rows: as a
# user runs it, and weights only like the others
CONFIGS = {
    "uniform": {"target_bits": 3},
    "csq": {"target_bits": 3},
    "bsq": {"target_bits": 3},
    "bmpq": {"target_bits": 3, "edge_bits": None},
    "bmpq-weights": {"target_bits": 3, "edge_bits": None, "act_follow_weights": False},
    "alq": {"target_bits": 2},
}
COMPILED = ("csq", "bsq")  # with --compile these also run as NAME+compile (mpq's --compile)


def base_method(variant: str) -> str:
    return variant.split("+")[0].split("-")[0]


SIZES = {"lenet5": (1, 28), "resnet20": (3, 32), "resnet18": (3, 64)}
TARGETS = {"uniform": 1.1, "bmpq": 1.1, "csq": 1.3, "bsq": 1.3, "alq": 2.0}
MEMORY_TARGETS = {"csq": 2.5, "bsq": 2.5}  # the others: 1.3


class Variant:
    """One model under FP32 training or one method, with its optimizer and a synthetic batch."""

    def __init__(self, model_name: str, method: str | None, batch: int, size: int, device: torch.device, amp: bool):
        channels, default_size = SIZES[model_name]
        size = size or default_size
        torch.manual_seed(0)
        spec = ModelSpec(model_name, None, 10, channels, (size, size))
        self.model = build_model(spec).to(device)
        self.method = None
        self.cfg = TrainConfig(epochs=1, optimizer="sgd", lr=0.01, amp=amp, device=str(device))
        hooks = None
        if method is not None:
            cls = get_method(base_method(method))
            self.method = cls(cls.config_class.from_dict(CONFIGS[method.split("+")[0]]))
            self.method.prepare(self.model)
            self.method.on_epoch_start(0, 1, 10**9)  # steady state: no scheduled decision in reach
            defaults = cls.training_defaults
            self.cfg = TrainConfig(
                epochs=1,
                optimizer=defaults["optimizer"],
                lr=defaults["lr"],
                weight_decay=defaults["weight_decay"],
                amp=amp,
                device=str(device),
                compile=method.endswith("+compile"),
            )
            hooks = self.method
        self.hooks = hooks or _Plain()
        self.optimizer = make_optimizer(self.hooks.param_groups(self.model, self.cfg.weight_decay), self.cfg)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, channels, size, size, generator=gen).to(device)
        self.y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        self.model.train()

    def steps(self, n: int) -> None:
        for _ in range(n):
            train_step(self.model, self.x, self.y, self.optimizer, self.hooks, self.cfg)


class _Plain:
    def param_groups(self, model, weight_decay):
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]

    def regularizer(self):
        return None

    def before_optimizer_step(self):
        pass

    def on_step_end(self):
        pass

    def wants_optimizer_reset(self):
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: dict[str, Variant], steps: int, warmup: int, rounds: int, device) -> dict[str, float]:
    """Median seconds per step of each variant over ``rounds`` interleaved rounds."""
    for v in variants.values():
        v.steps(warmup)
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            _sync(device)
            started = time.perf_counter()
            v.steps(steps)
            _sync(device)
            samples[name].append((time.perf_counter() - started) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(model: str, method: str | None, batch: int, size: int, device: torch.device, amp: bool, steps: int):
    """Peak bytes of building ``model`` (under ``method``) and running ``steps`` steps."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        v = Variant(model, method, batch, size, device, amp)
        v.steps(steps)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del v
        return peak
    argv = [sys.executable, __file__, "--_memory", json.dumps([model, method, batch, size, amp, steps])]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _memory_child(spec: str) -> None:
    model, method, batch, size, amp, steps = json.loads(spec)
    # lazy imports, thread pools and kernels' one-off buffers are the process's, not the variant's: start them
    # with a step of the FP32 model on a 2-image batch first
    Variant(model, None, 2, size, torch.device("cpu"), amp).steps(1)
    before = _rss_bytes()
    v = Variant(model, method, batch, size, torch.device("cpu"), amp)
    v.steps(steps)
    print(_peak_rss_bytes() - before)


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM; ``ru_maxrss`` would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,resnet20,resnet18")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=0, help="input size for every model (0: each model's own)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast, as mpq's --amp")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="also time CSQ and BSQ under mpq's --compile (its warm-up compiles)"
    )
    parser.add_argument("--results", default="benchmarks/results/step_overhead.md")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        return _memory_child(args._memory)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    methods = [m for m in args.methods.split(",") if m]
    if args.compile:
        methods += [f"{m}+compile" for m in methods if m in COMPILED]
    rows, numbers = [], []
    for model in args.models.split(","):
        variants = {"fp32": Variant(model, None, args.batch, args.size, device, args.amp)}
        for method in methods:
            variants[method] = Variant(model, method, args.batch, args.size, device, args.amp)
        times = time_interleaved(variants, args.steps, args.warmup, args.rounds, device)
        del variants
        memory = {}
        if not args.no_memory:
            for name in ["fp32", *methods]:
                memory[name] = peak_memory(
                    model, None if name == "fp32" else name, args.batch, args.size, device, args.amp, args.warmup
                )
        for name in methods:
            ratio = times[name] / times["fp32"]
            mem = memory[name] / memory["fp32"] if memory else None
            numbers.append(
                {
                    "model": model,
                    "method": name,
                    "step_ms": 1000 * times[name],
                    "fp32_step_ms": 1000 * times["fp32"],
                    "time_ratio": ratio,
                    "memory_ratio": mem,
                    "peak_bytes": memory.get(name),
                    "fp32_peak_bytes": memory.get("fp32"),
                }
            )
            target = TARGETS[base_method(name)]
            time_ok = "yes" if ratio <= target else "**no**"
            mem_target = MEMORY_TARGETS.get(base_method(name), 1.3)
            mem_cell = "" if mem is None else f"{mem:.2f} (≤ {mem_target}: {'yes' if mem <= mem_target else '**no**'})"
            rows.append(
                f"| {model} | {name} | {1000 * times['fp32']:.1f} | {1000 * times[name]:.1f} | "
                f"{ratio:.2f} (≤ {target}: {time_ok}) | {_mb(memory.get(name))} ({_mb(memory.get('fp32'))}) | "
                f"{mem_cell} |"
            )
    size = f"{args.size} px" if args.size else "lenet5 28 px, resnet20 32 px, resnet18 64 px"
    lines = [
        "# Training-step overhead of each method over FP32",
        "",
        f"Device: {device.type} ({_device_name(device)}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}. Batch {args.batch}, {size}, synthetic data, "
        f"{'bf16 autocast' if args.amp else 'FP32'}; median of {args.rounds} interleaved rounds of {args.steps} steps "
        f"after {args.warmup} warm-up steps. Command: `.venv/bin/python benchmarks/step_overhead.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        "| model | method | FP32 step ms | method step ms | time ratio (target) | peak MB (FP32 MB) | "
        "peak memory ratio (target) |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=1))
    print(text)


if __name__ == "__main__":
    main()
