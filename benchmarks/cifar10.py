"""CIFAR-10 on real RGB images: resnet20 and an ImageNet-pretrained MobileNetV2, every method against uniform.

Run from the repository root after `bash scripts/setup.sh`, in the background (hours on a 2-core CPU):

    .venv/bin/python benchmarks/cifar10.py            # writes benchmarks/results/cifar10.md

Data: the shared CIFAR-10 JPEGs (`--data-dir ../shared/data`, decoded once into a cache). Rows:

- resnet20: an FP32 reference trained from scratch; from it, at 2 and 3 average bits (each
  method's own count), CSQ, BSQ (budget mode) and uniform QAT (all three store a sign beside
  their bits: 3 and 4 stored bits), BMPQ with support {2,4} and {2,3,4} (from scratch as its
  paper, and from the checkpoint) at the same stored bits (its count includes the sign: 3 and
  4; at 2 it is refused, its 16-bit first and last layers put the smallest scheme at 2.055),
  and ALQ at 1 bit beside uniform at 1 bit (+sign, ternary);
- mobilenet_v2: the shared ImageNet backbone with a new head, fine-tuned at 96 px (CIFAR
  upsampled: at 32 px its strides leave 1 px) as the FP32 reference; from it every method at
  an average of 4 bits and uniform 4 bits, and ALQ at 2.

Budget: about 3 hours of this 2-core CPU (a resnet20 FP32 epoch takes ~240 s here, a 96-px
MobileNetV2 batch of 64 ~1.5 s), so the quantized rows are short: every resnet20 quantized row
trains `--epochs` (2) epochs of `--r20-batches` (100) random batches of 128, from the FP32
reference trained `--fp-epochs` (8) full epochs; every MobileNetV2 row trains `--mbv2-epochs`
(2) epochs of `--mbv2-batches` (100) batches of 64. Short QAT from a trained checkpoint: the
rows compare methods at equal (small) effort, not what any of them reaches at full length.
Learning rate: every row that starts from an FP32 reference uses one lr for all methods
with each method's own optimizer (`--mbv2-lr` 0.002, a fine-tuning lr; `--r20-lr` 0.01,
uniform's default), because the bit methods' defaults are their papers' from-scratch settings (0.1),
under which a fine-tuned MobileNetV2 diverged (CSQ: 15.9 % top-1 at lr 0.1). Uniform on
MobileNetV2 also runs at its own default (0.01), so the baseline gets the better of two lrs.
Validation during training checks `--val-batches` (20) batches; every row's top-1 is
measured on the whole test set from its exported file (`mpq eval FILE`; FP32 rows `mpq eval
RUN`), with nominal and stored bits, file bytes and wall seconds. The MobileNetV2 block runs
first (its 4-bit comparison is the headline). Each finished run is reused when the script
is run again (its summary.json exists), so an interrupted benchmark continues, and so is its
measurement (`<run>.measured.json`, while the summary is unchanged); the results page is
rewritten after every row. `--seeds 0,1` repeats the searches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, run, write_results  # noqa: E402

BACKBONE = "../shared/data/mobilenet_v2-imagenet-features.safetensors"
EVERY_BATCH = 10**9  # a --limit-val-batches no test set reaches: the whole test set
# BMPQ's paper quantizes each layer's input at the layer's weight bits (PACT); every other row keeps FP
# activations, so the like-for-like BMPQ rows switch that off, and the MobileNetV2 block also shows the paper's
BMPQ_FP_ACTIVATIONS = ["--set", "act_follow_weights=false"]
# MobileNetV2 row variants: extra arguments, label, run-directory suffix (the paper-act and mask-lr-null runs
# keep the names they were run under)
VARIANTS = {
    "": ([], "", ""),
    "fp-act": (BMPQ_FP_ACTIVATIONS, " (FP activations)", "-fpact"),
    "paper-act": ([], " (inputs at weight bits, as its paper)", ""),
    "mask-lr-null": (["--set", "mask_lr=null"], " (masks at --lr: mpq before mask_lr)", "-masklrnull"),
    # CSQ with Algorithm 1's schedule: beta reaches 200 by the projection (mpq's default: one ramp over the run)
    "alg1-ramp": (["--set", "ramp_to_projection=true"], " (β at 200 by the projection, as Alg. 1)", "-alg1ramp"),
}


def mobilenet_rows(args, mb: list[str], out: Path) -> list[dict]:
    """MobileNetV2 rows: the fine-tuned FP32 reference, then every method at 4 bits (ALQ 2) from it."""
    rows: list[dict] = []
    rows.append(
        dict(
            name="mobilenet_v2 FP32 (ImageNet backbone, fine-tuned)",
            model="mobilenet_v2",
            run=out / "mb-fp32",
            fp=True,
            command=["train", *mb, "--checkpoint", BACKBONE, "--epochs", str(args.mbv2_epochs), "--seed", "0"],
        )
    )
    mb_fp = str(out / "mb-fp32")
    for seed in args.seeds:
        common = [*mb, "--epochs", str(args.mbv2_epochs), "--seed", str(seed), "--checkpoint", mb_fp]
        common += ["--probe-batches", str(args.mbv2_probe_batches)]
        for method, target, lr, variant in (
            ("uniform", 4, args.mbv2_lr, ""),
            ("uniform", 4, None, ""),  # its own default lr too: the baseline gets the better of two
            ("uniform", 3, args.mbv2_lr, ""),  # 4 stored bits: the methods' 4 nominal bits store 3.9-5
            ("uniform", 3, None, ""),
            ("csq", 4, args.mbv2_lr, ""),
            ("csq", 4, args.mbv2_lr, "alg1-ramp"),
            ("csq", 4, args.mbv2_lr, "mask-lr-null"),  # the search did not move a bit: the budget step did it all
            ("bsq", 4, args.mbv2_lr, ""),
            ("bmpq", 4, args.mbv2_lr, "fp-act"),  # FP activations, as every other row
            ("bmpq", 4, args.mbv2_lr, "paper-act"),  # its paper's inputs at each layer's weight bits
            ("alq", 2, args.mbv2_lr, ""),
        ):
            variant_args, label, suffix = VARIANTS[variant]
            extra = ["--bits", "2,4,6"] if method == "bmpq" else []
            extra += [*variant_args, *(["--lr", str(lr)] if lr is not None else [])]
            rows.append(
                dict(
                    name=f"mobilenet_v2 {method}{label} {target} bits, lr {lr or 'default'}, seed {seed}",
                    model="mobilenet_v2",
                    target=target,
                    run=out / f"mb-{method}{suffix}-{target}-lr{lr or 'default'}-s{seed}",
                    command=["search", "--method", method, "--target-bits", str(target), *extra, *common],
                )
            )
    return rows


def rows_for(args) -> list[dict]:
    """Every run of the benchmark, in order: ``name``, ``command`` (mpq arguments), ``model``."""
    r20 = ["--model", "resnet20", "--data", "cifar10", "--data-dir", args.data_dir, "--batch-size", "128"]
    val = ["--limit-val-batches", str(args.val_batches)]  # the in-training check; top-1 comes from the file
    mb = [
        "--model",
        "mobilenet_v2",
        "--data",
        "cifar10",
        "--data-dir",
        args.data_dir,
        "--input-size",
        "3,96,96",
        "--batch-size",
        "64",
        "--limit-train-batches",
        str(args.mbv2_batches),
        *val,
    ]
    out = Path(args.out)
    rows = [
        dict(
            name="resnet20 FP32",
            model="resnet20",
            run=out / "r20-fp32",
            fp=True,
            command=["train", *r20, "--epochs", str(args.fp_epochs), "--seed", "0"],
        )
    ]
    rows += mobilenet_rows(args, mb, out)
    r20_fp = str(out / "r20-fp32")
    for seed in args.seeds:
        common = [*r20, "--epochs", str(args.epochs), "--limit-train-batches", str(args.r20_batches), *val]
        common += ["--seed", str(seed)]
        for bits in (2, 3):
            for method, extra, start, variant in (
                ("csq", [], True, ""),
                ("csq", [], True, "alg1-ramp"),
                ("bsq", [], True, ""),
                ("uniform", [], True, ""),
                ("bmpq", ["--bits", "2,4", *BMPQ_FP_ACTIVATIONS], False, ""),
                ("bmpq", ["--bits", "2,4", *BMPQ_FP_ACTIVATIONS], True, ""),
                ("bmpq", ["--bits", "2,3,4", *BMPQ_FP_ACTIVATIONS], False, ""),
                ("bmpq", ["--bits", "2,3,4", *BMPQ_FP_ACTIVATIONS], True, ""),
            ):
                variant_args, variant_label, suffix = VARIANTS[variant]
                sign = "sign included" if method == "bmpq" else "+sign"
                # each method's own count: CSQ, BSQ and uniform store a sign beside their bits, BMPQ's count
                # includes it, so BMPQ runs one bit higher to store what the others store (at 2 bits its count
                # is refused: 16-bit first and last layers put the smallest scheme at 2.055)
                target = bits + 1 if method == "bmpq" else bits
                support = extra[1] if extra else ""  # BMPQ's --bits
                label = f"{method}{variant_label} {support}".strip()
                label += " from FP32" if (start and method == "bmpq") else (" from scratch" if method == "bmpq" else "")
                rows.append(
                    dict(
                        name=f"resnet20 {label}, {target} bits ({sign}), seed {seed}",
                        model="resnet20",
                        target=target,
                        stored=bits + 1,  # the rows that store the same bits are compared
                        run=out
                        / f"r20-{method}{suffix}{support.replace(',', '')}-{'ck' if start else 'sc'}-{target}-s{seed}",
                        command=[
                            "search",
                            "--method",
                            method,
                            "--target-bits",
                            str(target),
                            *extra,
                            *variant_args,
                            *common,
                            *(["--checkpoint", r20_fp, "--lr", str(args.r20_lr)] if start else []),
                        ],
                    )
                )
        # ALQ at one basis, beside uniform's fewest bits (1 + sign, ternary: 2.00 stored; ALQ stores ~2.1)
        for method, label, run_name in (
            ("alq", "alq 1 bit", f"r20-alq-1-s{seed}"),
            ("uniform", "uniform, 1 bit (+sign)", f"r20-uniform-ck-1-s{seed}"),
        ):
            rows.append(
                dict(
                    name=f"resnet20 {label}, seed {seed}",
                    model="resnet20",
                    target=1,
                    run=out / run_name,
                    command=["search", "--method", method, "--target-bits", "1", *common, "--checkpoint", r20_fp]
                    + ["--lr", str(args.r20_lr)],
                )
            )
    smoke = ["--limit-train-batches", str(args.smoke), "--limit-val-batches", "2"] if args.smoke else []
    for row in rows:
        command = row["command"]
        for flag in ("--limit-train-batches", "--limit-val-batches") if smoke else ():  # shortened further
            while flag in command:
                i = command.index(flag)
                command = command[:i] + command[i + 2 :]
        row["command"] = [*command, *smoke, "--out", str(row["run"])]
    return rows


def measure(row: dict, log: list[str], data_dir: str, smoke: bool = False) -> dict:
    """The run's summary, its exported file's size and top-1 measured from the file, cached per run."""
    run_dir = ROOT / row["run"]
    cache = run_dir.with_name(run_dir.name + ".measured.json")
    summary_file = run_dir / "summary.json"
    if not smoke and cache.is_file() and summary_file.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("summary_sha256") == hashlib.sha256(summary_file.read_bytes()).hexdigest():
            log.extend(line + "   # measured before" for line in cached["commands"])
            return cached["result"]
    start = len(log)
    result = _measure(row, log, data_dir, smoke)
    if not smoke and "error" not in result and summary_file.is_file():
        key = hashlib.sha256(summary_file.read_bytes()).hexdigest()
        record = {"summary_sha256": key, "commands": [line.split("   #")[0] for line in log[start:]], "result": result}
        cache.write_text(json.dumps(record, indent=1))
    return result


def _measure(row: dict, log: list[str], data_dir: str, smoke: bool) -> dict:
    run_dir = ROOT / row["run"]
    # every batch, explicitly: mpq eval before this page replayed the run's in-training --limit-val-batches
    whole = ["--data-dir", data_dir, "--limit-val-batches", "2" if smoke else str(EVERY_BATCH)]
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        log.append("mpq " + " ".join(row["command"]) + "   # reused")
    else:
        summary = run(row["command"], log, check=False)
        if "error" in summary:  # a budget the method cannot reach is reported, not skipped
            return summary
        summary["wall_seconds_measured"] = summary.pop("wall_seconds")
    if row.get("fp"):  # its training checked a slice of the test set: measure all of it
        evaluated = run(["eval", str(row["run"]), *whole], log)
        size = (run_dir / "model.safetensors").stat().st_size
        return {**summary, "file_bytes": size, "file_top1": evaluated["top1"], "file_images": evaluated["samples"]}
    packed = run_dir.with_name(run_dir.name + ".safetensors")  # not with_suffix: "lr0.002" is no suffix
    report = run(["export", str(row["run"]), "-o", str(packed.relative_to(ROOT))], log)
    evaluated = run(["eval", str(packed.relative_to(ROOT)), *whole], log)
    return {
        **summary,
        "file_bytes": report["file_bytes"],
        "file_top1": evaluated["top1"],
        "file_images": evaluated["samples"],
        "file_stored_bits": report["avg_stored_bits"],
    }


def page(rows: list[dict], results: dict[str, dict], log: list[str], args) -> list[str]:
    lines = [
        "# CIFAR-10: resnet20 and MobileNetV2, every method against uniform",
        "",
        f"Machine: {platform.machine()}, 2-core CPU, no GPU. Data: the shared CIFAR-10 JPEGs (re-encoded at "
        "quality ~75: accuracies sit below published CIFAR-10 figures; compare rows, not papers). "
        f"resnet20 quantized rows: {args.epochs} epochs of {args.r20_batches} random batches of 128 each, from "
        f"an FP32 reference of {args.fp_epochs} full epochs; MobileNetV2 rows: {args.mbv2_epochs} epochs of "
        f"{args.mbv2_batches} batches of 64 at 96 px. Short QAT at equal effort for every row, not full-length "
        "results. Top-1 on the whole test set (10,000 images) from each exported file. Command: "
        "`.venv/bin/python benchmarks/cifar10.py` (arguments above are its defaults). Wall seconds are not "
        "comparable between rows: many ran while tests or another row shared the CPU. A row's measurement is "
        "cached beside its run (`<run>.measured.json`); some were carried there from an earlier page of this "
        "script (same file, same export and eval commands; their top-1 to two decimals).",
        "",
        "| run | avg bits (nominal, the method's count) | avg stored bits (file) | top-1 % (from the file) | "
        "test images | file bytes | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = results.get(row["name"])
        if r is None:
            lines.append(f"| {row['name']} | pending | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {row['name']} | refused: {r['error']} | | | | | |")
            continue
        bits = "32" if row.get("fp") else f"{r['avg_bits']:.3f}"
        stored = "32" if row.get("fp") else f"{r['file_stored_bits']:.3f}"
        wall = r.get("wall_seconds_measured", r.get("seconds", ""))
        images = f"{r['file_images']:,}"
        lines.append(
            f"| {row['name']} | {bits} | {stored} | {r['file_top1']:.2f} | {images} | {r['file_bytes']:,} | {wall} |"
        )
    lines += layer_sections(rows, results)
    lines += ["", "Commands, in order:", "", "```", *log, "```"]
    return lines


def layer_kind(layer: dict) -> str:
    """What a layer is, from its weight's shape: depthwise and pointwise convolutions are where
    MobileNetV2's quantization sensitivity is known to differ."""
    shape = layer["shape"]
    if layer["kind"] == "linear":
        return "classifier"
    out_ch, in_ch, kh, kw = shape
    if in_ch == 1 and kh * kw > 1:
        return f"depthwise {kh}x{kw}"
    return "pointwise 1x1" if kh == kw == 1 else f"conv {kh}x{kw}"


