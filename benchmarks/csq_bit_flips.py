"""Do CSQ's bits train? Logit gradients and the codes that change after the projection.

Run from the repository root after `bash scripts/setup.sh` and `benchmarks/fashion_mnist.py`
(whose FP32 lenet5 is the reference; pass --fp32 otherwise):

    .venv/bin/python benchmarks/csq_bit_flips.py      # writes benchmarks/results/csq_bit_flips.md

Measures, on lenet5 at 2 bits from its FP32 checkpoint:

1. the mean |gradient| of each layer's bit logits per bit position on one training batch
   at beta = 1 (the paper's plain gradient), next to the weights' own mean |gradient|;
2. per layer, the share of integer codes that differ between the projection (the scheme
   fixed, half of the search) and the end of a 4-epoch search, for CSQ with the paper's
   plain gradient and no residuals, and for CSQ's defaults;
3. for comparison, the share of codes uniform QAT changes over the second half of its
   run (it has no projection; its scale keeps moving, which moves codes too).

The searches are the ones `mpq search` runs, in process, with a subclass that records
the codes at the projection.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ROOT, fp32_reference, fresh_output, write_results  # noqa: E402

from mpq_cli import api  # noqa: E402
from mpq_cli.commands.context import setup  # noqa: E402
from mpq_cli.data import DataConfig  # noqa: E402
from mpq_cli.engine import TrainConfig  # noqa: E402
from mpq_cli.methods.base import register  # noqa: E402
from mpq_cli.methods.csq import CSQ, CSQConfig  # noqa: E402
from mpq_cli.methods.uniform import Uniform  # noqa: E402

RECORDED: dict[str, torch.Tensor] = {}


@register("csq-recording")
class RecordingCSQ(CSQ):
    """CSQ that keeps a copy of every layer's codes right after the projection."""

    def project(self) -> None:
        super().project()
        RECORDED.update({name: q.exact_codes()[0].clone() for name, q in self.quantizers().items()})


@register("uniform-recording")
class RecordingUniform(Uniform):
    """Uniform QAT that keeps a copy of every layer's codes at half its run (where CSQ projects)."""

    def on_epoch_start(self, epoch: int, epochs: int, steps_per_epoch: int) -> None:
        super().on_epoch_start(epoch, epochs, steps_per_epoch)
        if epoch == epochs // 2:
            RECORDED.update({name: q.exact_codes()[0].clone() for name, q in self.quantizers().items()})


def logit_gradients(fp32: str) -> list[str]:
    """Rows: layer, mean |dL/dW|, mean |dL/dm_p| per bit position (LSB first) at beta = 1."""
    data = DataConfig(name="fashion-mnist", batch_size=256)
    ctx = setup(api.ModelOptions("lenet5", None, fp32), data, TrainConfig(epochs=1, device="cpu"))
    method = CSQ(CSQConfig(target_bits=2.0, carry_residual=False, precondition="none"))
    method.prepare(ctx.model)
    ctx.model.train()
    x, y = next(iter(ctx.train))
    weight_grads: dict[str, torch.Tensor] = {}

    def keep_weight_grad(name):  # the relaxed weight a layer computes with, and its gradient
        def hook(module, args, weight) -> None:
            weight.register_hook(lambda g: weight_grads.__setitem__(name, g))

        return hook

    handles = [
        layer.weight_quantizer.register_forward_hook(keep_weight_grad(name)) for name, layer in method.layers.items()
    ]
    F.cross_entropy(ctx.model(x), y).backward()
    for handle in handles:
        handle.remove()
    rows = []
    for name, layer in method.layers.items():
        q = layer.weight_quantizer
        per_bit = q.bit_logits_pos.grad.abs().flatten(0, -2).mean(0)
        rows.append(
            f"| {name} | {layer.params:,} | {weight_grads[name].abs().mean():.1e} | "
            + " | ".join(f"{v:.1e}" for v in per_bit.tolist())
            + " |"
        )
    return rows


def changed_codes(method: str, extra: dict, fp32: str, out: Path, epochs: int, seed: int) -> tuple[dict, float]:
    """Per layer, the percent of codes that differ from the recorded ones at the end; and top-1."""
    RECORDED.clear()
    data = DataConfig(name="fashion-mnist", batch_size=256)
    defaults = (CSQ if method.startswith("csq") else Uniform).training_defaults
    train = TrainConfig(epochs=epochs, seed=seed, **defaults)
    options = api.SearchOptions(method=method, method_config={"target_bits": 2.0, **extra})
    summary = api.search(api.ModelOptions("lenet5", None, fp32), data, train, options, out=str(ROOT / out))
    from safetensors.torch import load_file

    final = load_file(str(ROOT / out / "codes.safetensors"))
    return (
        {name: 100.0 * float((final[f"{name}.codes"] != codes).float().mean()) for name, codes in RECORDED.items()},
        summary["top1"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", default="runs/bench-fmnist/fp32", help="an `mpq train` run of lenet5 (reference)")
    parser.add_argument("--out", default="runs/bench-csq-bit-flips", help="folder for the run directories")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="benchmarks/results/csq_bit_flips.md")
    args = parser.parse_args()
    out = fresh_output(args.out)
    fp_top1 = fp32_reference(args.fp32)["top1"]
    gradient_rows = logit_gradients(args.fp32)
    variants = [
        (
            "csq, paper's plain gradient, no residuals",
            "csq-recording",
            {"precondition": "none", "carry_residual": False},
            "after the projection",
        ),
        ("csq (defaults)", "csq-recording", {}, "after the projection"),
        ("uniform QAT", "uniform-recording", {}, "over the second half"),
    ]
    rows, layers = [], None
    for i, (label, method, extra, span) in enumerate(variants):
        changed, top1 = changed_codes(method, extra, args.fp32, out / f"run{i}", args.epochs, args.seed)
        layers = layers or list(changed)
        rows.append(f"| {label} | {span} | " + " | ".join(f"{changed[n]:.2f}" for n in layers) + f" | {top1:.2f} |")
    invocation = " ".join([".venv/bin/python", "benchmarks/csq_bit_flips.py", *sys.argv[1:]])
    write_results(
        args.results,
        [
            "# Do CSQ's bits train? (lenet5, Fashion-MNIST, 2 bits)",
            "",
            f"Produced by `{invocation}` on {platform.machine()}, 2-core CPU. Reference: `{args.fp32}` "
            f"({fp_top1:.2f} % top-1).",
            "",
            "Mean |gradient| on one training batch of 256 at beta = 1, from the FP32 checkpoint, with the paper's "
            "plain gradient: the weight's, and the positive bit logits' per bit position (bit 0 = LSB):",
            "",
            "| layer | weights | dL/dW | " + " | ".join(f"bit {b}" for b in range(8)) + " |",
            "|---|---|---|" + "---|" * 8,
            *gradient_rows,
            "",
            f"Percent of each layer's integer codes changed ({args.epochs}-epoch search, seed {args.seed}; "
            "CSQ projects and fixes its scheme at half the search):",
            "",
            "| run | codes compared | " + " | ".join(layers) + " | top-1 % |",
            "|---|---|" + "---|" * (len(layers) + 1),
            *rows,
        ],
    )


if __name__ == "__main__":
    main()
