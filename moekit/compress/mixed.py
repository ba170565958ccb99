"""Mixed precision per expert (MC-MoE PMQ, EdgeMoE bit-width adaptation) as a MILP.

Shape legend: L = MoE layers, E = experts per layer, B = candidate bit widths.

Each expert e of layer li gets exactly one width b. Its cost is
``importance[li][e] * error[li][e][b] ** gamma`` with ``importance = freq**alpha * mass**beta``
(shares of the layer's assignments and routing-weight mass on calibration text) and ``error`` the
measured error at width b (:func:`moekit.compress.calibrate.expert_stats`: MC-MoE's MoE-block
output change, or the expert's own output MSE). The budget counts stored bits, scales and zero
points included: ``sum params[li][e] * (b + 24 / g) <= avg_bits * sum params`` (per layer with
``per_layer_budget``). MC-MoE's minimum-use constraint keeps at least one expert per layer at each
of the given widths (by default of :class:`MixedPrecisionConfig`, the two highest). The binary
program is solved exactly by HiGHS through ``scipy.optimize.milp`` (MC-MoE uses Gurobi).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from moekit.compress.calibrate import ExpertStats, expert_stats
from moekit.compress.config import MixedPrecisionConfig
from moekit.compress.quant import effective_bits


@dataclass
class Allocation:
    """Result of an allocation.

    Attributes:
        bits: ``[L][E]`` chosen width per expert.
        cost: objective value (total weighted error).
        avg_bits: achieved parameter-weighted stored bits per weight (overhead included).
        status: solver message.
    """

    bits: list[list[int]]
    cost: float
    avg_bits: float
    status: str = "optimal"


def importance(stats: ExpertStats, alpha: float = 1.0, beta: float = 1.0) -> list[list[float]]:
    """``freq**alpha * mass**beta`` per expert, ``[L][E]``."""
    return [[(f**alpha) * (m**beta) for f, m in zip(fl, ml)] for fl, ml in zip(stats.freq, stats.mass)]


def cost_table(
    stats: ExpertStats, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0
) -> list[list[list[float]]]:
    """``[L][E][B]`` weighted error: ``importance * error ** gamma``."""
    imp = importance(stats, alpha, beta)
    return [
        [[imp[li][e] * err**gamma for err in stats.error[li][e]] for e in range(len(imp[li]))]
        for li in range(len(imp))
    ]


def evaluate_allocation(
    bits: list[list[int]],
    costs: list[list[list[float]]],
    params: list[list[int]],
    candidates: list[int],
    group_size: int,
) -> tuple[float, float]:
    """``(total cost, average stored bits)`` of a given allocation."""
    cost = 0.0
    total_bits = total_params = 0.0
    for li, row in enumerate(bits):
        for e, b in enumerate(row):
            cost += costs[li][e][candidates.index(b)]
            total_bits += params[li][e] * effective_bits(b, group_size)
            total_params += params[li][e]
    return cost, total_bits / total_params


def solve_allocation(
    costs: list[list[list[float]]],
    params: list[list[int]],
    candidates: list[int],
    avg_bits: float,
    group_size: int,
    per_layer_budget: bool = False,
    min_bits_each: bool = False,
    min_use_bits: tuple[int, ...] | None = None,
) -> Allocation:
    """Solves the binary program with HiGHS (``scipy.optimize.milp``).

    Args:
        costs: ``[L][E][B]`` cost of each width.
        params: ``[L][E]`` parameters per expert (budget weights).
        candidates: the B widths.
        avg_bits: budget in stored bits per weight (overhead included).
        group_size: for the overhead term.
        per_layer_budget: apply the budget to each layer separately.
        min_bits_each: each layer keeps at least one expert at each of the two *highest* widths
            (MC-MoE: one at 3 bits and one at 2 bits of {1, 2, 3}).
        min_use_bits: explicit widths each layer keeps at least once (overrides ``min_bits_each``).

    Raises:
        ValueError: the budget is below the cheapest allocation (naming both numbers).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    eff = [effective_bits(b, group_size) for b in candidates]
    num_b = len(candidates)
    slots = [(li, e) for li in range(len(costs)) for e in range(len(costs[li]))]
    num_v = len(slots) * num_b
    c = np.array([costs[li][e][j] for (li, e) in slots for j in range(num_b)], dtype=np.float64)
    rows, lo, hi = [], [], []
    for s in range(len(slots)):  # one width per expert
        r = np.zeros(num_v)
        r[s * num_b : (s + 1) * num_b] = 1
        rows.append(r)
        lo.append(1)
        hi.append(1)
    groups = [list(range(len(costs)))] if not per_layer_budget else [[li] for li in range(len(costs))]
    for layers in groups:
        r = np.zeros(num_v)
        total = 0.0
        for s, (li, e) in enumerate(slots):
            if li in layers:
                r[s * num_b : (s + 1) * num_b] = [params[li][e] * x for x in eff]
                total += params[li][e]
        cheapest = min(eff) * total
        if avg_bits * total < cheapest - 1e-6:
            raise ValueError(
                f"avg_bits={avg_bits} is below the cheapest allocation ({min(eff):.4f} stored bits per weight "
                f"with candidate_bits={candidates} and group_size={group_size})"
            )
        rows.append(r)
        lo.append(-np.inf)
        hi.append(avg_bits * total)
    if min_use_bits is not None:
        forced = [candidates.index(b) for b in min_use_bits]
    else:
        forced = list(range(num_b))[-2:] if min_bits_each else []
    if forced:
        for li in range(len(costs)):
            for j in forced:
                r = np.zeros(num_v)
                for s, (ll, _) in enumerate(slots):
                    if ll == li:
                        r[s * num_b + j] = 1
                rows.append(r)
                lo.append(1)
                hi.append(np.inf)
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows), np.array(lo), np.array(hi)),
        integrality=np.ones(num_v),
        bounds=Bounds(0, 1),
    )
    if res.x is None:
        why = ""
        if forced:
            why = (
                f" (each layer must keep one expert at each of {[candidates[j] for j in forced]} bits: raise "
                "avg_bits, or relax min_bits_each / min_use_bits)"
            )
        raise ValueError(f"mixed-precision MILP found no solution{why}: {res.message}")
    x = np.round(res.x).astype(int)
    bits: list[list[int]] = [[0] * len(costs[li]) for li in range(len(costs))]
    for s, (li, e) in enumerate(slots):
        bits[li][e] = candidates[int(np.argmax(x[s * num_b : (s + 1) * num_b]))]
    cost, avg = evaluate_allocation(bits, costs, params, candidates, group_size)
    return Allocation(bits, cost, avg, str(res.message))


