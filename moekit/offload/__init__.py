"""moekit.offload: expert offloading. Experts live in a store and are loaded on demand into one
byte-budgeted cache; a routing trace can be replayed to simulate any cache, policy and hardware.

Contract:
    ``offload_model(model, store_dir, cache_bytes, policy="lru", prefetch=None, bandwidth=None,
    trace=None, fallback=None) -> ExpertCache`` gives every MoE layer an :class:`OffloadedExperts`
    storage and an :class:`OffloadDispatcher`, in place. Offloaded generation gives the same
    tokens as resident generation (the same matmuls; tested bit-exactly in float64).
    ``offload_quantized_model`` does the same for a ``moekit.compress``-quantized model, with
    packed codes in the store.

Promises:
    * A store is reused only for the weights it was written from: ``fingerprint.json`` holds a
      hash of the tensors' names, dtypes, shapes and bytes; a store of other weights (or an older
      store without one) is rebuilt with a warning; a folder holding other files is refused.
    * The budget counts every expert byte alive: resident, reserved by a load in flight, or
      evicted but still referenced (tracked by weak references). Nothing in moekit keeps a
      loaded expert past its compute; if a caller does (e.g. an autograd graph), the cache warns.
    * A budget below one token's working set (``working_set_bytes``) warns with the minimum.

Layout:
    store.py      MappedSafetensors, StorageLink (demand-priority link, bandwidth throttle),
                  ExpertStore (one safetensors file per layer + fingerprint), weights_fingerprint
    cache.py      ExpertCache (one budget, LRU/LFU, background prefetch), OffloadStats
    experts.py    OffloadedExperts (storage, one loop for every store kind), OffloadDispatcher
                  (prefetch), predictors (pregate, trace statistics), offload_model
    quantized.py  QuantizedExpertStore, offload_quantized_model
    ring.py       LayerRing (SE-MoE ring memory: S whole-layer sections, the next layers loading
                  on one copy thread while one computes), RingExperts, RingDispatcher,
                  ring_offload_model (``moekit generate --ring-sections S``)
    simulate.py   trace replay under any policy, cache size, prefetcher and hardware, with Belady;
                  ring_timeline / ring_period / ring_sections (the ring, and SE-MoE's section rule)

To add a store kind: give it ``kind``, ``num_experts``, ``expert_bytes``, ``read`` (what the
cache holds), ``compute`` (run one loaded expert into an output slice), ``tensors`` and
``model_fingerprint``, and install it with ``serve_from_store``. To add an eviction policy, add
it to ``cache.ExpertCache`` and to ``simulate._Cache`` (``tests/test_simulate.py`` keeps the
replay matching the real cache). A predictor is ``f(layer_index, x_TD, expert_ids_TK) ->
next-layer experts``.
"""

from moekit.offload.cache import ExpertCache, OffloadStats
from moekit.offload.experts import (
    OffloadDispatcher,
    OffloadedExperts,
    make_predictor,
    offload_model,
    pregate_predictor,
    prepare_store,
    serve_from_store,
    transition_predictor,
    working_set_bytes,
)
from moekit.offload.quantized import QuantizedExpertStore, offload_quantized_model
from moekit.offload.ring import LayerRing, RingDispatcher, RingExperts, RingStats, ring_offload_model
from moekit.offload.store import ExpertStore, MappedSafetensors, StorageLink, weights_fingerprint

__all__ = [
    "ExpertCache",
    "ExpertStore",
    "LayerRing",
    "MappedSafetensors",
    "OffloadDispatcher",
    "OffloadStats",
    "OffloadedExperts",
    "QuantizedExpertStore",
    "RingDispatcher",
    "RingExperts",
    "RingStats",
    "StorageLink",
    "make_predictor",
    "offload_model",
    "offload_quantized_model",
    "pregate_predictor",
    "prepare_store",
    "ring_offload_model",
    "serve_from_store",
    "transition_predictor",
    "weights_fingerprint",
    "working_set_bytes",
]
