"""moekit.infer: running models as fast as the hardware allows.

Contract: everything here takes a built model and changes how it runs, never what the model
code is. Modules:

    generate.py   decode sessions with a preallocated KV cache, a lean decode path (checked
                  against the model's own layers), sampling, ragged batches
    decoding.py   SCMoE self-contrast decoding and weak-routing overrides; dynamic k
    server.py     the OpenAI-compatible FastAPI app (``moekit serve``)

Expert offloading and its simulator live in :mod:`moekit.offload`.
"""