def layer_group(model: str, layer: dict) -> str:
    """The rows of the by-kind table: MobileNetV2's kinds of layer; resnet20's stages (its 3x3 convolutions
    differ by depth and width, and its papers' figures show bits falling from the first stage to the last)."""
    if model != "resnet20":
        return layer_kind(layer)
    stage = layer["name"].split(".")[0]
    if "downsample" in layer["name"]:
        return "downsample 1x1"
    return {"conv1": "first conv", "fc": "classifier"}.get(stage, f"{stage} 3x3")


def layer_sections(rows: list[dict], results: dict[str, dict]) -> list[str]:
    """Per model (resnet20: per budget, as its rows run at 2 and 3 bits), the best run of each method (top-1
    from its file): bits by kind of layer, then layer by layer."""
    lines: list[str] = []
    budgets = sorted({row["stored"] for row in rows if row["model"] == "resnet20" and row.get("stored")})
    for model, budget in [("mobilenet_v2", None), *(("resnet20", b) for b in budgets)]:
        best: dict[str, tuple[float, dict]] = {}
        for row in rows:
            r = results.get(row["name"])
            if row["model"] != model or row.get("fp") or r is None or "error" in r:
                continue
            if budget is not None and row.get("stored") != budget:
                continue
            method = row["command"][row["command"].index("--method") + 1]
            if method == "uniform":  # the same bits everywhere
                continue
            if method not in best or r["file_top1"] > best[method][0]:
                best[method] = (r["file_top1"], row)
        if not best:
            continue
        schemes = {m: json.loads((ROOT / row["run"] / "scheme.json").read_text()) for m, (_, row) in best.items()}
        methods = sorted(schemes)
        layers = [layer for layer in next(iter(schemes.values()))["layers"] if layer["bits"] is not None]
        bits = {m: {entry["name"]: entry["bits"] for entry in schemes[m]["layers"]} for m in methods}
        kinds: dict[str, list[dict]] = {}
        for layer in layers:
            kinds.setdefault(layer_group(model, layer), []).append(layer)
        lines += [
            "",
            f"## {model}{'' if budget is None else f' at {budget} stored bits'}: bits per layer, "
            "best run of each method",
            "",
            "Runs: " + "; ".join(f"{m}: {best[m][1]['name']} ({best[m][0]:.2f} %)" for m in methods) + ". "
            "Nominal bits (each method's own count; ALQ: binary bases per weight), averaged over each kind "
            "of layer weighted by parameters.",
            "",
            "| kind of layer (resnet20: stage) | layers | params | " + " | ".join(methods) + " |",
            "|---|---|---|" + "---|" * len(methods),
        ]
        for kind, group in kinds.items():
            params = sum(layer["params"] for layer in group)
            means = [sum(bits[m][layer["name"]] * layer["params"] for layer in group) / params for m in methods]
            lines.append(f"| {kind} | {len(group)} | {params:,} | " + " | ".join(f"{v:.2f}" for v in means) + " |")
        lines += [
            "",
            "| layer | kind | params | " + " | ".join(methods) + " |",
            "|---|---|---|" + "---|" * len(methods),
        ]
        for layer in layers:
            cells = [_bits_cell(bits[m][layer["name"]]) for m in methods]
            lines.append(f"| {layer['name']} | {layer_kind(layer)} | {layer['params']:,} | " + " | ".join(cells) + " |")
    return lines


