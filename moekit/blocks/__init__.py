"""moekit.blocks: the reusable pieces of a transformer that are not MoE: norms, RoPE, attention, KV cache.

Contract:
    Every block is an ``nn.Module`` built from its own small config dataclass
    (:class:`RopeConfig`, :class:`AttentionConfig`, :class:`MLAConfig`) or from explicit
    arguments, never from a model family's config, so any family (the decoder LM, vision,
    time-series, state-space hybrids) imports them without importing another family. This
    package imports only ``moekit.config`` and ``moekit.layers`` (floor 2,
    ``tests/test_floors.py``). Parameter names are part of the contract: converters and saved
    folders depend on them (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``q_norm``,
    ``k_norm``, MLA's ``q_a_proj``/``q_a_norm``/``q_b_proj``/``kv_a_proj``/``kv_a_norm``/
    ``kv_b_proj``, ``RMSNorm.weight``); never rename one.

    Attention blocks share one calling convention:
    ``attn(x_BSD, cos_B1Sd, sin_B1Sd, mask_B1SK | None, cache: KVCache | None) -> [B, S, D]``,
    with the RoPE tables from :class:`RotaryEmbedding` and the mask from
    :func:`build_attention_mask` (None = plain causal). ``layer_idx`` picks the block's slot in
    a shared :class:`KVCache`.

Layout:
    config.py     RopeConfig (rope scaling: linear, YaRN, llama3), AttentionConfig, MLAConfig,
                  mla_softmax_scale, check_rope_scaling
    norm.py       RMSNorm (float32 compute)
    rope.py       RotaryEmbedding (float32 tables, grown on demand), apply_rotary, deinterleave
    attention.py  Attention (GQA, q/k norm, qkv bias, sinks), build_attention_mask (padding, sliding
                  window, chunks)
    mla.py        MLAttention (DeepSeek multi-head latent attention, latent KV cache)
    cache.py      KVCache (preallocated, grown in chunks; Mamba layers keep a MambaState there),
                  RaggedKVCache (a continuous batch's rows of their own lengths)
    encoder.py    SelfAttention (encoders: biased q/k/v/o, no RoPE, bidirectional or causal; ViT, CLIP)
    ssm.py        MambaMixer (Jamba's selective SSM), MambaConfig, scan_sequential /
                  scan_chunked / scan_step (the reference loop, the chunked scan, decode),
                  BidirectionalMamba (Vision Mamba: a forward and a backward scan, averaged)

    The Mamba mixer's convention is ``mixer(x_BSD, token_mask_BS | None, cache) -> [B, S, D]``
    (no RoPE, no attention mask: padding is a ``[B, S]`` token mask).

To add a block: give it a config dataclass here (validated in ``__post_init__``, errors naming
the field), keep to the calling convention above if it is an attention, export it here, and
test it against a slow reference (``tests/test_blocks.py``). A model family's config builds the
block's config (e.g. ``ModelConfig.attention_config()``); the block never sees the family's.
"""

from moekit.blocks.attention import Attention, attend_with_sinks, build_attention_mask
from moekit.blocks.cache import KVCache, MambaState, RaggedKVCache
from moekit.blocks.config import (
    AttentionConfig,
    LightningConfig,
    MLAConfig,
    MoAConfig,
    RopeConfig,
    mla_softmax_scale,
)
from moekit.blocks.encoder import SelfAttention
from moekit.blocks.lightning import LightningAttention, lightning_scan, lightning_slopes
from moekit.blocks.mla import MLAttention
from moekit.blocks.moa import MixtureOfAttentionHeads
from moekit.blocks.norm import RMSNorm
from moekit.blocks.rope import RotaryEmbedding, apply_rotary, deinterleave
from moekit.blocks.ssm import (
    BidirectionalMamba,
    MambaConfig,
    MambaMixer,
    cumsum_chunks,
    scan_chunked,
    scan_method,
    scan_sequential,
    scan_step,
)

__all__ = [
    "Attention",
    "BidirectionalMamba",
    "AttentionConfig",
    "KVCache",
    "RaggedKVCache",
    "MLAConfig",
    "LightningAttention",
    "LightningConfig",
    "lightning_scan",
    "lightning_slopes",
    "MoAConfig",
    "MixtureOfAttentionHeads",
    "MLAttention",
    "MambaConfig",
    "MambaMixer",
    "MambaState",
    "RMSNorm",
    "RopeConfig",
    "RotaryEmbedding",
    "SelfAttention",
    "apply_rotary",
    "attend_with_sinks",
    "build_attention_mask",
    "cumsum_chunks",
    "deinterleave",
    "mla_softmax_scale",
    "scan_chunked",
    "scan_method",
    "scan_sequential",
    "scan_step",
]
