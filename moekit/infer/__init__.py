"""moekit.infer: running models as fast as the hardware allows.

Contract: everything here takes a built model and changes how it runs, never what the model
code is. Floor 6 (``tests/test_floors.py``): it may import config, layers, blocks, models,
convert, compress, parallel, offload and loader, never train, surgery or cli. Plain decoding
(``generate``, ``DecodeSession``, ``Sampler``, ``iter_tokens``) lives in ``moekit.models``;
strategies here are score sources for ``moekit.models.generation.iter_tokens`` (objects with
``prefill() -> [B, V]`` and ``step(ids_B) -> [B, V]``) built on ``DecodeSession``. Modules:

    decoding.py   SCMoE self-contrast decoding and weak-routing overrides; dynamic k
    server.py     the OpenAI-compatible FastAPI app (``moekit serve``); server_engine.py its
                  admission, tokenization and worker; server_batch.py its continuous batch

To add a decoding strategy, write a score source as above (``decoding.SelfContrastSession`` is
the example) and pass it as ``generate(..., source=...)``; test it against plain greedy decoding
in a setting where both must agree (``tests/test_decoding.py``).
Expert offloading and its simulator live in :mod:`moekit.offload`.
"""
