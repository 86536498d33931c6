"""Trained FP32 references for the evidence page (issue 28): resnet20 and MobileNetV2 on CIFAR-10.

Run from the repository root after `bash scripts/setup.sh`, in the background (an hour or more on a
2-core CPU); run it again to continue an interrupted reference (`mpq train --resume`):

    nice .venv/bin/python benchmarks/references.py --only resnet20     # benchmarks/results/references.md

Each reference is trained by `mpq train` on the shared CIFAR-10 JPEGs (`--data-dir ../shared/data`)
with `--val-split 5000`: 500 images per class held out of the 50,000 training images by mpq's fixed
seed, so every search started from a reference can check and choose on images the reference never
trained on; the test split is measured once, at the end. Schedules:

- resnet20 from scratch: SGD (momentum 0.9), lr 0.1, weight decay 5e-4, one epoch of linear warm-up,
  then cosine to 0 over `--r20-epochs` (40) epochs of batch 128, random crops and flips.
- mobilenet_v2 from the shared ImageNet backbone with a new head, at 96 px (CIFAR upsampled: at 32 px
  its strides leave 1 px): SGD lr 0.01, weight decay 4e-5, cosine over `--mbv2-epochs` (10) epochs of
  batch 64.

The finished reference's checkpoint is copied to `benchmarks/references/NAME-cifar10.safetensors`
with its SHA-256 on the results page; resnet20's (about 1 MB) is kept in the repository, larger ones
are rebuilt by this command. The page gives each reference's per-epoch hold-out top-1 (its plateau)
and the test top-1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil

from _common import ROOT, run, write_results

BACKBONE = ROOT.parent / "shared/data/mobilenet_v2-imagenet-features.safetensors"
REFERENCES = {
    "resnet20": lambda a: [
        "--model", "resnet20", "--batch-size", "128", "--epochs", str(a.r20_epochs), "--optimizer", "sgd",
        "--lr", "0.1", "--weight-decay", "5e-4", "--schedule", "cosine", "--lr-warmup-epochs", "1",
    ],
    "mobilenet_v2": lambda a: [
        "--model", "mobilenet_v2", "--checkpoint", str(BACKBONE),
        "--input-size", "3,96,96", "--batch-size", "64", "--epochs", str(a.mbv2_epochs), "--optimizer", "sgd",
        "--lr", "0.01", "--weight-decay", "4e-5", "--schedule", "cosine",
    ],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="resnet20,mobilenet_v2", help="references to train, comma-separated")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data"))
    parser.add_argument("--val-split", default="5000")
    parser.add_argument("--r20-epochs", type=int, default=40)
    parser.add_argument("--mbv2-epochs", type=int, default=10)
    parser.add_argument("--out", default="runs/references")
    args = parser.parse_args()
    log: list[str] = []
    rows = []
    for name in [n for n in args.only.split(",") if n]:
        run_dir = ROOT / args.out / name
        command = ["train", *REFERENCES[name](args), "--data", "cifar10", "--data-dir", args.data_dir]
        command += ["--val-split", args.val_split, "--seed", "0", "--out", str(run_dir)]
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
            log.append("mpq " + " ".join(command))
        else:
            resume = ["--resume"] if (run_dir / "checkpoint.pt").is_file() else []
            summary = run([*command, *resume], log)
        kept = ROOT / "benchmarks/references" / f"{name}-cifar10.safetensors"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "model.safetensors", kept)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in records if r.get("stage") == "train"]
        rows.append((name, summary, kept, hashlib.sha256(kept.read_bytes()).hexdigest(), epochs))
    lines = ["# FP32 references on CIFAR-10 (shared JPEGs)", "", __doc__.split("\n\n", 2)[2].strip(), ""]
    lines += ["| reference | epochs | hold-out top-1 % (last epoch) | test top-1 % | file | bytes | sha256 |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for name, summary, kept, digest, epochs in rows:
        lines.append(
            f"| {name} | {len(epochs)} | {summary.get('val_top1', float('nan')):.2f} | {summary['top1']:.2f} | "
            f"`{kept.relative_to(ROOT)}` | {kept.stat().st_size:,} | `{digest}` |"
        )
    for name, _, _, _, epochs in rows:
        curve = ", ".join(f"{e['val_top1']:.1f}" for e in epochs)
        lines += ["", f"{name}, hold-out top-1 per epoch: {curve}"]
    lines += ["", "Commands:", "", "```", *log, "```"]
    write_results("benchmarks/results/references.md", lines)


if __name__ == "__main__":
    main()
