"""Trace replay: Belady is optimal, policies rank as expected, and the replay mirrors real offloading."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis import RoutingTrace
from moekit.offload.simulate import (
    HardwareProfile,
    access_steps,
    belady_hit_rate,
    oracle_prefetcher,
    replay,
    transition_prefetcher,
)
from moekit.parallel.placement import synthetic_trace


def _trace_from_steps(steps, num_experts):
    return RoutingTrace.from_steps(steps, num_experts)


def _brute_force_hits(seq, capacity):
    best = 0

    def go(i, resident, hits):
        nonlocal best
        if hits + (len(seq) - i) <= best:
            return
        if i == len(seq):
            best = max(best, hits)
            return
        key = seq[i]
        if key in resident:
            go(i + 1, resident, hits + 1)
        elif len(resident) < capacity:
            go(i + 1, resident | {key}, hits)
        else:
            for victim in resident:
                go(i + 1, (resident - {victim}) | {key}, hits)

    go(0, frozenset(), 0)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_belady_is_optimal_by_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    steps = [[[int(torch.randint(0, 4, (1,), generator=g))] for _ in range(2)] for _ in range(7)]
    trace = _trace_from_steps(steps, 4)
    seq = [(layer, e) for step in access_steps(trace) for layer, ex in enumerate(step) for e in ex]
    assert belady_hit_rate(trace, 3) * len(seq) == pytest.approx(_brute_force_hits(seq, 3))


def test_policies_against_belady():
    trace = synthetic_trace(num_layers=4, num_experts=8, num_tokens=400, skew=1.0)
    hw = HardwareProfile(storage_bw=1e9, mem_bw=2e10)
    rates = {p: replay(trace, 12 * 1000, 1000, hw, policy=p).hit_rate for p in ("lru", "lfu", "belady")}
    assert rates["belady"] >= rates["lru"] and rates["belady"] >= rates["lfu"]
    assert rates["belady"] == pytest.approx(belady_hit_rate(trace, 12), abs=1e-9)


def test_prefetch_and_bandwidth_change_modelled_time():
    trace = synthetic_trace(num_layers=4, num_experts=8, num_tokens=200)
    hw = HardwareProfile(storage_bw=1e9, mem_bw=1e10, non_expert_s=1e-3)
    base = replay(trace, 8 * 10**6, 10**6, hw)
    oracle = replay(trace, 8 * 10**6, 10**6, hw, prefetch=oracle_prefetcher(trace))
    stats = replay(trace, 8 * 10**6, 10**6, hw, prefetch=transition_prefetcher(trace))
    assert oracle.seconds < base.seconds and oracle.hit_rate > base.hit_rate
    assert stats.prefetches > 0 and 0 < stats.prefetch_used <= stats.prefetches
    fast = replay(trace, 8 * 10**6, 10**6, HardwareProfile(storage_bw=1e15, mem_bw=1e10, non_expert_s=1e-3))
    assert fast.seconds < base.seconds
    with pytest.raises(ValueError, match="policy="):
        replay(trace, 10**6, 10**6, hw, policy="fifo")


def test_edgemoe_policy_by_hand():
    """3 layers, room for 2 experts. Token 0 uses expert 0 in every layer; at layer 2's miss both
    residents were used once, so LRU evicts the oldest, (0, 0), while edgemoe keeps the expert whose
    layer runs next ((0, 0): priority 1 * 3/3; (1, 0): 1 * 2/3) and evicts (1, 0). Token 1's layer 0
    then hits only under edgemoe."""
    trace = _trace_from_steps([[[0], [0], [0]], [[0], [1], [1]]], 2)
    hw = HardwareProfile(1e9, 1e10)
    edge = replay(trace, 2 * 100, 100, hw, policy="edgemoe")
    lru = replay(trace, 2 * 100, 100, hw, policy="lru")
    assert (edge.hits, lru.hits) == (1, 0)
    assert edge.hits + edge.misses == 6


@pytest.mark.parametrize("policy", ["lru", "lfu", "edgemoe"])
def test_replay_counts_match_real_offloading(tmp_path, policy):
    """Token-by-token decode with the real cache gives the hits and misses the replay predicts."""
    from moekit.layers import MoEConfig
    from moekit.models import ModelConfig, MoEForCausalLM
    from moekit.offload import offload_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=50,
        dim=16,
        num_layers=3,
        num_heads=2,
        ffn_dim=32,
        moe=MoEConfig(dim=16, ffn_dim=8, num_experts=6),
    )
    model = MoEForCausalLM(cfg).eval()
    per = 2 * 16 * 8 * 4 + 16 * 8 * 4
    ids_per_step = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, out, store=ids_per_step: store.append(out.routing.expert_ids)
        )
        for layer in model.moe_layers
    ]
    cache = offload_model(model, tmp_path / "s", cache_bytes=7 * per, policy=policy)
    tokens = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        past = None
        for t in range(tokens.shape[1]):
            out = model(tokens[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
    for h in hooks:
        h.remove()
    steps = [[ids_per_step[t * 3 + layer][0].tolist() for layer in range(3)] for t in range(12)]
    sim = replay(_trace_from_steps(steps, 6), 7 * per, per, HardwareProfile(1e9, 1e10), policy=policy)
    assert (sim.hits, sim.misses) == (cache.stats.hits, cache.stats.misses)
    cache.close()


@pytest.mark.parametrize(
    "predicted, seconds, prefetches, used",
    [
        # (1, 2) queued first: the demand for (0, 0) runs 0-1 s, then (1, 1), still queued behind
        # it, is cancelled and loaded on demand 1-2 s. A FIFO link would end at 3 s.
        ([2, 1], 2.0, 1, 0),
        # (1, 1) is the loading head: paused during the demand 0-1 s, it finishes 1-2 s.
        ([1], 2.0, 1, 1),
    ],
)
def test_replay_link_gives_demand_loads_priority(predicted, seconds, prefetches, used):
    """Hand-computed timelines of StorageLink's rules: 1-byte experts over a 1 byte/s link."""
    trace = _trace_from_steps([[[0], [1]]], num_experts=4)
    hw = HardwareProfile(storage_bw=1.0, mem_bw=float("inf"))
    result = replay(trace, 10, 1, hw, prefetch=lambda token, layer, experts: predicted)
    assert result.seconds == pytest.approx(seconds)
    assert (result.prefetches, result.prefetch_used, result.misses) == (prefetches, used, 2)
