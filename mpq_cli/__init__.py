"""mpq: mixed-precision weight quantization search for PyTorch vision models."""

__version__ = "0.1.0"

from .api import evaluate_run, export, finetune, inspect, search, train  # noqa: E402
from .errors import MpqError  # noqa: E402
from .packing.format import decode_layer, load_packed  # noqa: E402

__all__ = [
    "MpqError",
    "__version__",
    "decode_layer",
    "evaluate_run",
    "export",
    "finetune",
    "inspect",
    "load_packed",
    "search",
    "train",
]
