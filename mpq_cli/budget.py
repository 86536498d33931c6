"""Choosing one option per layer under an average-bits window: an exact integer program.

Used by the methods' final budget steps (and by BMPQ's bit assignment). Each layer
offers options ``(bits, cost)``; pick one per layer so that the parameter-weighted
average bits lies in ``[low, high]`` and the summed cost is least. Solved exactly
with SciPy's ``milp`` (HiGHS branch and bound), not a hand-written heuristic.
"""

from __future__ import annotations

import numpy as np

from .errors import MpqError


def choose_options(options: list[list[tuple[int, float]]], params: list[int], low: float, high: float) -> list[int]:
    """Index of the chosen option per layer.

    Args:
        options: per layer, ``(bits, cost)`` pairs.
        params: per layer, the parameter count that weights its bits.
        low, high: the window for ``sum(bits * params) / sum(params)``.

    Returns:
        For each layer, the index into its options.

    Raises:
        MpqError: if no choice lands inside the window.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    if len(options) != len(params) or any(not opts for opts in options):
        raise ValueError("every layer needs at least one option")
    total = float(sum(params))
    costs, sizes, owners = [], [], []
    for layer, opts in enumerate(options):
        for bits, cost in opts:
            costs.append(cost)
            sizes.append(bits * params[layer] / total)
            owners.append(layer)
    n = len(costs)
    one_per_layer = np.zeros((len(options), n))
    one_per_layer[owners, np.arange(n)] = 1.0
    constraints = [LinearConstraint(one_per_layer, 1.0, 1.0),
                   LinearConstraint(np.array(sizes)[None, :], low - 1e-9, high + 1e-9)]
    result = milp(np.array(costs, dtype=float), constraints=constraints, integrality=np.ones(n),
                  bounds=Bounds(0.0, 1.0))
    if not result.success or result.x is None:
        raise MpqError(f"no per-layer bit choice puts the average in [{low:.3f}, {high:.3f}]")
    chosen = np.round(result.x).astype(int)
    picks = []
    start = 0
    for opts in options:
        picks.append(int(np.argmax(chosen[start:start + len(opts)])))
        start += len(opts)
    return picks
