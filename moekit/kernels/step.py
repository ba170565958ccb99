"""The whole-step decode kernel (``csrc/decode_step.cpp``): every layer of a batch-1 step in one call.

Shape legend: L = decoder layers, D = model width, H = query heads, G = key/value heads, Dh =
head width, Dr = rotary width, C = cache capacity, K = keys after this token, V = vocabulary.

The kernel is a TorchScript custom class, ``torch.classes.moekit.DecodeStepPlan``: built once
per session from the model's weights (so a step passes only the token, the cache and the RoPE
rows), with each weight matrix either float32 or moekit's quantized codes. This module only loads
it and describes its argument layout (:data:`SLOTS`, :data:`INTS`,
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
    "num_expert_matrices",
)
#: per-layer floats.
FLOATS = ("input_norm_eps", "post_attention_norm_eps", "qk_norm_eps", "routed_scaling_factor")


#: the ``bits`` of a float32 weight.
FLOAT_BITS = 32


@functools.cache
def _load() -> bool:
    return load_ops("decode_step")


def step_available() -> bool:
    """True when the whole-step kernel is built and loaded and ``MOEKIT_KERNELS`` allows it."""
    return kernels_enabled() and _load()


def new_plan(tensors, scales, zeros, bits, groups, ints, floats, dims):
    """``torch.classes.moekit.DecodeStepPlan`` over these parallel lists (see the C++ source's
    header for the layout); raises ``RuntimeError`` naming the first weight that does not fit."""
    return torch.classes.moekit.DecodeStepPlan(tensors, scales, zeros, bits, groups, ints, floats, dims)
