"""mpq: mixed-precision weight quantization search for PyTorch vision models."""

__version__ = "0.1.0"

from .api import finetune, search, train  # noqa: E402
from .errors import MpqError  # noqa: E402

__all__ = ["MpqError", "__version__", "finetune", "search", "train"]
