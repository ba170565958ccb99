"""Expert placement planning from routing traces (MoETuner-style ILP, greedy, EPLB replication).

Shape legend: L = MoE layers, E = experts per layer, N = devices.

Model of the cost (what :func:`simulate` reports and the ILP minimises):

* **Load.** Each device computes the assignments of the experts it hosts. A layer's step time
  follows its busiest device, so the imbalance of a layer is ``max_d load / mean_d load``.
* **Traffic**, in one of two models (``traffic=``):

  - ``"stay"`` (MoETuner): a token lives on the device of its first-choice expert of the
    previous MoE layer (at the first MoE layer, on its home device ``sequence_id % N``). Each of
    its chosen experts hosted elsewhere costs one send and one return of a ``D``-wide row.
    Tokens routed to expert i in layer l tend to go to a few experts in layer l+1 (the
    cross-layer dependency), so co-locating those pairs saves traffic.
  - ``"home"``: every layer sends a token from its home device (its data-parallel rank) to each
    chosen expert and back, as moekit's expert-parallel executor, DeepSpeed and Megatron do.
    Placing experts where their tokens' sequences live saves traffic.

The ILP (scipy's HiGHS MILP) places each expert on one device with exactly E/N experts per
device, bounds every layer's load by ``(1 + load_slack)`` times the mean, and minimises the
number of token moves between consecutive layers. It runs under a time limit; the planner
returns the best of the ILP, a greedy and round-robin placement under the same cost.
Replication (EPLB) is a separate step: with spare expert slots per device, the hottest experts
get replicas and their load is split evenly.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.analysis.trace import RoutingTrace


@dataclass
class TraceStats:
    """What placement needs from a trace.

    Attributes:
        load_LE: assignments per expert, ``[L, E]``.
        transition: per consecutive layer pair ``l -> l+1``, ``[E, E]`` counts of tokens whose
            first choice in layer l is i and that choose j in layer l+1.
        home_LNE: per layer and home device, ``[L, N, E]`` assignment counts.
    """

    load_LE: np.ndarray
    transition: list[np.ndarray]
    home_LNE: np.ndarray

    @property
    def first_home_NE(self) -> np.ndarray:
        """``[N, E]`` first-MoE-layer assignments by home device."""
        return self.home_LNE[0]


def trace_stats(trace: RoutingTrace, num_devices: int) -> TraceStats:
    """Counts load, cross-layer transitions and home-device traffic from a trace."""
    num_e = trace.num_experts[0]
    if any(e != num_e for e in trace.num_experts):
        raise ValueError(f"placement needs the same expert count in every MoE layer, got {trace.num_experts}")
    load = np.zeros((trace.num_layers, num_e))
    for layer, ids in enumerate(trace.expert_ids):
        flat = ids[ids >= 0].numpy()
        load[layer] = np.bincount(flat, minlength=num_e)
    transition = []
    for layer in range(trace.num_layers - 1):
        first = trace.expert_ids[layer][:, 0].numpy()
        nxt = trace.expert_ids[layer + 1].numpy()
        mat = np.zeros((num_e, num_e))
        for slot in range(nxt.shape[1]):
            ok = (first >= 0) & (nxt[:, slot] >= 0)
            np.add.at(mat, (first[ok], nxt[ok, slot]), 1)
        transition.append(mat)
    home = (trace.sequence_ids.numpy() % num_devices).astype(int)
    home_lne = np.zeros((trace.num_layers, num_devices, num_e))
    for layer, ids_tk in enumerate(trace.expert_ids):
        ids = ids_tk.numpy()
        for slot in range(ids.shape[1]):
            ok = ids[:, slot] >= 0
            np.add.at(home_lne[layer], (home[ok], ids[ok, slot]), 1)
    return TraceStats(load, transition, home_lne)


@dataclass
class Placement:
    """Which device hosts each expert, per MoE layer, with optional replicas.

    Attributes:
        device_of: ``[L][E]`` device of each expert's primary copy.
        replicas: ``[L]`` dict expert -> extra devices holding a replica (EPLB).
        method: how it was made.
    """

    device_of: list[list[int]]
    num_devices: int
    replicas: list[dict[int, list[int]]] = field(default_factory=list)
    method: str = ""

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialises the plan (and writes it when ``path`` is given)."""
        text = json.dumps(
            {
                "format": "moekit-placement",
                "version": 1,
                "num_devices": self.num_devices,
                "method": self.method,
                "device_of": self.device_of,
                "replicas": [{str(k): v for k, v in r.items()} for r in self.replicas],
            },
            indent=1,
        )
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> Placement:
        """Reads a plan written by :meth:`to_json`; ``ValueError`` on anything else."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable placement plan ({e})") from e
        if data.get("format") != "moekit-placement":
            raise ValueError(f"{path}: not a moekit placement plan")
        return cls(
            device_of=[list(map(int, row)) for row in data["device_of"]],
            num_devices=int(data["num_devices"]),
            replicas=[{int(k): list(v) for k, v in r.items()} for r in data.get("replicas", [])],
            method=data.get("method", ""),
        )


def round_robin(num_layers: int, num_experts: int, num_devices: int) -> Placement:
    """Expert e on device ``e % N`` in every layer."""
    _check_divides(num_experts, num_devices)
    return Placement(
        [[e % num_devices for e in range(num_experts)] for _ in range(num_layers)],
        num_devices,
        method="round_robin",
    )


def contiguous(num_layers: int, num_experts: int, num_devices: int) -> Placement:
    """Expert e on device ``e // (E / N)``: what plain expert parallelism does."""
    _check_divides(num_experts, num_devices)
    per = num_experts // num_devices
    return Placement(
        [[e // per for e in range(num_experts)] for _ in range(num_layers)], num_devices, method="contiguous"
    )


def _check_divides(num_experts: int, num_devices: int) -> None:
    if num_devices < 1 or num_experts % num_devices:
        raise ValueError(
            f"placement: {num_experts} experts do not divide over {num_devices} devices; "
            "choose a device count that divides the number of experts"
        )


@dataclass
class SimReport:
    """What a placement costs on a trace.

    Attributes:
        load_LN: assignments per layer and device.
        imbalance: mean over layers of max/mean device load.
        max_imbalance: worst layer's max/mean device load.
        token_moves: rows sent to another device, summed over layers.
        bytes_per_step: ``2 * token_moves * dim * bytes_per_value`` (send and return).
    """

    load_LN: np.ndarray
    imbalance: float
    max_imbalance: float
    token_moves: float
    bytes_per_step: float

    def as_dict(self) -> dict:
        """Plain numbers for JSON."""
        return {
            "imbalance": round(self.imbalance, 4),
            "max_imbalance": round(self.max_imbalance, 4),
            "token_moves": float(self.token_moves),
            "bytes_per_step": float(self.bytes_per_step),
        }


def _device_share(placement: Placement, layer: int, num_e: int) -> np.ndarray:
    """``[E, N]``: the share of expert e's work done on device d (replicas split load evenly)."""
    share = np.zeros((num_e, placement.num_devices))
    reps = placement.replicas[layer] if placement.replicas else {}
    for e, d in enumerate(placement.device_of[layer]):
        devs = [d, *reps.get(e, [])]
        for dd in devs:
            share[e, dd] += 1.0 / len(devs)
    return share


def simulate(
    stats: TraceStats, placement: Placement, dim: int = 1, bytes_per_value: int = 2, traffic: str = "stay"
) -> SimReport:
    """Per-device load, imbalance and all-to-all bytes of ``placement`` on a trace (see module docstring)."""
    _check_traffic(traffic)
    num_l, num_e = stats.load_LE.shape
    if len(placement.device_of) != num_l or any(len(r) != num_e for r in placement.device_of):
        raise ValueError(
            f"placement covers {len(placement.device_of)} layers x {len(placement.device_of[0])} experts, "
            f"the trace has {num_l} x {num_e}"
        )
    loads = np.stack(
        [stats.load_LE[layer] @ _device_share(placement, layer, num_e) for layer in range(num_l)]
    )
    ratios = loads.max(1) / np.maximum(loads.mean(1), 1e-9)
    if traffic == "home":
        moves = sum(
            float((stats.home_LNE[layer] * (1.0 - _device_share(placement, layer, num_e).T)).sum())
            for layer in range(num_l)
        )
        return SimReport(
            loads, float(ratios.mean()), float(ratios.max()), moves, 2.0 * moves * dim * bytes_per_value
        )
    # First MoE layer: a token at home device h moves unless its expert is hosted on h.
    share0 = _device_share(placement, 0, num_e)
    moves = float((stats.first_home_NE * (1.0 - share0.T)).sum())
    for layer, mat in enumerate(stats.transition):
        same = _device_share(placement, layer, num_e) @ _device_share(placement, layer + 1, num_e).T
        moves += float((mat * (1.0 - same)).sum())
    return SimReport(
        loads, float(ratios.mean()), float(ratios.max()), moves, 2.0 * moves * dim * bytes_per_value
    )


def _cost(report: SimReport, load_weight: float) -> float:
    return report.token_moves + load_weight * report.imbalance


def _check_traffic(traffic: str) -> None:
    if traffic not in ("stay", "home"):
        raise ValueError(
            f"traffic={traffic!r} is not valid; choose 'stay' (MoETuner) or 'home' (return-home EP)"
        )


def greedy(stats: TraceStats, num_devices: int, load_slack: float = 0.1, traffic: str = "stay") -> Placement:
    """Layer by layer: heaviest expert first, onto the device it shares most traffic with that
    still has a free slot and stays under the load bound (the least-loaded device otherwise)."""
    num_l, num_e = stats.load_LE.shape
    _check_divides(num_e, num_devices)
    per = num_e // num_devices
    device_of: list[list[int]] = []
    for layer in range(num_l):
        load = stats.load_LE[layer]
        bound = (1 + load_slack) * load.sum() / num_devices
        if layer == 0 or traffic == "home":
            affinity = stats.home_LNE[layer].T  # [E, N]
        else:
            prev = np.zeros((num_e, num_devices))
            prev[np.arange(num_e), device_of[-1]] = 1.0
            affinity = stats.transition[layer - 1].T @ prev  # [E, N]: tokens arriving from each device
        dev_load = np.zeros(num_devices)
        slots = np.full(num_devices, per)
        assign = [-1] * num_e
        for e in np.argsort(-load, kind="stable"):
            options = [d for d in range(num_devices) if slots[d] > 0]
            fits = [d for d in options if dev_load[d] + load[e] <= bound]
            pool = fits or [min(options, key=lambda d: dev_load[d])]
            d = max(pool, key=lambda d: (affinity[e, d], -dev_load[d]))
            assign[e] = d
            slots[d] -= 1
            dev_load[d] += load[e]
        device_of.append(assign)
    return Placement(device_of, num_devices, method="greedy")


def solve_ilp(
    stats: TraceStats,
    num_devices: int,
    load_slack: float = 0.1,
    time_limit_s: float = 10.0,
    traffic: str = "stay",
) -> Placement | None:
    """MoETuner-style ILP with HiGHS; returns None when no feasible solution is found in time.

    Variables: x[l,e,d] (expert e of layer l on device d) and c[l,i,j,d] <= x[l,i,d], x[l+1,j,d]
    (the pair i -> j is co-located on d). Constraints: one device per expert, E/N experts per
    device, per-layer device load <= (1 + load_slack) * mean. Objective: minimise token moves =
    home-device moves into the first layer + transitions between layers not co-located. Only
    pairs with nonzero transition counts get a c variable.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    num_l, num_e = stats.load_LE.shape
    _check_divides(num_e, num_devices)
    per = num_e // num_devices
    num_x = num_l * num_e * num_devices

    def xi(layer: int, e: int, d: int) -> int:
        return (layer * num_e + e) * num_devices + d

    _check_traffic(traffic)
    home_layers = range(num_l) if traffic == "home" else range(1)
    pairs = (
        []
        if traffic == "home"
        else [(layer, i, j) for layer, mat in enumerate(stats.transition) for i, j in zip(*np.nonzero(mat))]
    )
    num_c = len(pairs) * num_devices
    num_var = num_x + num_c
    obj = np.zeros(num_var)
    const_moves = float(sum(stats.home_LNE[layer].sum() for layer in home_layers))
    if traffic == "stay":
        const_moves += sum(float(m.sum()) for m in stats.transition)
    for layer in home_layers:
        for e in range(num_e):
            for d in range(num_devices):
                obj[xi(layer, e, d)] -= stats.home_LNE[layer, d, e]  # tokens already there need no move
    for p, (layer, i, j) in enumerate(pairs):
        for d in range(num_devices):
            obj[num_x + p * num_devices + d] -= stats.transition[layer][i, j]
    num_rows = num_l * num_e + num_l * num_devices * 2 + 2 * num_c
    a = lil_matrix((num_rows, num_var))
    lo, hi = np.zeros(num_rows), np.zeros(num_rows)
    r = 0
    for layer in range(num_l):
        for e in range(num_e):
            for d in range(num_devices):
                a[r, xi(layer, e, d)] = 1
            lo[r] = hi[r] = 1
            r += 1
    for layer in range(num_l):
        bound = (1 + load_slack) * stats.load_LE[layer].sum() / num_devices
        for d in range(num_devices):
            for e in range(num_e):
                a[r, xi(layer, e, d)] = 1
            lo[r] = hi[r] = per
            r += 1
            for e in range(num_e):
                a[r, xi(layer, e, d)] = stats.load_LE[layer, e]
            lo[r], hi[r] = -np.inf, bound
            r += 1
    for p, (layer, i, j) in enumerate(pairs):
        for d in range(num_devices):
            c = num_x + p * num_devices + d
            a[r, c], a[r, xi(layer, i, d)] = 1, -1
            lo[r], hi[r] = -np.inf, 0
            r += 1
            a[r, c], a[r, xi(layer + 1, j, d)] = 1, -1
            lo[r], hi[r] = -np.inf, 0
            r += 1
    integrality = np.concatenate([np.ones(num_x), np.zeros(num_c)])  # c is integral at optimum
    res = milp(
        obj,
        constraints=LinearConstraint(a.tocsr(), lo, hi),
        integrality=integrality,
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit_s, "disp": False},
    )
    if res.x is None:
        return None
    x = res.x[:num_x].reshape(num_l, num_e, num_devices)
    device_of = x.argmax(-1).tolist()
    plan = Placement(device_of, num_devices, method="ilp" + ("" if res.status == 0 else "(time limit)"))
    plan.extra_objective = const_moves + float(res.fun)  # type: ignore[attr-defined]
    return plan


def replicate_hot_experts(stats: TraceStats, placement: Placement, slots_per_device: int) -> Placement:
    """EPLB-style: fill spare slots (beyond E/N per device) with replicas of the hottest experts,
    each replica on the least-loaded device that does not hold that expert yet."""
    num_l, num_e = stats.load_LE.shape
    per = num_e // placement.num_devices
    spare = slots_per_device - per
    if spare < 0:
        raise ValueError(
            f"slots_per_device={slots_per_device} is below the {per} experts each device must hold"
        )
    replicas: list[dict[int, list[int]]] = []
    for layer in range(num_l):
        reps: dict[int, list[int]] = {}
        free = np.full(placement.num_devices, spare)
        for _ in range(spare * placement.num_devices):
            tmp = Placement(
                placement.device_of, placement.num_devices, [*replicas, reps] + [{}] * (num_l - layer - 1)
            )
            share = _device_share(tmp, layer, num_e)
            dev_load = stats.load_LE[layer] @ share
            per_copy = stats.load_LE[layer] / (1 + np.array([len(reps.get(e, [])) for e in range(num_e)]))
            placed = False
            for e in np.argsort(-per_copy, kind="stable"):
                holders = {placement.device_of[layer][e], *reps.get(e, [])}
                cands = [d for d in range(placement.num_devices) if free[d] > 0 and d not in holders]
                if cands:
                    d = min(cands, key=lambda d: dev_load[d])
                    reps.setdefault(int(e), []).append(int(d))
                    free[d] -= 1
                    placed = True
                    break
            if not placed:
                break
        replicas.append(reps)
    return Placement(
        placement.device_of, placement.num_devices, replicas, method=placement.method + "+replicas"
    )


@dataclass
class PlanResult:
    """The chosen plan and every candidate's simulated cost."""

    placement: Placement
    reports: dict[str, SimReport]
    seconds: dict[str, float]


def plan_placement(
    trace: RoutingTrace,
    num_devices: int,
    load_slack: float = 0.1,
    time_limit_s: float = 10.0,
    slots_per_device: int | None = None,
    dim: int = 1,
    load_weight: float = 0.0,
    traffic: str = "stay",
) -> PlanResult:
    """Plans a placement: best of ILP, greedy and round-robin under the simulated cost.

    The cost is token moves, plus ``load_weight`` times the mean imbalance; a candidate whose
    worst layer breaks the load bound loses to one that keeps it.
    """
    stats = trace_stats(trace, num_devices)
    num_l, num_e = stats.load_LE.shape
    candidates: dict[str, Placement] = {}
    seconds: dict[str, float] = {}
    for name, fn in (
        ("round_robin", lambda: round_robin(num_l, num_e, num_devices)),
        ("contiguous", lambda: contiguous(num_l, num_e, num_devices)),
        ("greedy", lambda: greedy(stats, num_devices, load_slack, traffic)),
        ("ilp", lambda: solve_ilp(stats, num_devices, load_slack, time_limit_s, traffic)),
    ):
        t0 = time.perf_counter()
        plan = fn()
        seconds[name] = time.perf_counter() - t0
        if plan is not None:
            candidates[name] = plan
    reports = {name: simulate(stats, p, dim, traffic=traffic) for name, p in candidates.items()}
    bound = 1 + load_slack + 1e-9

    def key(name: str) -> tuple:
        rep = reports[name]
        return (rep.max_imbalance > bound, _cost(rep, load_weight))

    best = min(reports, key=key)
    chosen = candidates[best]
    if slots_per_device is not None:
        chosen = replicate_hot_experts(stats, chosen, slots_per_device)
        reports[chosen.method] = simulate(stats, chosen, dim, traffic=traffic)
    return PlanResult(chosen, reports, seconds)


def brute_force(stats: TraceStats, num_devices: int, load_slack: float, traffic: str = "stay") -> float:
    """Minimum token moves over every balanced placement (tiny instances only; for tests)."""
    num_l, num_e = stats.load_LE.shape
    per = num_e // num_devices
    layer_options = []
    for layer in range(num_l):
        opts = []
        bound = (1 + load_slack) * stats.load_LE[layer].sum() / num_devices + 1e-9
        for assign in itertools.product(range(num_devices), repeat=num_e):
            if all(assign.count(d) == per for d in range(num_devices)):
                dev_load = np.bincount(assign, weights=stats.load_LE[layer], minlength=num_devices)
                if dev_load.max() <= bound:
                    opts.append(list(assign))
        layer_options.append(opts)
    best = float("inf")
    for combo in itertools.product(*layer_options):
        rep = simulate(stats, Placement(list(combo), num_devices), traffic=traffic)
        best = min(best, rep.token_moves)
    return best


def expert_permutation(placement: Placement, layer: int) -> list[int]:
    """Order of experts that makes ``placement`` contiguous: device 0's experts first, then device 1's..."""
    row = placement.device_of[layer]
    return sorted(range(len(row)), key=lambda e: (row[e], e))


def apply_placement(model, placement: Placement):
    """Reorders each MoE layer's experts so plain contiguous expert parallelism realises ``placement``.

    Expert weights, router rows, the selection bias and gating-residual matrices are permuted
    together, so the model computes the same function (tested). Returns the model.
    """
    import torch

    from moekit.layers import MoELayer, StackedExpertWeights

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if len(layers) != len(placement.device_of):
        raise ValueError(
            f"placement plans {len(placement.device_of)} MoE layers, the model has {len(layers)}; "
            "plan from a trace of this model"
        )
    prev_perm = None
    for index, layer in enumerate(layers):
        cfg = layer.config
        if len(placement.device_of[index]) != cfg.num_experts:
            raise ValueError(
                f"placement layer {index} has {len(placement.device_of[index])} experts, the model {cfg.num_experts}"
            )
        if cfg.num_total_experts != cfg.num_experts:
            raise ValueError("apply_placement: layers with zero-computation experts are not supported")
        if not isinstance(layer.experts, StackedExpertWeights):
            raise ValueError("apply_placement: apply the plan before sharding or offloading the experts")
        _check_divides(cfg.num_experts, placement.num_devices)
        perm = torch.tensor(expert_permutation(placement, index))
        with torch.no_grad():
            layer.experts.w_in.copy_(layer.experts.w_in[perm])
            layer.experts.w_out.copy_(layer.experts.w_out[perm])
            layer.router.weight.copy_(layer.router.weight[perm])
            if layer.router.bias is not None:
                layer.router.bias.copy_(layer.router.bias[perm])
            if layer.router.expert_bias is not None:
                layer.router.expert_bias.copy_(layer.router.expert_bias[perm])
            if layer.router.residual_weight is not None:
                w = layer.router.residual_weight[perm]
                if prev_perm is not None:
                    w = w[:, prev_perm]
                layer.router.residual_weight.copy_(w)
        prev_perm = perm
    return model


def synthetic_trace(
    num_layers: int = 4,
    num_experts: int = 8,
    num_tokens: int = 2000,
    top_k: int = 2,
    skew: float = 1.2,
    seed: int = 0,
) -> RoutingTrace:
    """A trace with a Zipf-skewed load and a strong cross-layer dependency (for tests and demos)."""
    import torch

    g = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_experts + 1) ** skew
    popularity /= popularity.sum()
    follow = [g.permutation(num_experts) for _ in range(num_layers)]
    ids, weights = [], []
    first = g.choice(num_experts, size=num_tokens, p=popularity)
    for layer in range(num_layers):
        if layer > 0:
            # Mostly follow the previous layer's first choice through a fixed mapping.
            jump = g.random(num_tokens) < 0.2
            first = np.where(jump, g.choice(num_experts, size=num_tokens, p=popularity), follow[layer][first])
        others = np.stack(
            [
                (first + 1 + g.integers(0, num_experts - 1, num_tokens)) % num_experts
                for _ in range(top_k - 1)
            ],
            -1,
        )
        ids.append(torch.tensor(np.concatenate([first[:, None], others], -1)))
        weights.append(torch.full((num_tokens, top_k), 1.0 / top_k))
    return RoutingTrace(
        tokens=torch.arange(num_tokens) % 97,
        sequence_ids=torch.arange(num_tokens) // 64,
        expert_ids=ids,
        weights=weights,
        layer_indices=list(range(num_layers)),
        num_experts=[num_experts] * num_layers,
        model="synthetic",
    )
