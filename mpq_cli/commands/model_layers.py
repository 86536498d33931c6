"""``mpq models --layers``: which weights of a model are quantized and which stay FP32."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import (
    NORMALIZATION,
    QUANTIZABLE,
    READ_BY_PARENT_REASON,
    quantizable_layers,
    unquantized_modules,
)
from ..models import ModelSpec, build_model
from .context import default_input

STAYS_FP = "not Conv2d/Linear: stays FP"


def model_layers(name: str, num_classes: int = 10, input_size: tuple[int, int, int] | None = None) -> dict:
    """Which weights of a model are quantized and which stay FP32.

    Built-in and torchvision models are built on the meta device: no memory, no weights.

    Returns:
        ``layers``: the Conv2d/Linear layers (the names ``--keep-fp`` and ``--fix-bits`` match), in
        module order, each with ``name``, ``kind``, ``shape`` and ``params`` (its weight);
        ``fp_layers``: the other modules that own parameters (a Conv1d, an Embedding, a module with its
        own ``nn.Parameter``), each with ``name``, ``kind`` (its class), ``shape`` (its weight's, or its
        first parameter's), ``tensors`` (its parameters' names), ``params`` and ``reason``;
        ``normalisation``: BatchNorm/LayerNorm/GroupNorm-like layers, each with ``name``, ``kind``,
        ``params`` (they stay FP32 by design);
        ``params``: totals: ``quantizable``, ``not_quantizable`` and its parts ``fp_layers``,
        ``normalisation`` and ``biases`` (of the Conv2d/Linear layers).
    """
    c, h, w = input_size or default_input(name)
    spec = ModelSpec(name, None, num_classes, c, (h, w))
    if spec.kind == "user":
        model = build_model(spec)
    else:
        with torch.device("meta"):
            model = build_model(spec)
    quantizable = quantizable_layers(model)
    layers = [
        {
            "name": n,
            "kind": "conv2d" if isinstance(m, nn.Conv2d) else "linear",
            "shape": list(m.weight.shape),
            "params": m.weight.numel(),
        }
        for n, m in quantizable.items()
    ]
    fp_layers, norms = [], []
    for n, m in unquantized_modules(model).items():
        own = dict(m.named_parameters(recurse=False))
        count = sum(p.numel() for p in own.values())
        if isinstance(m, NORMALIZATION):
            norms.append({"name": n, "kind": type(m).__name__, "params": count})
            continue
        shape = list(own.get("weight", next(iter(own.values()))).shape)
        row = {"name": n, "kind": type(m).__name__, "shape": shape, "tensors": list(own), "params": count}
        fp_layers.append({**row, "reason": READ_BY_PARENT_REASON if isinstance(m, QUANTIZABLE) else STAYS_FP})
    biases = sum(p.numel() for m in quantizable.values() for k, p in m.named_parameters(recurse=False) if k != "weight")
    fp, norm = sum(r["params"] for r in fp_layers), sum(r["params"] for r in norms)
    params = {
        "quantizable": sum(r["params"] for r in layers),
        "not_quantizable": fp + norm + biases,
        "fp_layers": fp,
        "normalisation": norm,
        "biases": biases,
    }
    return {"model": name, "layers": layers, "fp_layers": fp_layers, "normalisation": norms, "params": params}


# The data settings a packed file's eval record may set (the data folder is the reader's own; the run's
# --limit-val-batches bounded its in-training checks: mpq eval measures the whole split unless asked).
