"""The plain-Python API behind every command: ``train``, ``search``, ``finetune``, ``evaluate_run``,
``export``, ``inspect``.

Each function builds what it needs (model, data, method), runs the shared engine
and writes a run directory; it returns a summary dict (what ``--json`` prints).
The commands live one module each under :mod:`mpq_cli.commands`; this module is their public face.
"""

from __future__ import annotations

from .commands.context import Context, ModelOptions, resolved_data, training
from .commands.evaluate import evaluate_packed, evaluate_run
from .commands.export import export, inspect, plot_layers
from .commands.listing import method_listing
from .commands.model_layers import STAYS_FP, model_layers
from .commands.save import bits_under_budget, build_scheme, file_sizes
from .commands.search import SEARCH_EPOCHS, SearchOptions, finetune, load_run, search
from .commands.train import FP_DEFAULTS, train

__all__ = [
    "FP_DEFAULTS",
    "SEARCH_EPOCHS",
    "STAYS_FP",
    "Context",
    "ModelOptions",
    "SearchOptions",
    "bits_under_budget",
    "build_scheme",
    "evaluate_packed",
    "evaluate_run",
    "export",
    "file_sizes",
    "finetune",
    "inspect",
    "load_run",
    "method_listing",
    "model_layers",
    "plot_layers",
    "resolved_data",
    "search",
    "train",
    "training",
]
