"""Charts of a scheme and of a run: bits per layer, and training curves (PNG, no display needed).

Matplotlib is imported here only, when a chart is drawn, and used through its object API
(``Figure``, no pyplot): nothing global changes and no display backend is needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# one colour per layer type, colour-blind safe (Okabe-Ito)
LAYER_COLOURS = {
    "conv": "#0072B2",
    "depthwise conv": "#E69F00",
    "pointwise conv": "#009E73",
    "linear": "#CC79A7",
    "FP32 (kept)": "#999999",
}


def layer_type(kind: str, shape: list[int], first: bool = False) -> str:
    """``conv``, ``depthwise conv``, ``pointwise conv`` (1x1) or ``linear``.

    Schemes and files record shapes, not groups, so a k x k conv with one input channel per
    filter is taken as depthwise unless it is the model's first layer (which reads the image:
    a grayscale stem has one input channel too).
    """
    if kind != "conv2d":
        return "linear"
    if len(shape) == 4 and shape[2] * shape[3] == 1:
        return "pointwise conv"
    if len(shape) == 4 and shape[1] == 1 and not first:
        return "depthwise conv"
    return "conv"


def _save(figure, path: Path) -> None:
    """Write the PNG next to its final name, then rename: a crash never leaves half an image."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def bits_chart(layers: list[dict], path: str | Path, title: str) -> Path:
    """Bars of each layer's nominal bits in model order, coloured by layer type, with its stored bits
    per weight as a tick and its parameter count (log scale) on a second axis.

    ``layers``: dicts with ``name``, ``kind``, ``shape``, ``params``, ``bits`` (``None`` for a layer kept
    in FP32), ``stored_bits`` and optionally ``first`` (the model's first layer; default: the first row).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(layers)
    figure = Figure(figsize=(max(7.0, 0.24 * n + 2.0), 4.6))
    ax = figure.add_subplot()
    quantized_bits = [float(e["bits"]) for e in layers if e.get("bits") is not None]
    top = max([*quantized_bits, *(float(e.get("stored_bits") or 0) for e in layers if e.get("bits") is not None), 1])
    fp_height = math.ceil(top) + 1  # FP32 layers drawn as a grey bar above every quantized one, labelled
    types, heights, colours = [], [], []
    for i, e in enumerate(layers):
        kept = e.get("bits") is None
        t = "FP32 (kept)" if kept else layer_type(e["kind"], e["shape"], first=e.get("first", i == 0))
        types.append(t)
        heights.append(fp_height if kept else float(e["bits"]))
        colours.append(LAYER_COLOURS[t])
    x = list(range(n))
    ax.bar(x, heights, color=colours, width=0.8, zorder=2)
    stored = [(i, float(e["stored_bits"])) for i, e in enumerate(layers) if e.get("bits") is not None]
    if stored:
        ax.scatter(
            [i for i, _ in stored],
            [s for _, s in stored],
            marker="_",
            s=120,
            color="black",
            zorder=3,
            label="stored bits/weight",
        )
    for i, e in enumerate(layers):
        if e.get("bits") is None:
            ax.text(i, fp_height, "FP32", rotation=90, ha="center", va="bottom", fontsize=6)
    ax.set_ylabel("bits per weight (bar: nominal)")
    ax.set_ylim(0, fp_height + 1.5)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xticks(x)
    ax.set_xticklabels([e["name"] for e in layers], rotation=90, fontsize=6 if n > 30 else 8)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    params_ax = ax.twinx()
    params_ax.plot(x, [max(int(e["params"]), 1) for e in layers], "o", color="#444444", markersize=3, alpha=0.7)
    params_ax.set_yscale("log")
    params_ax.set_ylabel("parameters (dots, log scale)")
    legend = [Patch(color=LAYER_COLOURS[t], label=t) for t in LAYER_COLOURS if t in types]
    handles, _ = ax.get_legend_handles_labels()
    # above the axes, where no bar or dot can hide under it
    ax.legend(handles=legend + handles, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=6, frameon=False)
    ax.set_title(title, fontsize=10, pad=22)
    _save(figure, path)
    return Path(path)


def training_chart(records: list[dict], path: str | Path, title: str) -> Path | None:
    """Top-1, loss and (for searches) average bits per epoch from ``metrics.jsonl`` records; ``None``
    (nothing written) when there is no epoch to draw."""
    epochs = [r for r in records if "epoch" in r and r.get("stage") != "final"]
    if not epochs:
        return None
    from matplotlib.figure import Figure

    has_bits = any("avg_bits" in r for r in epochs)
    figure = Figure(figsize=(11.0 if has_bits else 7.5, 3.4))
    axes = figure.subplots(1, 3 if has_bits else 2)
    x = list(range(1, len(epochs) + 1))
    stages = [r.get("stage", "train") for r in epochs]
    checked = "hold-out" if epochs[-1].get("val_set") == "holdout" else "validation"  # --val-split's, or the test split
    axes[0].plot(x, [r.get("val_top1") for r in epochs], "o-", label=checked)
    axes[0].plot(x, [r.get("train_acc") for r in epochs], "s--", label="training", alpha=0.7)
    axes[0].set_ylabel("top-1 %")
    axes[1].plot(x, [r.get("val_loss") for r in epochs], "o-", label=checked)
    axes[1].plot(x, [r.get("train_loss") for r in epochs], "s--", label="training", alpha=0.7)
    axes[1].set_ylabel("loss")
    if has_bits:
        axes[2].plot(x, [r.get("avg_bits") for r in epochs], "o-", color="#D55E00")
        axes[2].set_ylabel("average bits (nominal)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.set_xticks(x if len(x) <= 20 else x[:: max(len(x) // 10, 1)])
        for i in range(1, len(stages)):  # a stage change (search -> finetune) as a vertical line
            if stages[i] != stages[i - 1]:
                ax.axvline(i + 0.5, color="grey", linestyle=":")
    axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    _save(figure, path)
    return Path(path)


def sweep_chart(result: dict, path: str | Path) -> Path:
    """Top-1 (from each exported file) against average stored bits, one line per method, the FP32
    reference dashed and the Pareto-front points ringed. A sweep over seeds draws each (method, target)
    cell's mean with error bars of one std over its seeds (top-1 and stored bits), every run a faint dot."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.6))
    ax = figure.add_subplot()
    rows = [r for r in result["rows"] if r.get("top1") is not None]
    seeded = result.get("seeds") is not None
    for method in dict.fromkeys(r["method"] for r in rows):
        if not seeded:
            points = sorted((r["avg_stored_bits"], r["top1"]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method)
            continue
        cells = sorted(
            (c for c in result["cells"] if c["method"] == method and c["n"]), key=lambda c: c["stored_bits_mean"]
        )
        bars = ax.errorbar(
            [c["stored_bits_mean"] for c in cells],
            [c["top1_mean"] for c in cells],
            xerr=[c["stored_bits_std"] or 0.0 for c in cells],  # one run: no spread to draw
            yerr=[c["top1_std"] or 0.0 for c in cells],
            fmt="o-",
            capsize=3,
            label=f"{method} (mean ± std over seeds)",
        )
        mine = [r for r in rows if r["method"] == method]
        ax.plot(
            [r["avg_stored_bits"] for r in mine],
            [r["top1"] for r in mine],
            ".",
            color=bars.lines[0].get_color(),
            alpha=0.35,
        )
    front = [r for r in rows if r.get("pareto")]
    if front:
        ax.scatter(
            [r["avg_stored_bits"] for r in front],
            [r["top1"] for r in front],
            s=160,
            facecolors="none",
            edgecolors="black",
            label="Pareto front (file bytes, top-1)",
        )
    if result.get("fp32_top1") is not None:
        ax.axhline(result["fp32_top1"], color="grey", linestyle="--", label="FP32 reference")
    ax.set_xlabel("average stored bits per weight (file)")
    from .report import measured_on

    partial = next((measured_on(r) for r in rows if measured_on(r)), "")
    ax.set_ylabel(f"top-1 % (exported file{partial})" if partial else "top-1 % (exported file)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result.get('model')} on {result.get('data')}: accuracy against size", fontsize=10)
    _save(figure, path)
    return Path(path)