def brute_force_allocation(
    costs: list[list[list[float]]],
    params: list[list[int]],
    candidates: list[int],
    avg_bits: float,
    group_size: int,
) -> Allocation:
    """Exhaustive search over all ``B^(L*E)`` allocations (for tests on small instances)."""
    slots = [(li, e) for li in range(len(costs)) for e in range(len(costs[li]))]
    best: Allocation | None = None
    for choice in itertools.product(candidates, repeat=len(slots)):
        bits = [[0] * len(costs[li]) for li in range(len(costs))]
        for (li, e), b in zip(slots, choice):
            bits[li][e] = b
        cost, avg = evaluate_allocation(bits, costs, params, candidates, group_size)
        if avg <= avg_bits + 1e-9 and (best is None or cost < best.cost - 1e-12):
            best = Allocation(bits, cost, avg, "brute force")
    if best is None:
        raise ValueError(f"no allocation meets avg_bits={avg_bits}")
    return best


def uniform_allocation(
    stats: ExpertStats, bits: int, group_size: int, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0
) -> Allocation:
    """Every expert at ``bits`` (the baseline the MILP is compared with)."""
    alloc = [[bits] * len(row) for row in stats.params]
    cost, avg = evaluate_allocation(
        alloc, cost_table(stats, alpha, beta, gamma), stats.params, stats.bits, group_size
    )
    return Allocation(alloc, cost, avg, "uniform")


def allocate_bits(stats: ExpertStats, config: MixedPrecisionConfig) -> Allocation:
    """The MILP allocation for ``stats`` under ``config`` (see the module docstring).

    ``stats`` should be measured with ``config.objective`` and ``config.one_bit_error``
    (:func:`mixed_precision_stats` does that); a mismatch of objective raises ``ValueError``.
    """
    if stats.objective != config.objective:
        raise ValueError(
            f"allocate_bits: stats were measured with objective={stats.objective!r}, "
            f"MixedPrecisionConfig.objective={config.objective!r}; measure with mixed_precision_stats(model, batches, config)"
        )
    missing = [b for b in config.candidate_bits if b not in stats.bits]
    if missing:
        raise ValueError(
            f"MixedPrecisionConfig.candidate_bits {missing} were not measured (stats.bits={stats.bits})"
        )
    idx = [stats.bits.index(b) for b in config.candidate_bits]
    costs = [
        [[row[i] for i in idx] for row in layer]
        for layer in cost_table(stats, config.alpha, config.beta, config.gamma)
    ]
    return solve_allocation(
        costs,
        stats.params,
        list(config.candidate_bits),
        config.avg_bits,
        config.group_size,
        config.per_layer_budget,
        config.min_bits_each,
        config.min_use_bits,
    )


def mixed_precision_stats(model, batches: list, config: MixedPrecisionConfig) -> ExpertStats:
    """:func:`~moekit.compress.calibrate.expert_stats` measured the way ``config`` asks
    (its widths, group size, objective and 1-bit quantizer)."""
    one_bit = "binarize" if config.one_bit_error == "binarize" else "stored"
    return expert_stats(
        model, batches, config.candidate_bits, config.group_size, objective=config.objective, one_bit=one_bit
    )
