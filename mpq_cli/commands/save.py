"""Writing a finished quantized run: its scheme (bits measured from the exact codes), state, codes, summary with
the packed file's sizes, report.md and charts."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..export import pack_run, size_report
from ..layers import (
    QuantizedLayer,
    quantizable_layers,
)
from ..methods import FinalizeResult, Method
from ..models import unique_state_dict
from ..packing.format import serialized_size
from ..report import markdown_report
from ..rundir import (
    dumps,
    read_jsonl,
    save_safetensors,
    write_json,
    write_text_atomic,
)
from ..scheme import LayerEntry, Scheme


def build_scheme(method: Method, model: nn.Module, codes: dict | None = None) -> Scheme:
    """The bit table of a prepared model, with stored bits measured from the exact codes."""
    entries = []
    codes = codes if codes is not None else method.layer_codes()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            kind = "conv2d" if isinstance(module.layer, nn.Conv2d) else "linear"
            act_bits = getattr(module.act_quantizer, "bits", None)
            sizes = codes[name].form.scheme_sizes(codes[name], module.params)
            stored, scales, index = sizes.stored_bits, sizes.scales, sizes.index_bytes
            entries.append(
                LayerEntry(
                    name,
                    kind,
                    list(module.weight_shape),
                    module.params,
                    codes[name].nominal_bits,
                    stored,
                    scales,
                    act_bits,
                    index,
                )
            )
    for name, module in quantizable_layers(model).items():
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        entries.append(LayerEntry(name, kind, list(module.weight.shape), module.weight.numel(), None, None, 0))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    entries.sort(key=lambda e: order[e.name])
    fp_weight_keys = {f"{e.name}.weight" for e in entries if e.is_fp}
    quantizer_prefixes = tuple(f"{n}.weight_quantizer." for n in method.layers)
    other = sum(
        t.numel()
        for k, t in unique_state_dict(model).items()
        if t.is_floating_point() and k not in fp_weight_keys and not k.startswith(quantizer_prefixes)
    )
    return Scheme(method=method.name, layers=entries, other_params=other)


def save_quantized_run(
    run_dir: Path,
    method: Method,
    model: nn.Module,
    summary_base: dict,
    final: dict,
    result: FinalizeResult,
    records: list[dict],
    codes: dict,
) -> dict:
    scheme = build_scheme(method, model, codes)
    save_safetensors(run_dir / "model.safetensors", unique_state_dict(model), {"mpq.run": "state"})
    write_json(run_dir / "method.json", method.state_dict())
    tensors, forms = {}, {}
    for name, lc in codes.items():
        act = method.layers[name].act_quantizer
        forms[name] = {"weight": lc.form.name, "act": getattr(act, "kind", None)}
        tensors.update(lc.form.run_tensors(name, lc))
    # each layer's form is recorded, so that export reads it rather than guessing it from tensor names
    save_safetensors(run_dir / "codes.safetensors", tensors, {"mpq.codes": "1", "mpq.forms": dumps(forms)})
    scheme.save(run_dir / "scheme.json")
    summary = {
        **summary_base,
        "top1": final["top1"],
        "top5": final.get("top5"),
        "samples": final.get("samples"),
        "split_samples": final.get("split_samples"),
        "loss": final["loss"],
        **scheme.summary(),
        **result.summary(),
        "out": str(run_dir),
    }
    summary["bits_under_budget"] = bits_under_budget(summary)
    if summary_base.get("command") == "search":  # a fine-tuning's scheme was fixed before it started
        steps = [r["step_seconds"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("step_seconds")]
        summary["search_health"] = search_health(method, result, statistics.median(steps) if steps else None)
    write_json(run_dir / "summary.json", {**summary, "budget_changes": result.budget_changes})
    sizes = file_sizes(run_dir)  # the file this run exports, measured as `mpq inspect` measures it
    layer_stored = sizes.pop("layer_stored_bits")
    summary.update(sizes)
    for estimate in ("model_bytes_estimated", "model_compression_estimated"):
        summary.pop(estimate, None)
    write_json(run_dir / "summary.json", {**summary, "budget_changes": result.budget_changes})
    notes = [health_note(summary["search_health"])] if summary.get("search_health") else []
    changes = result.budget_changes
    if changes:
        lines = [
            f"- `{c['layer']}`: "
            + (
                f"{c['bits_before']} -> {c['bits_after']} bits"
                if c["bits_before"] != c["bits_after"]
                else f"re-rounded from its relaxed weight at {c['bits_after']} bits"
            )
            + f" (probe loss change alone {c['probe_loss_change_alone']:+.4f}"
            + (", estimated by the screen)" if c.get("measured_alone") is False else ")")
            + (" — its search had dropped every bit; lifted off 0 first" if c.get("lifted_from_zero") else "")
            for c in changes
        ]
        notes.append(
            "## Budget step\n\nThe search ended at "
            f"{result.avg_bits_before_budget_step:.4f} average bits; the loss-aware budget "
            "step changed:\n\n" + "\n".join(lines) + f"\n\nProbe loss: {changes[0]['probe_loss_before']:.4f}"
            f" -> {changes[0]['probe_loss_after']:.4f}."
            + (
                " The layers interacted (the first choice measured worse than its parts predicted): every option was "
                + ("estimated" if "measured_alone" in changes[0] else "measured")
                + " again from it, and the second choice measured better."
                if changes[0].get("passes") == 2
                else ""
            )
        )
    notes += method.report_notes()
    if records:
        notes.append(f"Trained {len(records)} epoch(s); per-epoch numbers are in metrics.jsonl.")
    charts = _charts(run_dir, scheme, summary)
    write_text_atomic(run_dir / "report.md", markdown_report(summary, scheme, notes, charts, layer_stored))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(
            dumps(
                {
                    "stage": "final",
                    "top1": final["top1"],
                    **({"val_top1": summary["val_top1"]} if summary.get("val_top1") is not None else {}),
                    "avg_bits": scheme.avg_bits,
                    "avg_stored_bits": summary["avg_stored_bits"],
                }
            )
            + "\n"
        )
    return summary


def file_sizes(run_dir: Path) -> dict:
    """The sizes of the packed file ``mpq export`` writes from a finished run, measured on it serialised in
    memory with the exporter's own code and ``size_report`` (the function `mpq inspect` uses), so a run's
    report and its file give the same numbers: ``avg_stored_bits`` (sign, scales, tables and padding
    included), ``weight_bytes``, ``file_bytes``, ``fp32_bytes``, ``compression`` (FP32 bytes / file bytes)."""
    packed = pack_run(run_dir)
    file_bytes = serialized_size(packed.header, packed.tensors)
    report = size_report(packed.header, {n: t.nbytes for n, t in packed.tensors.items()}, file_bytes)
    keys = ("avg_stored_bits", "weight_bytes", "file_bytes", "fp32_bytes", "compression")
    return {
        **{k: report[k] for k in keys},
        "layer_stored_bits": {r["name"]: r["stored_bits"] for r in report["layers"]},
    }


def _charts(run_dir: Path, scheme: Scheme, summary: dict) -> list[tuple[str, str]]:
    """Draw bits.png and training.png into the run directory; their captions and names for report.md."""
    from ..plots import bits_chart, training_chart

    title = f"{summary['method']} on {summary['model']}: {scheme.avg_bits:.3f} nominal bits, "
    title += f"{summary['avg_stored_bits']:.3f} stored bits per weight (average, file)"
    layers = [{**asdict(e), "bits": None if e.is_fp else e.bits} for e in scheme.layers]
    charts = [("bits per layer", bits_chart(layers, run_dir / "bits.png", title).name)]
    records = read_jsonl(run_dir / "metrics.jsonl")
    drawn = training_chart(records, run_dir / "training.png", f"{summary['method']} on {summary['model']}")
    if drawn is not None:
        charts.append(("training: top-1, loss and average bits per epoch", drawn.name))
    return charts


def bits_under_budget(summary: dict) -> float | None:
    """How far under its ceiling (``target_bits``, in the method's own count, or in stored bits with
    ``budget_on`` stored) a run's scheme ended; negative when over it, None for a run without a budget."""
    target, avg = summary.get("target_bits"), summary.get("avg_counted_bits", summary.get("avg_bits"))
    if target is None or avg is None or summary.get("budget_met") is None:
        return None
    return round(float(target) - float(avg), 6)


