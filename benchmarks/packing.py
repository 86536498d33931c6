"""Pack/unpack throughput and the export time of a resnet50-sized model.

Run from the repository root after `bash scripts/setup.sh`:

    .venv/bin/python benchmarks/packing.py          # writes benchmarks/results/packing.md

1. ``pack_bits`` / ``unpack_bits`` on 25.5 M random fields (resnet50's weight count) at
   several widths: million weights per second and MB of packed data per second (best of
   ``--repeat``).
2. A resnet50 run (uniform baseline at 4 bits from the initial weights, no training
   step: the weights' count is what matters; one SGD step at batch 2 on 3x32x32 data
   diverges, which mpq now refuses) is exported with ``mpq_cli.export``; the time of
   the export call alone and of the whole ``mpq export`` command (Python start-up included).
3. ``load_packed`` of that file: best of ``--repeat``, the share the SHA-256 checks take
   (the same loads with the checks switched off, in the same process), and a whole new
   Python process that loads it.
4. The floor under the new-process figures: a new process that only imports torch (all that
   ``mpq export`` needs) and one that only imports torchvision (which a torchvision model's
   ``load_packed`` needs to build the architecture).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq_cli.packing.bitpack import pack_bits, unpack_bits  # noqa: E402

RESNET50_WEIGHTS = 25_503_912  # Conv2d + Linear weights of torchvision resnet50


def best_time(fn, repeat: int, *args) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def throughput(widths: list[int], count: int, repeat: int) -> list[str]:
    rng = np.random.default_rng(0)
    rows = [
        "| width (bits) | pack: M weights/s | pack: MB packed/s | unpack: M weights/s | unpack: MB packed/s |",
        "|---|---|---|---|---|",
    ]
    for width in widths:
        fields = rng.integers(0, 1 << width, size=count, dtype=np.int64)
        packed = pack_bits(fields, width)
        assert np.array_equal(unpack_bits(packed, width, count), fields)
        t_pack = best_time(pack_bits, repeat, fields, width)
        t_unpack = best_time(unpack_bits, repeat, packed, width, count)
        mb = packed.nbytes / 1e6
        rows.append(
            f"| {width} | {count / t_pack / 1e6:.0f} | {mb / t_pack:.0f} | {count / t_unpack / 1e6:.0f} | "
            f"{mb / t_unpack:.0f} |"
        )
    return rows


def export_time(work: Path, repeat: int) -> tuple[list[str], list[str]]:
    import mpq_cli

    run = work / "resnet50-uniform4"
    command = [
        "search",
        "--method",
        "uniform",
        "--target-bits",
        "4",
        "--model",
        "resnet50",
        "--data",
        "synthetic",
        "--input-size",
        "3,32,32",
        "--epochs",
        "0",
        "--limit-val-batches",
        "1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--out",
        str(run),
        "--quiet",
        "--json",
    ]
    subprocess.run([sys.executable, "-m", "mpq_cli", *command], cwd=ROOT, check=True, capture_output=True)
    out = work / "resnet50.safetensors"
    t_api = best_time(mpq_cli.export, repeat, run, out)
    report = json.loads(out.with_name("resnet50.report.json").read_text())
    t_cli = process_time([sys.executable, "-m", "mpq_cli", "export", str(run), "-o", str(out), "--quiet"], repeat)
    commands = [c.replace(f"{ROOT}/", "") for c in ("mpq " + " ".join(command[:-2]), f"mpq export {run} -o {out}")]
    t_load, t_load_unverified = load_time(out, 3 * repeat)
    t_load_cli = process_time([sys.executable, "-c", f"import mpq_cli; mpq_cli.load_packed({str(out)!r})"], repeat)
    # the floor under both: a new process that only imports torch (export), or torchvision too (a torchvision
    # model's load_packed builds the architecture; torchvision's import pulls torch._dynamo via torchvision.ops)
    t_torch = process_time([sys.executable, "-c", "import torch"], repeat)
    t_torchvision = process_time([sys.executable, "-c", "import torchvision"], repeat)
    rows = [
        "| quantity | value |",
        "|---|---|",
        f"| quantized weights | {report['quantized_params']:,} |",
        f"| average nominal / stored bits | {report['avg_bits']:.3f} / {report['avg_stored_bits']:.3f} |",
        f"| file bytes | {report['file_bytes']:,} |",
        f"| FP32 equivalent bytes | {report['fp32_bytes']:,} ({report['compression']:.2f}x) |",
        f"| `mpq_cli.export` call, best of {repeat} (s) | {t_api:.2f} |",
        f"| `mpq export` command, Python start-up included, best of {repeat} (s) | {t_cli:.2f} |",
        f"| `load_packed` call, best of {3 * repeat} (s) | {t_load:.2f} |",
        f"| of which SHA-256 checks of the header and every tensor (s) | {t_load - t_load_unverified:.2f} "
        f"({100 * (t_load - t_load_unverified) / t_load:.1f} % of the load) |",
        f"| `load_packed` in a new Python process, start-up included, best of {repeat} (s) | {t_load_cli:.2f} |",
        f"| a new Python process that only runs `import torch`, best of {repeat} (s) | {t_torch:.2f} |",
        f"| a new Python process that only runs `import torchvision`, best of {repeat} (s) | {t_torchvision:.2f} |",
    ]
    return commands, rows


def process_time(command: list[str], repeat: int) -> float:
    """Wall seconds of a whole new process (interpreter start-up and imports included), best of ``repeat``."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


def load_time(path: Path, repeat: int) -> tuple[float, float]:
    """``load_packed`` time with the digest checks, and with them switched off: best of ``repeat`` each,
    the two interleaved in one process so that the machine's noise falls on both alike."""
    import mpq_cli
    from mpq_cli.packing import format as fmt

    checks = fmt.PackedFile._check_header_digest, fmt.PackedFile._verify_all
    verified, unverified = [], []
    for _ in range(repeat):
        verified.append(best_time(mpq_cli.load_packed, 1, path))
        fmt.PackedFile._check_header_digest = lambda self, metadata: None
        fmt.PackedFile._verify_all = lambda self, tensors: None
        try:
            unverified.append(best_time(mpq_cli.load_packed, 1, path))
        finally:
            fmt.PackedFile._check_header_digest, fmt.PackedFile._verify_all = checks
    return min(verified), min(unverified)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=RESNET50_WEIGHTS)
    parser.add_argument("--widths", default=",".join(str(w) for w in range(1, 18)))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", default="runs/bench-packing")
    parser.add_argument("--results", default="benchmarks/results/packing.md")
    args = parser.parse_args()
    work = ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    widths = [int(w) for w in args.widths.split(",")]
    lines = [
        "# Packing throughput and export time",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"command: `.venv/bin/python benchmarks/packing.py`.",
        "",
        f"## pack_bits / unpack_bits, {args.count:,} random fields, best of {args.repeat}",
        "",
    ]
    lines += throughput(widths, args.count, args.repeat)
    commands, rows = export_time(work, args.repeat)
    lines += ["", "## Export of a resnet50 run", "", "```", *commands, "```", "", *rows]
    text = "\n".join(lines) + "\n"
    Path(ROOT / args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(ROOT / args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
