"""Mixed-precision methods, one module each, registered by name."""

from . import alq, bmpq, bsq, csq, uniform  # noqa: F401  (registration happens on import)
from .base import METHODS, FinalizeResult, Method, MethodConfig, Phase, get_method

__all__ = ["METHODS", "FinalizeResult", "Method", "MethodConfig", "Phase", "get_method"]
