"""moekit.infer: running models as fast as the hardware allows.

Contract: everything here takes a built model and changes how it runs, never what the model
code is. Modules:

    generate.py   decode sessions with a preallocated KV cache, a lean decode path (checked
                  against the model's own layers), sampling, ragged batches
    decoding.py   SCMoE self-contrast decoding and weak-routing overrides; dynamic k
    offload.py    expert store (mmap safetensors, bandwidth throttle), one byte-budgeted cache,
                  LRU/LFU, pre-gating and trace-statistics prefetch, counters
    simulate.py   trace replay of offloading under any policy, cache size, prefetcher and
                  hardware profile, with Belady's optimum
    server.py     the OpenAI-compatible FastAPI app (``moekit serve``)

To add an offloading policy, add it to ``offload.ExpertCache`` and to ``simulate._Cache`` (the
replay must keep matching the real cache's hits and misses: ``tests/test_simulate.py``). To add
a predictor, write ``f(layer_index, x_TD, expert_ids_TK) -> next-layer experts``.
"""