def _bits_cell(value) -> str:
    return "FP" if value is None else f"{value:g}" if isinstance(value, int) else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-cifar10", help="folder for the run directories (reused)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--fp-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every resnet20 quantized row")
    parser.add_argument("--r20-batches", type=int, default=100, help="batches of 128 per resnet20 quantized epoch")
    parser.add_argument("--val-batches", type=int, default=20, help="validation batches checked during training")
    parser.add_argument("--mbv2-epochs", type=int, default=2)
    parser.add_argument("--mbv2-batches", type=int, default=100)
    parser.add_argument(
        "--mbv2-lr", type=float, default=0.002, help="lr of every MobileNetV2 row from the FP32 reference"
    )
    parser.add_argument(
        "--mbv2-probe-batches",
        type=int,
        default=2,
        help="batches the MobileNetV2 rows' loss-aware budget step measures per option (mpq's default 8 "
        "with every option, 53 layers x 9 x 8 forward passes, kept CSQ over 50 min here; now the step "
        "probes options within budget_span=2 bits of the learned ones, 53 x 5 x 2)",
    )
    parser.add_argument(
        "--r20-lr", type=float, default=0.01, help="lr of every resnet20 row started from the FP32 reference"
    )
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    parser.add_argument("--only", default=None, help="run only rows whose name contains this text")
    parser.add_argument(
        "--smoke", type=int, default=0, help="N > 0: N training batches per epoch (a check, not a result)"
    )
    parser.add_argument("--results", default="benchmarks/results/cifar10.md")
    parser.add_argument(
        "--no-run", action="store_true", help="only write the page: rows whose run has not finished stay pending"
    )
    args = parser.parse_args()
    rows = rows_for(args)
    results: dict[str, dict] = {}
    log: list[str] = []
    for row in rows:
        if args.only and args.only not in row["name"] and not row.get("fp"):
            continue
        if args.no_run and not (ROOT / row["run"] / "summary.json").is_file():
            continue
        results[row["name"]] = measure(row, log, args.data_dir, bool(args.smoke))
        write_results(args.results, page(rows, results, log, args))


if __name__ == "__main__":
    main()
