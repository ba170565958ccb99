"""Expert offloading: exact tokens, the byte budget holds, counters and prefetch behave."""

from __future__ import annotations

import pytest
import torch

from moekit.infer.offload import ExpertCache, ExpertStore, offload_model
from moekit.layers import MoEConfig
from moekit.models import ModelConfig, MoEForCausalLM


def _model(dtype=torch.float64, num_layers=3):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=num_layers,
        num_heads=4,
        ffn_dim=64,
        moe=MoEConfig(dim=32, ffn_dim=24, num_experts=8, top_k=2),
    )
    model = MoEForCausalLM(cfg).to(dtype).eval()
    return model


def _expert_bytes(model):
    layer = model.moe_layers[0]
    return (
        layer.experts.w_in[0].numel() + layer.experts.w_out[0].numel()
    ) * layer.experts.w_in.element_size()


@pytest.mark.parametrize("policy, prefetch", [("lru", None), ("lfu", None), ("lru", "pregate")])
def test_offloaded_generation_is_exact(tmp_path, policy, prefetch):
    model = _model()
    prompt = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12)
        logits = model(prompt).logits
    per = _expert_bytes(model)
    cache = offload_model(model, tmp_path / "store", cache_bytes=12 * per, policy=policy, prefetch=prefetch)
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=12)
        torch.testing.assert_close(model(prompt).logits, logits, rtol=0, atol=0)
    assert torch.equal(got, want)
    stats = cache.stats
    assert stats.misses > 0 and stats.hits > 0
    assert cache.max_used_bytes <= 12 * per
    assert stats.bytes_read >= stats.misses * per
    if prefetch:
        assert stats.prefetches > 0 and 0 < stats.prefetch_accuracy <= 1
    cache.close()


def test_all_experts_resident_means_only_cold_misses(tmp_path):
    model = _model(num_layers=2)
    per = _expert_bytes(model)
    cache = offload_model(model, tmp_path / "s", cache_bytes=16 * per)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 64, (4, 16)))
    assert cache.stats.misses == 16  # each of 2 x 8 experts loaded once
    cache.close()


def test_budget_errors_and_bad_options(tmp_path):
    model = _model(num_layers=2)
    per = _expert_bytes(model)
    with pytest.raises(ValueError, match="below one expert"):
        offload_model(_model(num_layers=2), tmp_path / "a", cache_bytes=per - 1)
    with pytest.raises(ValueError, match="prefetch="):
        offload_model(model, tmp_path / "b", cache_bytes=4 * per, prefetch="magic")
    with pytest.raises(ValueError, match="needs a routing trace"):
        offload_model(_model(num_layers=2), tmp_path / "c", cache_bytes=4 * per, prefetch="stats")
    with pytest.raises(FileNotFoundError, match="no expert store"):
        ExpertStore(tmp_path / "empty")


def test_throttled_store_respects_bandwidth(tmp_path):
    import time

    model = _model(dtype=torch.float32, num_layers=2)
    ExpertStore.write(model, tmp_path / "s")
    per = _expert_bytes(model)
    store = ExpertStore(tmp_path / "s", bandwidth=per / 0.02)  # 20 ms per expert
    t0 = time.perf_counter()
    for e in range(5):
        store.read(0, e)
    assert time.perf_counter() - t0 >= 0.1


def test_stats_prefetch_learns_from_a_trace(tmp_path):
    from moekit.analysis import record_trace

    model = _model(num_layers=3)
    batches = [(torch.randint(0, 64, (4, 32)), None) for _ in range(4)]
    trace = record_trace(model, batches)
    per = _expert_bytes(model)
    cache = offload_model(model, tmp_path / "s", cache_bytes=6 * per, prefetch="stats", trace=trace)
    with torch.no_grad():
        model.generate(torch.randint(0, 64, (1, 4)), max_new_tokens=8)
    assert cache.stats.prefetches > 0 and cache.stats.prefetch_used > 0
    cache.close()


def test_demand_load_preempts_a_prefetch_on_the_link(tmp_path):
    """A miss waits at most one chunk for a prefetch in flight, not for the whole prefetch."""
    import threading
    import time

    model = _model(dtype=torch.float32, num_layers=2)
    ExpertStore.write(model, tmp_path / "s")
    per = _expert_bytes(model)
    store = ExpertStore(tmp_path / "s", bandwidth=per / 0.3)  # 300 ms per expert
    store.link.chunk_bytes = per // 10  # ~30 ms chunks
    done = {}

    def prefetch():
        store.read(0, 0, urgent=lambda: False)
        done["prefetch"] = time.perf_counter()

    worker = threading.Thread(target=prefetch)
    t0 = time.perf_counter()
    worker.start()
    time.sleep(0.05)
    w_in, w_out, nbytes = store.read(0, 1)  # demand
    demand_done = time.perf_counter()
    worker.join()
    assert nbytes == per and torch.equal(w_in, model.moe_layers[0].experts.w_in[1])
    # FIFO would finish the demand after both transfers (>= 0.6 s); priority after ~0.05 + 0.3 s
    # plus at most one chunk.
    assert demand_done - t0 < 0.5, demand_done - t0
    assert done["prefetch"] > demand_done
    assert done["prefetch"] - t0 >= 0.6 - 0.01  # the link's total rate is unchanged


def test_queued_prefetch_demanded_becomes_a_demand_load(tmp_path):
    model = _model(dtype=torch.float32, num_layers=2)
    per = _expert_bytes(model)
    ExpertStore.write(model, tmp_path / "s")
    cache = ExpertCache(ExpertStore(tmp_path / "s", bandwidth=per / 0.05), budget_bytes=8 * per)
    cache.prefetch([(0, 0), (0, 1), (0, 2)])
    w_in, _ = cache.get(0, 2)  # queued behind two prefetches: cancelled and loaded on demand
    assert torch.equal(w_in, model.moe_layers[0].experts.w_in[2])
    cache.close()
    stats = cache.stats
    assert stats.prefetches == 2 and stats.misses == 1 and stats.bytes_read == 3 * per
    assert cache.get(0, 0)[0] is not None and cache.stats.prefetch_used == 1
