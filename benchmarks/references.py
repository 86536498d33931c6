"""Trained FP32 references for the evidence page (issue 28): resnet20 and MobileNetV2 on CIFAR-10.

Run from the repository root after `bash scripts/setup.sh`, in the background (an hour or more on a
2-core CPU); run it again to continue an interrupted reference (`mpq train --resume`):

    nice .venv/bin/python benchmarks/references.py --only resnet20     # benchmarks/results/references.md
    nice .venv/bin/python benchmarks/references.py --only ""           # the page from the records alone

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
(resnet20's, 1.1 MB, is kept in the repository; MobileNetV2's, 9.1 MB, is not: this command rebuilds it in about
3 CPU hours, and its SHA-256 below says whether a copy is the one the results came from) with its SHA-256 on the
results page, and its record (curve, numbers, command) to `benchmarks/results/references/NAME.json`: the
page lists every recorded reference, so training one leaves the others' rows. The page gives each
reference's per-epoch hold-out top-1 (its plateau) and the test top-1.
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
    records = ROOT / "benchmarks/results/references"
    for name in [n for n in args.only.split(",") if n]:
        run_dir = ROOT / args.out / name
        command = ["train", *REFERENCES[name](args), "--data", "cifar10", "--data-dir", args.data_dir]
        command += ["--val-split", args.val_split, "--seed", "0", "--out", str(run_dir)]
        log: list[str] = []
        if (run_dir / "summary.json").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
            log.append("mpq " + " ".join(command))
        else:
            resume = ["--resume"] if (run_dir / "checkpoint.pt").is_file() else []
            summary = run([*command, *resume], log)
        kept = ROOT / "benchmarks/references" / f"{name}-cifar10.safetensors"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "model.safetensors", kept)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = [m["val_top1"] for m in metrics if m.get("stage") == "train"]
        record = {
            "name": name, "epochs": len(curve), "val_top1": summary.get("val_top1"), "top1": summary["top1"],
            "val_top1_per_epoch": [round(v, 1) for v in curve], "command": log[-1],
        }  # fmt: skip
        records.mkdir(parents=True, exist_ok=True)
        (records / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    found = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))] if records.is_dir() else []
    found.sort(key=lambda r: list(REFERENCES).index(r["name"]) if r["name"] in REFERENCES else len(REFERENCES))
    lines = ["# FP32 references on CIFAR-10 (shared JPEGs)", "", __doc__[__doc__.index("Each reference") :].strip(), ""]
    lines += ["| reference | epochs | hold-out top-1 % (last epoch) | test top-1 % | file | bytes | sha256 |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for r in found:
        kept = ROOT / "benchmarks/references" / f"{r['name']}-cifar10.safetensors"
        size, digest = (
            (kept.stat().st_size, hashlib.sha256(kept.read_bytes()).hexdigest()) if kept.is_file() else (0, "?")
        )
        lines.append(
            f"| {r['name']} | {r['epochs']} | {r['val_top1'] or float('nan'):.2f} | {r['top1']:.2f} | "
            f"`{kept.relative_to(ROOT)}` | {size:,} | `{digest}` |"
        )
    for r in found:
        lines += [
            "",
            f"{r['name']}, hold-out top-1 per epoch: " + ", ".join(f"{v:.1f}" for v in r["val_top1_per_epoch"]),
        ]
    lines += ["", "Commands:", "", "```", *(r["command"] for r in found), "```"]
    write_results("benchmarks/results/references.md", lines)


if __name__ == "__main__":
    main()