# a healthy search arrives within this many bits of its target on its own, and its budget step only trims
HEALTHY_DISTANCE = 0.15
HEALTHY_LAYERS = 0.1  # the share of layers (at least 2) the budget step may change in a healthy search


def search_health(method: Method, result: FinalizeResult, step_seconds: float | None = None) -> dict | None:
    """How much of a search's scheme its own mechanism chose (issue 31): where it arrived before the budget
    step against the average it aimed for, the share of layers and of weights the step then changed, and the
    exact model's probe top-1 and loss (the --val-split hold-out's first batches, else fixed training batches)
    just before and after the step, and what the step cost: its seconds and that time in training steps of the
    same run (``step_seconds``, the search epochs' median step). ``None`` for a method without a budget step."""
    before = result.avg_bits_before_budget_step
    if before is None:
        return None
    aim = method.search_target()
    params = {name: layer.params for name, layer in method.layers.items()}
    moved = [c for c in result.budget_changes if c["bits_before"] != c["bits_after"]]
    first = result.budget_changes[0] if result.budget_changes else {}
    distance = None if aim is None else before - aim
    allowed = max(2, int(HEALTHY_LAYERS * len(params)))
    return {
        "bits_before_budget_step": before,
        "aimed_bits": aim,  # target_bits, or one bit less under --budget-on stored (the nominal aim)
        "distance_to_aim": distance,
        "layers_changed": len(moved),
        "layers": len(params),
        "share_of_layers_changed": len(moved) / max(len(params), 1),
        "share_of_weights_changed": sum(params.get(c["layer"], 0) for c in moved) / max(sum(params.values()), 1),
        "probe_top1_before": first.get("probe_top1_before"),
        "probe_top1_after": first.get("probe_top1_after"),
        "probe_loss_before": first.get("probe_loss_before"),
        "probe_loss_after": first.get("probe_loss_after"),
        "budget_step_seconds": getattr(method, "budget_step_seconds", None),
        "training_step_seconds": step_seconds,
        "budget_step_in_training_steps": (
            round(method.budget_step_seconds / step_seconds, 1)
            if step_seconds and getattr(method, "budget_step_seconds", None) is not None
            else None
        ),
        "healthy": distance is not None and abs(distance) <= HEALTHY_DISTANCE and len(moved) <= allowed,
    }


