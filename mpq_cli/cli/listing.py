"""``mpq methods`` and ``mpq models``."""

from __future__ import annotations

from typing import Annotated

import typer

from .entry import app
from .options import InputSizeOpt, JsonOpt, parse_input_size
from .output import handle_errors, out_console, print_json


@app.command()
@handle_errors
def methods(as_json: JsonOpt = False):
    """List the search methods and their configuration fields (set with --FIELD-NAME VALUE or --set FIELD=VALUE)."""
    from .. import api

    listing = api.method_listing()
    if as_json:
        print_json(listing)
        return
    for name, entry in listing.items():
        out_console.print(f"[bold]{name}[/bold]: {entry['summary']}")
        for field_name, field_info in entry["fields"].items():
            out_console.print(
                f"  --{field_name.replace('_', '-')} (default {field_info['default']}): {field_info['help']}",
                highlight=False,
                markup=False,
            )
        for label, key in (("paper", "training_defaults"), ("checkpoint", "checkpoint_defaults")):
            out_console.print(
                f"  training, --recipe {label}: " + ", ".join(f"{k}={v}" for k, v in entry[key].items()),
                highlight=False,
            )
        if entry["checkpoint_fields"]:
            fields = ", ".join(f"{k}={v}" for k, v in entry["checkpoint_fields"].items())
            out_console.print(f"  fields, --recipe checkpoint (unless given): {fields}", highlight=False)


def print_model_layers(model: str, found: dict) -> None:
    from rich.table import Table

    from .. import api

    def shape(row):
        return "x".join(map(str, row["shape"]))

    rows = found["layers"]
    table = Table("layer", "kind", "shape", "params", title=f"{model}: {len(rows)} Conv2d/Linear layers (quantized)")
    for row in rows:
        table.add_row(row["name"], row["kind"], shape(row), f"{row['params']:,}")
    out_console.print(table)
    if found["fp_layers"]:
        title = f"{len(found['fp_layers'])} more layers with weights: {api.STAYS_FP}"
        table = Table("layer", "kind", "shape", "params", "tensors", title=title)
        for row in found["fp_layers"]:
            name = row["name"] or "(the model itself)"  # a parameter the top module owns, e.g. a class token
            table.add_row(name, row["kind"], shape(row), f"{row['params']:,}", ", ".join(row["tensors"]))
        out_console.print(table)
    norms = found["normalisation"]
    params = found["params"]
    if norms:
        kinds = sorted({n["kind"] for n in norms})
        out_console.print(
            f"normalisation layers: {len(norms)} ({', '.join(kinds)}), {params['normalisation']:,} params: stay FP",
            highlight=False,
        )
    total = params["quantizable"] + params["not_quantizable"]
    share = 100 * params["quantizable"] / total if total else 0.0
    out_console.print(
        f"params: {params['quantizable']:,} quantizable ({share:.1f} %), {params['not_quantizable']:,} stay FP "
        f"({params['fp_layers']:,} in other layers, {params['normalisation']:,} normalisation, "
        f"{params['biases']:,} biases)",
        highlight=False,
    )


@app.command()
@handle_errors
def models(
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="List this model's Conv2d/Linear layers (the names "
            "--keep-fp and --fix-bits match) and the weights that stay FP, instead of the models.",
        ),
    ] = None,
    num_classes: Annotated[int, typer.Option(help="Classes of the model --layers builds.")] = 10,
    input_size: InputSizeOpt = None,
    as_json: JsonOpt = False,
):
    """List built-in and torchvision classification models, or one model's quantizable layers and
    the weights that stay FP (layers that are not Conv2d/Linear, normalisation, biases)."""
    from .. import api
    from ..models import list_models

    if layers is not None:
        found = api.model_layers(layers, num_classes, parse_input_size(input_size))
        if as_json:
            print_json(found)
            return
        print_model_layers(layers, found)
        return
    listing = list_models()
    if as_json:
        print_json(listing)
        return
    out_console.print("[bold]built-in[/bold] (small images): " + ", ".join(listing["builtin"]))
    out_console.print("[bold]torchvision[/bold]: " + ", ".join(listing["torchvision"]), highlight=False)
    out_console.print(
        "user models: package.module:factory or path/to/file.py:factory "
        "(called with num_classes, in_channels, input_size when it accepts them)"
    )
    out_console.print("a model's layer names: mpq models --layers MODEL", highlight=False)
