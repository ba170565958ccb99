"""Choosing experts: per request by latency class, and globally by energy budget (MoE²).

Global selection is the paper's coarse level: choose the subset S of experts that maximises the
mixture's quality ``q(S)`` (here the negative NLL of the masked gate on held-out windows) subject
to ``sum_{i in S} e_i <= E`` (energy per token is additive, so the feasible sets are down-closed).

:func:`branch_and_bound` is the discrete monotonic optimisation: a depth-first search over
include/exclude decisions whose node ``(I included, U undecided)`` holds every subset between
``I`` and ``I | U``. If ``q`` is monotone (adding an expert never hurts), ``q(I | U)`` bounds
every subset of the node, so

* a node whose top ``I | U`` is feasible is solved by evaluating that one set (the best in it);
* a node whose bound cannot beat the incumbent is pruned without looking inside.

Only maximal feasible sets and the bounds are ever evaluated, which is why it needs far fewer
evaluations than :func:`exhaustive`. **Monotonicity is an assumption about q**: with a gate
retrained per subset it holds up to training noise (the gate can send an expert's weight to
~0), but with one gate trained on all experts and masked, adding an expert can hurt (the
renormalised weights move mass onto it). :func:`monotonicity_report` measures the violations on
small instances; ``slack`` makes the bound valid for a q that is ``slack``-monotone (no single
addition lowers q by more than ``slack``): a node's bound becomes ``q(I | U) + slack * |U|``,
since any T in the node lies ``|I | U| - |T| <= |U|`` additions below the top. With
``slack=0`` the solver is exact for monotone q and a heuristic otherwise; ``tests`` and
``benchmarks/bench_mixture.py`` compare it with exhaustive search.

Every method returns a :class:`SearchResult` with the number of *distinct* subsets it evaluated.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

# A subset of expert indices (frozen, so it keys the evaluation memo).
Subset = frozenset


@dataclass
class Objective:
    """``q(subset) -> float`` (higher is better) with a memo and an evaluation counter.

    ``q`` of the empty set is never asked for: it is -inf by definition (no expert, no answer).
    """

    fn: Callable[[frozenset], float]
    memo: dict = field(default_factory=dict)

    def __call__(self, subset) -> float:
        key = frozenset(subset)
        if not key:
            return -math.inf
        if key not in self.memo:
            self.memo[key] = float(self.fn(key))
        return self.memo[key]

    @property
    def evaluations(self) -> int:
        """Distinct non-empty subsets evaluated so far."""
        return len(self.memo)


@dataclass
class SearchResult:
    """A method's chosen subset.

    Attributes:
        method: the method's name.
        subset: sorted expert indices.
        value: ``q(subset)`` (-inf when nothing is affordable).
        energy: the subset's energy per token.
        evaluations: distinct subsets the method evaluated.
    """

    method: str
    subset: tuple[int, ...]
    value: float
    energy: float
    evaluations: int


def _energy(energy: Sequence[float], subset) -> float:
    return float(sum(energy[i] for i in subset))


def _result(method: str, q: Objective, energy, subset) -> SearchResult:
    subset = tuple(sorted(subset))
    return SearchResult(method, subset, q(subset), _energy(energy, subset), q.evaluations)


def exhaustive(q: Objective, energy: Sequence[float], budget: float, candidates=None) -> SearchResult:
    """Evaluates every non-empty feasible subset of ``candidates`` (default all); the reference."""
    items = list(range(len(energy))) if candidates is None else list(candidates)
    best, best_value = (), -math.inf
    for size in range(1, len(items) + 1):
        for subset in combinations(items, size):
            if _energy(energy, subset) <= budget + 1e-12:
                value = q(subset)
                if value > best_value:
                    best, best_value = subset, value
    return _result("exhaustive", q, energy, best)


def branch_and_bound(
    q: Objective, energy: Sequence[float], budget: float, candidates=None, slack: float = 0.0
) -> SearchResult:
    """The discrete monotonic optimisation of the module doc: best feasible subset of ``candidates``.

    Args:
        q: the objective (monotone, or ``slack``-monotone, for the result to be exact).
        energy: per-expert energy per token.
        budget: the energy budget.
        candidates: expert indices to choose from (default all).
        slack: the largest drop one added expert may cause (0 for a monotone q).
    """
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    eps = 1e-12
    # Expensive experts are decided first: once they are fixed, the cheap rest fits sooner, so tops
    # become feasible (solved by one evaluation) higher in the tree. On random monotone instances
    # (4-10 experts, budgets 25-75% of the total) this needs 29% of exhaustive's evaluations on
    # average, against 49% for cheap-first.
    items = sorted(range(len(energy)) if candidates is None else candidates, key=lambda i: (-energy[i], i))
    best: list = [(), -math.inf]

    def visit(included: tuple, spent: float, undecided: list) -> None:
        undecided = [j for j in undecided if spent + energy[j] <= budget + eps]
        top = included + tuple(undecided)
        if not top:
            return
        if spent + sum(energy[j] for j in undecided) <= budget + eps:
            # The top is feasible: with a monotone q it is the best set of the node. With slack,
            # smaller sets of the node may still beat it by up to slack * |undecided|.
            value = q(top)
            if value > best[1]:
                best[:] = [top, value]
            if slack == 0.0 or value + slack * len(undecided) <= best[1]:
                return
        elif best[1] > -math.inf and q(top) + slack * len(undecided) <= best[1]:
            # An infeasible top is only a bound; before there is an incumbent it could prune
            # nothing, so it is not evaluated then.
            return  # no subset of the node can beat the incumbent
        if not undecided:
            return
        j, rest = undecided[0], undecided[1:]
        visit(included + (j,), spent + energy[j], rest)
        visit(included, spent, rest)

    visit((), 0.0, items)
    return _result("branch_and_bound", q, energy, best[0])


def best_single(q: Objective, energy: Sequence[float], budget: float, candidates=None) -> SearchResult:
    """The best affordable expert alone."""
    items = list(range(len(energy))) if candidates is None else list(candidates)
    feasible = [i for i in items if energy[i] <= budget + 1e-12]
    best = max(feasible, key=lambda i: q((i,)), default=None)
    return _result("best_single", q, energy, () if best is None else (best,))


def greedy(
    q: Objective, energy: Sequence[float], budget: float, candidates=None, baseline: float = -math.inf
) -> SearchResult:
    """Greedy by quality per joule: repeatedly add the affordable expert with the largest gain in
    ``q`` per joule (the first expert's gain is measured from ``baseline``, e.g. minus the unigram
    NLL), until no addition improves ``q``. If no expert beats ``baseline``, the best one alone."""
    items = list(range(len(energy))) if candidates is None else list(candidates)
    chosen: tuple = ()
    current = baseline
    while True:
        spent = _energy(energy, chosen)
        options = [j for j in items if j not in chosen and spent + energy[j] <= budget + 1e-12]
        scored = []
        for j in options:
            gain = q(chosen + (j,)) - current
            scored.append((gain / max(energy[j], 1e-12), gain, j))
        if not chosen and scored and all(s[1] <= 0 for s in scored):
            # Every expert is worse than the baseline guess: still answer, with the best one.
            scored = [max(scored, key=lambda s: (s[1], -s[2]))]
        scored = [s for s in scored if s[1] > 0 or not chosen]
        if not scored:
            break
        _, _, j = max(scored)
        chosen = chosen + (j,)
        current = q(chosen)
    return _result("greedy_per_joule", q, energy, chosen)


def random_subset(
    q: Objective, energy: Sequence[float], budget: float, candidates=None, seed: int = 0
) -> SearchResult:
    """A random maximal affordable subset (experts in random order, each added if it fits)."""
    items = list(range(len(energy))) if candidates is None else list(candidates)
    random.Random(seed).shuffle(items)
    chosen, spent = [], 0.0
    for j in items:
        if spent + energy[j] <= budget + 1e-12:
            chosen.append(j)
            spent += energy[j]
    return _result("random", q, energy, chosen)


@dataclass
class MonotonicityReport:
    """How often adding one expert lowers ``q``.

    Attributes:
        pairs: ``(S, j)`` pairs checked.
        violations: pairs with ``q(S | {j}) < q(S)``.
        max_drop: the largest such drop (0 when none).
        sampled: True when the pairs were a random sample (``max_drop`` is then an estimate, a
            lower bound on the true one, and a slack set from it is not guaranteed).
    """

    pairs: int
    violations: int
    max_drop: float
    sampled: bool = False


def monotonicity_report(
    q: Objective, num_experts: int, tol: float = 1e-9, max_pairs: int | None = None, seed: int = 0
) -> MonotonicityReport:
    """Checks ``q(S | {j}) >= q(S)`` for every non-empty S and j outside it (2^E subsets: small E),
    or for ``max_pairs`` random pairs (a random size, members and j) when given."""
    if max_pairs is None:
        pairs_iter = (
            (subset, j)
            for size in range(1, num_experts)
            for subset in combinations(range(num_experts), size)
            for j in sorted(set(range(num_experts)) - set(subset))
        )
    else:
        rng = random.Random(seed)

        def sample():
            for _ in range(max_pairs):
                size = rng.randint(1, num_experts - 1)
                members = rng.sample(range(num_experts), size + 1)
                yield tuple(sorted(members[:size])), members[size]

        pairs_iter = sample()
    pairs = violations = 0
    max_drop = 0.0
    for subset, j in pairs_iter:
        pairs += 1
        drop = q(subset) - q(subset + (j,))
        if drop > tol:
            violations += 1
            max_drop = max(max_drop, drop)
    return MonotonicityReport(pairs, violations, max_drop, sampled=max_pairs is not None)


def fitting_experts(latencies: Sequence[float], bound_s: float | None, candidates=None) -> list[int]:
    """The per-request level: indices of ``candidates`` whose predicted latency fits ``bound_s``."""
    items = list(range(len(latencies))) if candidates is None else list(candidates)
    if bound_s is None:
        return items
    return [i for i in items if latencies[i] <= bound_s]


METHODS = {
    "branch_and_bound": branch_and_bound,
    "exhaustive": exhaustive,
    "greedy_per_joule": greedy,
    "best_single": best_single,
    "random": random_subset,
}

__all__ = [
    "METHODS",
    "MonotonicityReport",
    "Objective",
    "SearchResult",
    "best_single",
    "branch_and_bound",
    "exhaustive",
    "fitting_experts",
    "greedy",
    "monotonicity_report",
    "random_subset",
]
