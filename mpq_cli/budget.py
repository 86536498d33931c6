"""Choosing one option per layer under an average-bits window: an exact integer program.

Each layer offers options ``(bits, cost)``; :func:`choose_options` picks one per layer
so that the parameter-weighted average bits lies in ``[low, high]`` and the summed
cost is least, solved exactly with SciPy's ``milp`` (HiGHS branch and bound), not a
hand-written heuristic. On it sit the loss-aware budget step CSQ and BSQ share
(:func:`budget_step`) and BMPQ's sensitivity-weighted bit assignment (:func:`assign_bits`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .errors import MpqError


def choose_options(options: list[list[tuple[int, float]]], params: list[int], low: float, high: float) -> list[int]:
    """Index of the chosen option per layer, the parameter-weighted average bits in ``[low, high]``.

    Args:
        options: per layer, ``(bits, cost)`` pairs; ``bits`` is what the budget counts per weight of the
            layer, whole (nominal bits) or fractional (stored bits, a code table included), such that
            ``bits * params`` rounds to the layer's total.
        params: per layer, the parameter count that weights its bits.
        low, high: the window for ``sum(bits * params) / sum(params)``.

    Returns:
        For each layer, the index into its options.

    Raises:
        MpqError: if no choice lands inside the window.
    """
    total = sum(params)
    # the window in whole bits of the model; the slack absorbs the float error of avg * total, far below 1 bit
    return choose_options_within(options, params, math.ceil(low * total - _SLACK), math.floor(high * total + _SLACK))


_SLACK = 1e-6
# How long HiGHS may search one program. Layers x options stay small for CNNs (resnet50: 54 x 8), solved in
# milliseconds, but a model of thousands of layers must not hang a run: at the limit the best scheme found is
# used (it meets the window; it is only not proven optimal) and a warning says so.
ILP_TIME_LIMIT_ENV = "MPQ_ILP_TIME_LIMIT"
DEFAULT_ILP_TIME_LIMIT_S = 120.0
_RESOLVES = 4
AVERAGE_SLACK = 1e-9  # float error allowed on an average of bits when checking it against a window


def in_window(average: float, target: float, tolerance: float) -> bool:
    """``average`` in ``[target - tolerance, target]``: the budget window of CSQ and BSQ."""
    return target - tolerance - AVERAGE_SLACK <= average <= target + AVERAGE_SLACK


def choose_options_within(
    options: list[list[tuple[int, float]]], params: list[int], low_bits: int, high_bits: int
) -> list[int]:
    """Index of the chosen option per layer with the model's total bits ``sum(bits * params)`` in
    ``[low_bits, high_bits]`` (integers), at the least summed cost.

    The constraint is written in whole bits and the rounded solution is re-checked in exact
    integer arithmetic: HiGHS's feasibility tolerance is absolute, so on a model of tens of
    millions of weights a constraint normalised to average bits could be broken by bits
    (11 over on an 11 M-weight instance). A solution that strays is solved again with the
    window narrowed by what it strayed.

    Raises:
        MpqError: if no choice lands inside the window.
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    if len(options) != len(params) or any(not opts for opts in options):
        raise ValueError("every layer needs at least one option")
    costs, sizes, owners = [], [], []
    for layer, opts in enumerate(options):
        for bits, cost in opts:
            costs.append(cost)
            sizes.append(_layer_total(bits, params[layer]))  # exact: Python integers
            owners.append(layer)
    n = len(costs)
    # sparse: dense, a model of thousands of layers x 8 options would build a matrix of hundreds of MB
    one_per_layer = sparse.csr_array((np.ones(n), (owners, np.arange(n))), shape=(len(options), n))
    low, high = low_bits, high_bits
    total = sum(params)
    limit = float(os.environ.get(ILP_TIME_LIMIT_ENV, DEFAULT_ILP_TIME_LIMIT_S))
    for _ in range(_RESOLVES):
        constraints = [
            LinearConstraint(one_per_layer, 1.0, 1.0),
            LinearConstraint(np.array(sizes, dtype=float)[None, :], float(low), float(high)),
        ]
        result = milp(
            np.array(costs, dtype=float),
            constraints=constraints,
            integrality=np.ones(n),
            bounds=Bounds(0.0, 1.0),
            options={"time_limit": limit},
        )
        if result.status == 1 and result.x is None:  # the time limit, before any scheme in the window was found
            raise MpqError(
                f"the integer program found no per-layer bit choice within its {limit:g} s limit "
                f"({len(options)} layers, {n} options); raise ${ILP_TIME_LIMIT_ENV} or offer fewer options"
            )
        if result.x is None or result.status not in (0, 1):
            break
        if result.status == 1:
            warnings.warn(
                f"the integer program reached its {limit:g} s limit (${ILP_TIME_LIMIT_ENV}); its best scheme so far "
                "is used: it meets the budget but is not proven the least costly",
                stacklevel=2,
            )
        chosen = np.round(result.x).astype(int)
        picks, start, used = [], 0, 0
        for opts in options:
            pick = int(np.argmax(chosen[start : start + len(opts)]))
            picks.append(pick)
            used += sizes[start + pick]
            start += len(opts)
        if low_bits <= used <= high_bits:
            return picks
        if used > high_bits:
            high -= used - high_bits
        else:
            low += low_bits - used
        if low > high:
            break
    raise MpqError(f"no per-layer bit choice puts the average in [{low_bits / total:.3f}, {high_bits / total:.3f}]")


