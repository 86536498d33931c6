"""The GPU check: step overhead on CUDA, a search + export + eval per method, and CUDA against CPU.

Run with `bash scripts/gpu-check.sh` on a machine with a GPU (under 8 minutes on one); on a CPU,
`bash scripts/gpu-check.sh --device cpu --size 32 --search-size 32` runs the same checks smaller
(tests/test_gpu_check.py does). Everything goes to one results file (default
`benchmarks/results/gpu-check.md`) and a JSON twin; the exit status is non-zero when a check
fails (a command's error, a file whose top-1 differs from its run's, different schemes).

1. `benchmarks/step_overhead.py` on resnet18 (`--overhead-model`, `--size` px, `--batch`), with and without `--amp`.
2. For every method: `mpq search` on resnet18 (`--search-model`) with synthetic data (`--search-size` px, a few
   batches), `mpq export`, `mpq eval FILE`; the file's top-1 must equal the run's. The integer-code methods
   (uniform, CSQ, BSQ, BMPQ) run again with `--granularity channel` (one step per output channel).
3. The same lenet5 search (seed 0) on `--device` and on the CPU, per method: the schemes are
   compared layer by layer. TF32 convolutions and other kernels differ between devices, so
   equality is not guaranteed; the check passes when every layer's bits agree or the
   average bits differ by at most `--scheme-tolerance` (0.25) and the difference is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("uniform", "csq", "bsq", "bmpq", "alq")
TARGET = {"uniform": 3, "csq": 3, "bsq": 3, "bmpq": 4, "alq": 2}
PER_CHANNEL = ("uniform", "csq", "bsq", "bmpq")  # the methods whose steps can be per output channel


def mpq(args: list[str], timeout: int = 600) -> tuple[dict | None, str, float]:
    """Run ``mpq ARGS --json --quiet``: ``(summary or None, last stderr line, seconds)``."""
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "mpq_cli", *args, "--json", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = round(time.time() - started, 1)
    if out.returncode != 0:
        return None, (out.stderr.strip().splitlines() or ["?"])[-1], seconds
    return json.loads(out.stdout.strip().splitlines()[-1]), "", seconds


def overhead(args, amp: bool) -> tuple[list[dict], str]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        command = [
            sys.executable,
            str(ROOT / "benchmarks" / "step_overhead.py"),
            "--models",
            args.overhead_model,
            "--methods",
            ",".join(args.methods),
            "--size",
            str(args.size),
            "--batch",
            str(args.batch),
            "--device",
            args.device,
            "--steps",
            str(args.steps),
            "--rounds",
            str(args.rounds),
            "--results",
            "",
            "--json",
            f.name,
            *(["--amp"] if amp else []),
        ]
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            return [], (out.stderr.strip().splitlines() or ["?"])[-1]
        return json.loads(Path(f.name).read_text()), ""


def searches(args, work: Path) -> list[dict]:
    rows = []
    channels = 1 if args.search_model == "lenet5" else 3
    size = f"{channels},{args.search_size},{args.search_size}"
    data = ["--data", "synthetic", "--input-size", size, "--batch-size", "32"]
    variants = [(m, "tensor") for m in args.methods] + [(m, "channel") for m in args.methods if m in PER_CHANNEL]
    for method, granularity in variants:
        label = method if granularity == "tensor" else f"{method} (per channel)"
        run = work / f"{args.search_model}-{method}-{granularity}"
        common = ["--model", args.search_model, *data, "--epochs", "1", "--limit-train-batches", "4"]
        common += ["--limit-val-batches", "2", "--device", args.device, "--seed", "0"]
        if granularity == "channel":
            common += ["--granularity", "channel"]
        row = {"method": label}
        summary, error, seconds = mpq(
            ["search", "--method", method, "--target-bits", str(TARGET[method]), *common, "--out", str(run)]
        )
        row["search_s"] = seconds
        if summary is None:
            rows.append({**row, "error": f"search: {error}"})
            continue
        packed = run.with_name(run.name + ".safetensors")
        report, error, seconds = mpq(["export", str(run), "-o", str(packed)])
        row["export_s"] = seconds
        if report is None:
            rows.append({**row, "error": f"export: {error}"})
            continue
        evaluated, error, seconds = mpq(["eval", str(packed), "--device", args.device, "--limit-val-batches", "2"])
        row["eval_s"] = seconds
        if evaluated is None:
            rows.append({**row, "error": f"eval: {error}"})
            continue
        row.update(
            run_top1=summary["top1"],
            file_top1=evaluated["top1"],
            avg_bits=summary["avg_bits"],
            stored_bits=report["avg_stored_bits"],
            file_bytes=report["file_bytes"],
            ok=abs(summary["top1"] - evaluated["top1"]) < 1e-9,
        )
        if not row["ok"]:
            row["error"] = f"the file's top-1 {evaluated['top1']} differs from the run's {summary['top1']}"
        rows.append(row)
    return rows


def scheme_bits(run: Path) -> dict[str, float]:
    scheme = json.loads((run / "scheme.json").read_text())
    return {layer["name"]: layer["bits"] for layer in scheme["layers"]}


def same_scheme(args, work: Path) -> list[dict]:
    rows = []
    common = ["--model", "lenet5", "--data", "synthetic", "--input-size", "1,28,28", "--batch-size", "32"]
    common += ["--epochs", "2", "--limit-train-batches", "8", "--limit-val-batches", "2", "--seed", "0"]
    for method in args.methods:
        bits = {}
        row = {"method": method}
        for i, device in enumerate((args.device, "cpu")):
            run = work / f"lenet5-{method}-{i}-{device}"
            summary, error, _ = mpq(
                ["search", "--method", method, "--target-bits", str(TARGET[method]), *common, "--device", device]
                + ["--out", str(run)]
            )
            if summary is None:
                row["error"] = f"{device}: {error}"
                break
            bits[device] = (scheme_bits(run), summary["avg_bits"])
        if "error" not in row:
            (a, avg_a), (b, avg_b) = bits[args.device], bits["cpu"]
            differing = sorted(n for n in a if a[n] != b.get(n))
            row.update(
                layers=len(a),
                differing_layers=differing,
                avg_bits_device=avg_a,
                avg_bits_cpu=avg_b,
                ok=not differing or abs(avg_a - avg_b) <= args.scheme_tolerance,
            )
            if not row["ok"]:
                row["error"] = f"schemes differ in {len(differing)} layers, average bits {avg_a:.3f} vs {avg_b:.3f}"
        rows.append(row)
    return rows


def page(args, results: dict) -> str:
    lines = [
        "# GPU check",
        "",
        f"Command: `bash scripts/gpu-check.sh {' '.join(sys.argv[1:])}`. Device: {results['device_name']}. "
        f"torch {results['torch']}, {platform.machine()}. Total {results['seconds']:.0f} s.",
        "",
        f"## 1. Step overhead, {args.overhead_model} at {args.size} px, batch {args.batch}",
        "",
        "| method | amp | FP32 step ms | method step ms | time ratio | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for amp in (False, True):
        part = results["overhead_amp" if amp else "overhead"]
        if part.get("error"):
            lines.append(f"| (failed) | {amp} | {part['error']} | | | |")
        for r in part.get("rows", []):
            mem = "" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
            ms = f"{r['fp32_step_ms']:.1f} | {r['step_ms']:.1f}"
            lines.append(f"| {r['method']} | {amp} | {ms} | {r['time_ratio']:.2f} | {mem} |")
    lines += [
        "",
        f"## 2. Search, export, eval: {args.search_model}, synthetic data at {args.search_size} px",
        "",
        "| method | search s | export s | eval s | avg bits | stored bits | file bytes | run top-1 | file top-1 | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["searches"]:
        if "run_top1" not in r:
            lines.append(f"| {r['method']} | {r.get('search_s', '')} | | | | | | | | **{r['error']}** |")
            continue
        lines.append(
            f"| {r['method']} | {r['search_s']} | {r['export_s']} | {r['eval_s']} | {r['avg_bits']:.3f} | "
            f"{r['stored_bits']:.3f} | {r['file_bytes']:,} | {r['run_top1']:.2f} | {r['file_top1']:.2f} | "
            f"{'yes' if r['ok'] else '**no**'} |"
        )
    lines += [
        "",
        f"## 3. The same lenet5 search on {args.device} and on the CPU (seed 0)",
        "",
        "| method | layers | differing layers | avg bits (device) | avg bits (CPU) | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["same_scheme"]:
        if "layers" not in r:
            lines.append(f"| {r['method']} | | | | | **{r['error']}** |")
            continue
        lines.append(
            f"| {r['method']} | {r['layers']} | {', '.join(r['differing_layers']) or 'none'} | "
            f"{r['avg_bits_device']:.4f} | {r['avg_bits_cpu']:.4f} | {'yes' if r['ok'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=224, help="resnet18 input size of the overhead benchmark")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--search-size", type=int, default=64, help="input size of the resnet18 searches")
    parser.add_argument("--overhead-model", default="resnet18", help="model of the step overhead benchmark")
    parser.add_argument("--search-model", default="resnet18", help="model of the search + export + eval checks")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all five)")
    parser.add_argument("--scheme-tolerance", type=float, default=0.25)
    parser.add_argument("--out", default="benchmarks/results/gpu-check.md")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; pass --device cpu (and smaller --size) to run the checks on the CPU")
        return 2
    started = time.time()
    results: dict = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU",
        "torch": torch.__version__,
    }
    for key, amp in (("overhead", False), ("overhead_amp", True)):
        rows, error = overhead(args, amp)
        results[key] = {"rows": rows, "error": error}
    with tempfile.TemporaryDirectory(prefix="mpq-gpu-check-") as work:
        results["searches"] = searches(args, Path(work))
        results["same_scheme"] = same_scheme(args, Path(work))
    results["seconds"] = time.time() - started
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(args, results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    failed = [r for part in ("searches", "same_scheme") for r in results[part] if r.get("error")]
    failed += [results[k] for k in ("overhead", "overhead_amp") if results[k]["error"]]
    print(out.read_text())
    if failed:
        print(f"error: {len(failed)} check(s) failed; see {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