def health_note(health: dict) -> str:
    """report.md's section on the search's health."""
    lines = [
        "## Search health",
        "",
        f"Before the budget step the scheme was at {health['bits_before_budget_step']:.4f} average bits"
        + (
            f", {health['distance_to_aim']:+.4f} from the {health['aimed_bits']:g} it aimed for"
            if health["aimed_bits"] is not None
            else ""
        )
        + f"; the step changed {health['layers_changed']} of {health['layers']} layers "
        f"({100 * health['share_of_layers_changed']:.0f} % of layers, "
        f"{100 * health['share_of_weights_changed']:.1f} % of the weights).",
    ]
    if health["probe_top1_before"] is not None:
        lines[-1] += (
            f" The exact model's top-1 on the probe batches went {health['probe_top1_before']:.2f} % -> "
            f"{health['probe_top1_after']:.2f} % across the step."
        )
    if health.get("budget_step_seconds") is not None:
        lines[-1] += f" The step took {health['budget_step_seconds']:.1f} s"
        if health.get("budget_step_in_training_steps") is not None:
            lines[-1] += (
                f", the time of {health['budget_step_in_training_steps']:g} training steps "
                f"(median step {1000 * health['training_step_seconds']:.1f} ms)"
            )
        lines[-1] += "."
    verdict = (
        "healthy: the method chose its scheme and the budget step only trimmed it"
        if health["healthy"]
        else f"not healthy: a healthy search arrives within {HEALTHY_DISTANCE} bits of its aim on its own and "
        f"its budget step changes at most {max(2, int(HEALTHY_LAYERS * health['layers']))} layers"
    )
    return "\n".join([*lines, "", f"Verdict: {verdict}."])