def _layer_total(bits: float, params: int) -> int:
    """A layer's total bits: ``bits * params`` in whole bits (exact for whole ``bits``; fractional ``bits``
    are a total divided by ``params``, which this rounds back)."""
    return int(bits) * int(params) if float(bits).is_integer() else round(float(bits) * int(params))


def trial(module, change: Callable[[], None], restore: Callable[[], None] | None = None) -> Callable[[], None]:
    """Apply ``change`` to ``module`` (a quantizer) and return the function that undoes it: the
    module's state is saved first and loaded back, then ``restore`` runs for what a state dict
    does not hold (e.g. ``requires_grad``). The ``apply`` that :func:`budget_step` takes."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    change()

    def undo() -> None:
        module.load_state_dict(saved)
        if restore is not None:
            restore()

    return undo


# *ours*: the layers' loss changes are measured one at a time and assumed to add up; when the chosen
# scheme's measured loss exceeds that prediction by more than this share of the predicted rise (plus
# INTERACTION_SLACK), the layers interact, and the step measures every option again from the chosen
# scheme and keeps the second choice only if its measured loss is lower.
INTERACTION_SHARE = 0.5
INTERACTION_SLACK = 1e-3


def _measure(names, current, candidates, apply, loss_probe, never_zero, counted=None):
    """The probe loss now; per layer ``(counted bits, loss change)`` of staying (0) and of each candidate
    alone; and per layer each option's nominal bits. ``counted(name)`` gives what the budget counts of the
    layer as it is now (its stored bits per weight), measured with the option applied; None counts the
    nominal bits."""
    base_loss = loss_probe()
    options: list[list[tuple[float, float]]] = []
    nominal: list[list[int]] = []
    for name, bits_now in zip(names, current, strict=True):
        layer_options = [(counted(name) if counted else bits_now, 0.0)]
        layer_nominal = [bits_now]
        for bits in candidates.get(name, ()):
            if bits == 0 and name in never_zero:
                continue
            undo = apply(name, bits)
            change, count = loss_probe() - base_loss, counted(name) if counted else bits
            undo()
            if not math.isfinite(change):  # an option that breaks the model (inf or nan loss) is no option
                continue
            layer_options.append((count, change))
            layer_nominal.append(bits)
        options.append(layer_options)
        nominal.append(layer_nominal)
    return base_loss, options, nominal


def choose_under_ceiling(options, params, target: float, tolerance: float) -> list[int] | None:
    """The least-loss choice in the window ``[target - tolerance, target]``; when no choice lands there,
    the least-loss one among those closest under the ceiling ``target`` (the most bits it allows, to
    HiGHS's default relative gap of 1e-4); None when every choice is over the ceiling."""
    try:
        return choose_options(options, list(params), target - tolerance, target)
    except MpqError:
        pass
    closest = most_bits_under(options, params, target)
    if closest is None:
        return None
    try:
        return choose_options_within(options, list(params), closest[0], ceiling_bits(params, target))
    except MpqError:  # the solver strayed from a window this narrow: the most bits, whatever their loss
        return closest[1]


def ceiling_bits(params: Sequence[int], target: float) -> int:
    """The ceiling ``target`` average bits in whole bits of the model."""
    return math.floor(target * sum(params) + _SLACK)


def most_bits_under(options, params: Sequence[int], target: float) -> tuple[int, list[int]] | None:
    """The most total bits ``sum(bits * params)`` a choice of one option per layer reaches without
    passing ``target`` average bits, and that choice (None: every choice passes it), from the same
    integer program with the cost of an option its bits (exact to HiGHS's relative gap, 1e-4)."""
    sized = [[(bits, -float(bits) * p) for bits, _ in opts] for opts, p in zip(options, params, strict=True)]
    try:
        picks = choose_options_within(sized, list(params), 0, ceiling_bits(params, target))
    except MpqError:
        return None
    return sum(_layer_total(opts[i][0], p) for opts, i, p in zip(options, picks, params, strict=True)), picks


def window_reachable(options: Sequence[Sequence[int]], params: Sequence[int], target: float, tolerance: float) -> bool:
    """Whether some choice of one option (bits) per layer puts the average in ``[target - tolerance, target]``:
    the discrete question, not the span between each layer's lowest and highest option (the average of
    the extremes can bracket a window no combination lands in)."""
    zero_cost = [[(int(b), 0.0) for b in opts] for opts in options]
    try:
        choose_options(zero_cost, list(params), target - tolerance, target)
    except MpqError:
        return False
    return True


def narrow_candidates(
    names: Sequence[str],
    params: Sequence[int],
    current: Sequence[int],
    candidates: dict[str, Sequence[int]],
    span: int,
    target: float,
    tolerance: float,
    never_zero: Sequence[str] = (),
    estimate: Callable[[int], float] | None = None,
) -> dict[str, list[int]]:
    """Each layer's candidates within ``span`` bits of its current bits, or every candidate when no
    combination of so few lands in ``[target - tolerance, target]``.

    The budget step probes every option of every layer (on MobileNetV2, 53 layers x 9 options x
    the probe batches: most of an epoch's cost), while the options it picks lie near the bits the
    search learned: moving a layer far costs far more loss than spreading the change. So the
    step looks only near the learned scheme, unless no choice there lands in the window (a search
    that ended far from its budget, or a model whose few large layers move the average in steps
    wider than the window), where it looks at everything. ``span`` 0 keeps every option.
    ``estimate(bits)``: what the budget counts of an option, when it is not its bits (stored bits).
    """
    full = {n: list(c) for n, c in candidates.items()}
    if span <= 0:
        return full
    near = {
        n: [b for b in c if abs(b - now) <= span] for n, now in zip(names, current, strict=True) if (c := full.get(n))
    }
    count = estimate or (lambda b: b)
    reach = [
        sorted({count(b) for b in (now, *(b for b in near.get(name, ()) if not (b == 0 and name in never_zero)))})
        for name, now in zip(names, current, strict=True)
    ]
    return near if window_reachable(reach, params, target, tolerance) else full


def budget_step(
    names: Sequence[str],
    params: Sequence[int],
    current: Sequence[int],
    candidates: dict[str, Sequence[int]],
    apply: Callable[[str, int], Callable[[], None]],
    loss_probe: Callable[[], float],
    target: float,
    tolerance: float,
    never_zero: Sequence[str] = (),
    *,
    counted: Callable[[str], float] | None = None,
    wider: dict[str, Sequence[int]] | None = None,
) -> list[dict]:
    """Move a scheme into ``[target - tolerance, target]`` at the least measured loss.

    Each layer's options are: stay at ``current`` bits, or any of ``candidates[name]``;
    layers in ``never_zero`` are not offered 0 bits (at 0 bits a layer's output is its
    bias alone, which a probe of a half-trained model can measure as an improvement).
    Every option's probe loss is measured with the other layers unchanged
    (``apply(name, bits)`` sets the option and returns a function that undoes it), and
    :func:`choose_options` picks one option per layer, assuming the layers' loss changes
    add up. ``target`` is a ceiling: if no choice lands in the window, the step takes the least loss
    among the choices with the most bits under ``target``.
    The chosen scheme's loss is then measured; if the layers interact (it is worse than
    predicted, :data:`INTERACTION_SHARE`), every option is measured again from the chosen
    scheme and the second choice replaces the first only if its measured loss is lower.

    ``counted(name)``, when given, is what the budget counts of a layer in its present state (its stored
    bits per weight, ``--budget-on stored``), measured for every option with the option applied; the
    window is then on that count. ``wider``: candidates to measure too when none of the measured
    options' combinations lands in the window (``candidates`` narrowed on an estimate of the count).

    Returns:
        One record per changed layer: ``layer``, ``bits_before``, ``bits_after``,
        ``probe_loss_change_alone`` (measured in the pass that chose it), ``probe_loss_before``,
        ``probe_loss_after``, ``passes`` (1, or 2 when a second measurement was kept).
    """
    base_loss, options, nominal = _measure(names, current, candidates, apply, loss_probe, never_zero, counted)
    if wider is not None and not window_reachable([[b for b, _ in o] for o in options], params, target, tolerance):
        candidates = wider
        base_loss, options, nominal = _measure(names, current, candidates, apply, loss_probe, never_zero, counted)
    picks = choose_under_ceiling(options, params, target, tolerance)
    if picks is None:
        return []
    chosen = {}  # name -> (nominal bits, loss change alone)
    for name, pick, opts, bits in zip(names, picks, options, nominal, strict=True):
        if pick:
            apply(name, bits[pick])
            chosen[name] = (bits[pick], opts[pick][1])
    final_loss = loss_probe()
    predicted = base_loss + sum(change for _, change in chosen.values())
    passes = 1
    if final_loss > predicted + INTERACTION_SHARE * max(predicted - base_loss, 0.0) + INTERACTION_SLACK:
        now = [chosen[n][0] if n in chosen else bits for n, bits in zip(names, current, strict=True)]
        second_base, second, second_nominal = _measure(names, now, candidates, apply, loss_probe, never_zero, counted)
        picks = choose_under_ceiling(second, params, target, tolerance) or [0] * len(names)  # None: keep the first
        undos, replaced = [], {}
        for name, pick, opts, bits in zip(names, picks, second, second_nominal, strict=True):
            if pick:
                undos.append(apply(name, bits[pick]))
                replaced[name] = (bits[pick], opts[pick][1])
        second_loss = loss_probe() if replaced else second_base
        if replaced and second_loss < final_loss:
            chosen.update(replaced)
            final_loss, passes = second_loss, 2
        else:
            for undo in reversed(undos):
                undo()
    changes = []
    for name, bits_now in zip(names, current, strict=True):
        if name in chosen:  # same bits too: re-rounded from what the layer learned
            changes.append(
                {
                    "layer": name,
                    "bits_before": bits_now,
                    "bits_after": chosen[name][0],
                    "probe_loss_change_alone": chosen[name][1],
                    "probe_loss_before": base_loss,
                    "probe_loss_after": final_loss,
                    "passes": passes,
                }
            )
    return changes


def assign_bits(
    sensitivity: dict[str, float],
    params: dict[str, int],
    support: Sequence[int],
    budget_bits: float,
    fixed: dict[str, int] | None = None,
    ties: Sequence[Sequence[str]] = (),
) -> dict[str, int]:
    """BMPQ's integer program (Eq. 8-9): per layer one width from ``support``.

    Maximises ``sum_l sensitivity[l] * bits[l]`` subject to
    ``sum_l params[l] * bits[l] <= budget_bits`` (memory, Eq. 11), solved exactly by
    :func:`choose_options`. Layers in ``fixed`` keep their bits and their memory is
    taken from the budget first; layers in one tie group get one width (a group with a
    fixed member takes that member's bits).

    Raises:
        MpqError: if even the smallest scheme exceeds the budget, or a tie group holds
            two different fixed widths.
    """
    fixed = dict(fixed or {})
    names = list(params)
    unknown = (set(sensitivity) | set(fixed) | {n for g in ties for n in g}) - set(names)
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}")
    support = sorted({int(b) for b in support})
    if not support:
        raise MpqError("BMPQ needs at least one support bit width")
    groups = _merge_ties(names, ties)
    for group in groups:  # a tie to a fixed layer fixes the group
        widths = {fixed[n] for n in group if n in fixed}
        if len(widths) > 1:
            raise MpqError(f"layers {sorted(group)} are tied but fixed at different bits {sorted(widths)}")
        if widths:
            fixed.update({n: next(iter(widths)) for n in group})
    free = [g for g in groups if not any(n in fixed for n in g)]
    fixed_cost = sum(params[n] * bits for n, bits in fixed.items())
    smallest = fixed_cost + sum(params[n] for g in free for n in g) * support[0]
    if smallest > budget_bits * (1 + 1e-12):
        total = sum(params.values())
        raise MpqError(
            f"budget of {budget_bits / total:.4f} average bits ({budget_bits / 8:,.0f} bytes) is below "
            f"the smallest scheme: {smallest / total:.4f} average bits ({smallest / 8:,.0f} bytes) with "
            f"every free layer at {support[0]} bits and the fixed layers at theirs"
        )
    out = dict(fixed)
    if not free:
        return out
    group_params = [sum(params[n] for n in g) for g in free]
    # choose_options minimises cost under an average window: cost = -sensitivity * bits
    options = [[(b, -sum(sensitivity.get(n, 0.0) for n in g) * b) for b in support] for g in free]
    picks = choose_options_within(options, group_params, 0, math.floor(budget_bits - fixed_cost + _SLACK))
    for group, pick in zip(free, picks, strict=True):
        out.update({n: support[pick] for n in group})
    return out


def _merge_ties(names: Sequence[str], ties: Sequence[Sequence[str]]) -> list[list[str]]:
    """Connected components of the tie relation, in ``names`` order (union-find)."""
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for group in ties:
        group = list(group)
        for other in group[1:]:
            parent[root(other)] = root(group[0])
    components: dict[str, list[str]] = {}
    for n in names:
        components.setdefault(root(n), []).append(n)
    return list(components.values())
