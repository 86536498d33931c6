"""mpq: mixed-precision weight quantization search for PyTorch vision models."""

__version__ = "0.1.0"

from .errors import MpqError  # noqa: E402

# The public functions load on first use (PEP 562): importing mpq_cli, or running `mpq --help`, does not
# wait for torch.
_LAZY = {
    "evaluate_run": "api",
    "export": "api",
    "finetune": "api",
    "inspect": "api",
    "search": "api",
    "train": "api",
    "decode_layer": "packing.format",
    "load_packed": "packing.format",
}

__all__ = ["MpqError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mpq_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
