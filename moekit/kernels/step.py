"""The whole-step fp32 decode kernel (``csrc/decode_step.cpp``): every layer of a batch-1 step in one call.

Shape legend: L = decoder layers, D = model width, H = query heads, G = key/value heads, Dh =
head width, Dr = rotary width, C = cache capacity, K = keys after this token, V = vocabulary.

This module only loads the op and describes its argument layout (:data:`SLOTS`, :data:`INTS`,
:data:`FLOATS`); what a model must look like to use it, and the packing of its weights, live
with the models (:mod:`moekit.models.native_step`), because this package sits below them.
The reference the op is tested against is the eager fast path
(:func:`moekit.models.decode.fast_layers_step`), which it must match up to float rounding.
"""

from __future__ import annotations

import functools

import torch

from moekit.kernels.build import kernels_enabled, load_ops

#: per-layer tensor slots of ``weights`` (an absent weight is an empty tensor).
SLOTS = (
    "input_norm",
    "q_proj",
    "q_bias",
    "k_proj",
    "k_bias",
    "v_proj",
    "v_bias",
    "q_norm",
    "k_norm",
    "o_proj",
    "o_bias",
    "post_attention_norm",
    "router",
    "router_bias",
    "expert_bias",
    "experts_w_in",
    "experts_w_out",
    "ffn_w_in",
    "ffn_w_in_bias",
    "ffn_w_out",
    "ffn_w_out_bias",
    "shared_gate",
)
#: per-layer ints (``route_kind``: 0 softmax scores, 1 sigmoid scores, 2 softmax over the chosen
#: logits; ``qk_norm``: 0 none, 1 per head before RoPE, 2 per head after it).
INTS = (
    "is_moe",
    "top_k",
    "expert_activation",
    "ffn_activation",
    "route_kind",
    "norm_topk_prob",
    "qk_norm",
    "rope_interleave",
)
#: per-layer floats.
FLOATS = ("input_norm_eps", "post_attention_norm_eps", "qk_norm_eps", "routed_scaling_factor")


@functools.cache
def _load() -> bool:
    if not load_ops("decode_step"):
        return False

    @torch.library.register_fake("moekit::decode_step_f32")
    def _fake(
        x, weights, ints, floats, keys, values, num_keys, cos, sin, final_norm, eps, lm_head, bias, dims
    ):
        return x.new_empty(1, lm_head.shape[0])

    return True


def step_available() -> bool:
    """True when the whole-step op is built and loaded and ``MOEKIT_KERNELS`` allows it."""
    return kernels_enabled() and _load()
