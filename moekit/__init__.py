"""moekit: a PyTorch toolkit for Mixture-of-Experts models.

Parts (one folder each; imports only go to a lower floor, ``tests/test_floors.py``):
    layers/    the MoE layer: routers, experts, dispatch backends, losses
    blocks/    norms, RoPE, attention (GQA, MLA), KV cache: what every family builds on
    models/    model families built on ``layers`` and ``blocks`` (decoder LM, ...), generate
    train/     data, tokenizer, trainer, checkpoints
    convert/   Hugging Face import/export
    compress/  quantization and pruning
    infer/     SCMoE decoding, offloading, serving
    parallel/  expert parallelism and placement planning
    analysis/  routing traces, load and specialisation reports
    cli/       the ``moekit`` command
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level API: ``moekit.from_pretrained`` imports torch and the loader on first use."""
    if name == "from_pretrained":
        from moekit.loader import from_pretrained

        return from_pretrained
    if name == "load_model_and_tokenizer":
        from moekit.loader import load_model_and_tokenizer

        return load_model_and_tokenizer
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
