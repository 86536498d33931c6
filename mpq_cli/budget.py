"""Choosing one option per layer under an average-bits window: an exact integer program.

Used by the methods' loss-aware budget steps (:func:`budget_step`; and by BMPQ's bit
assignment). Each layer
offers options ``(bits, cost)``; pick one per layer so that the parameter-weighted
average bits lies in ``[low, high]`` and the summed cost is least. Solved exactly
with SciPy's ``milp`` (HiGHS branch and bound), not a hand-written heuristic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def budget_step(names: Sequence[str], params: Sequence[int], current: Sequence[int],
                candidates: dict[str, Sequence[int]], apply: Callable[[str, int], Callable[[], None]],
                loss_probe: Callable[[], float], target: float, tolerance: float) -> list[dict]:
    """Move a scheme into ``[target - tolerance, target]`` at the least measured loss.

    Each layer's options are: stay at ``current`` bits, or any of ``candidates[name]``.
    Every option's probe loss is measured with the other layers unchanged
    (``apply(name, bits)`` sets the option and returns a function that undoes it), and
    :func:`choose_options` picks one option per layer, assuming the layers' loss changes
    add up. If no choice fits the window, the scheme at least goes under ``target``.
    The chosen options are applied for good.

    Returns:
        One record per changed layer: ``layer``, ``bits_before``, ``bits_after``,
        ``probe_loss_change_alone``, ``probe_loss_before``, ``probe_loss_after``.
    """
    base_loss = loss_probe()
    options: list[list[tuple[int, float]]] = []
    for name, bits_now in zip(names, current, strict=True):
        layer_options = [(bits_now, 0.0)]
        for bits in candidates.get(name, ()):
            undo = apply(name, bits)
            layer_options.append((bits, loss_probe() - base_loss))
            undo()
        options.append(layer_options)
    picks = None
    for low in (target - tolerance, 0.0):
        try:
            picks = choose_options(options, list(params), low, target)
            break
        except MpqError:
            continue
    if picks is None:
        return []
    changes = []
    for name, pick, opts, bits_now in zip(names, picks, options, current, strict=True):
        if pick == 0:
            continue
        apply(name, opts[pick][0])
        changes.append({"layer": name, "bits_before": bits_now, "bits_after": opts[pick][0],
                        "probe_loss_change_alone": opts[pick][1]})
    final_loss = loss_probe()
    for change in changes:
        change["probe_loss_before"], change["probe_loss_after"] = base_loss, final_loss
    return changes
