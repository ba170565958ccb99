"""The whole-step native decode: a batch-1 fp32 step of a decoder LM in one kernel call.

Shape legend: D = model width, Dr = rotary width, K = keys after this token, V = vocabulary.

:class:`~moekit.models.decode.DecodeSession` uses it for batch-1, unpadded float32 sessions on
the fast path when :func:`native_step_plan` can describe the model to the kernel
(``moekit/kernels/csrc/decode_step.cpp``). The kernel runs every decoder layer, the final norm
and the LM head inside one OpenMP team, so a step pays one dispatch instead of ~150 and the
threads stay together between the GEMVs. It covers the common decoder:

* pre-norm RMSNorm layers with GQA attention, RoPE (rotate-half, partial or interleaved), optional
  q/k/v/o biases and per-head q/k norms, full causal attention at the default scale;
* token-choice top-k routers (softmax or sigmoid scores, or a softmax over the chosen logits;
  bias, selection-only expert bias, ``norm_topk_prob``, ``routed_scaling_factor``) over stacked
  experts, with an optional (gated) shared expert; dense FFN layers;
* the activations of :data:`~moekit.kernels.linear.MOE_ACTIVATIONS`.

Anything else keeps the eager fast path, which is the reference the kernel is tested against
(``tests/test_native_step.py``). ``MOEKIT_KERNELS=0`` turns it off with the other kernels.

Adding a feature: give it a slot in :mod:`moekit.kernels.step` and in the C++ enums (in the
same order), fill it in :func:`_layer_args`, and remove its refusal from :func:`_refusal`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.blocks import Attention, KVCache, RMSNorm
from moekit.kernels.linear import MOE_ACTIVATIONS
from moekit.kernels.step import FLOATS, INTS, SLOTS, step_available
from moekit.layers import MoELayer
from moekit.layers.experts import FeedForward, StackedExpertWeights
from moekit.layers.router import Router
from moekit.layers.strategies import TopKLogitSoftmaxRouting, TopKRouting
from moekit.models.decoder import MoEForCausalLM

_EMPTY = torch.empty(0)


@dataclass
class NativeStepPlan:
    """The packed, model-wide arguments of ``torch.ops.moekit.decode_step_f32`` (built once per session).

    Attributes:
        weights: ``len(SLOTS)`` tensors per layer (views of the model's parameters, never copies).
        ints, floats: per-layer settings in :data:`~moekit.kernels.step.INTS` / ``FLOATS`` order.
        dims: ``[H, G, Dh]``.
        final_norm, final_eps, lm_head, lm_bias: the output head (``lm_bias`` empty when absent).
        assignments: routed (token, expert) pairs one step computes.
    """

    weights: list[Tensor]
    ints: list[int]
    floats: list[float]
    dims: list[int]
    final_norm: Tensor
    final_eps: float
    lm_head: Tensor
    lm_bias: Tensor
    assignments: int


def _f32(*tensors: Tensor | None) -> bool:
    return all(
        t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
        for t in tensors
    )


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and _f32(module.weight, module.bias)


def _ffn_refusal(ffn: nn.Module) -> str | None:
    if type(ffn) is not FeedForward or ffn.config.activation not in MOE_ACTIVATIONS:
        return "an FFN the kernel does not implement"
    if not (_plain_linear(ffn.w_in) and _plain_linear(ffn.w_out)):
        return "a quantized or wrapped FFN projection"
    return None


def _moe_refusal(mlp: MoELayer) -> str | None:
    cfg, router = mlp.config, mlp.router
    if not mlp.supports_fast_decode or type(router) is not Router or router.centroids is not None:
        return "a router or storage off the fast path"
    strategy = router.strategy
    if strategy is TopKRouting:
        if cfg.num_expert_groups > 1 or cfg.score_func not in ("softmax", "sigmoid"):
            return "group-limited routing"
    elif strategy is not TopKLogitSoftmaxRouting:
        return f"the {strategy.name} router"
    if not _f32(router.weight, router.bias, router.expert_bias):
        return "a router that is not float32"
    experts = mlp.experts
    stacks = experts.stacked()
    if type(experts) is not StackedExpertWeights or stacks is None or not _f32(*stacks):
        return "experts not held as float32 stacks"
    if experts.activation not in MOE_ACTIVATIONS:
        return f"the {experts.activation} expert activation"
    if cfg.shared_ffn_dim:
        refusal = _ffn_refusal(mlp.shared)
        if refusal or (mlp.shared_gate is not None and not _plain_linear(mlp.shared_gate)):
            return refusal or "a quantized shared-expert gate"
    return None


def _refusal(model: MoEForCausalLM) -> str | None:
    """Why the kernel cannot run ``model`` (None when it can). Callers have already checked
    :func:`~moekit.models.decode.fast_decode_supported`."""
    if model.config.pregated:
        return "pregated routing"
    if type(model.norm) is not RMSNorm or not _plain_linear(model.lm_head) or not _f32(model.norm.weight):
        return "an output head the kernel does not implement"
    for layer in model.layers:
        attn = layer.self_attn
        if type(attn) is not Attention or not attn.rope or attn.sinks is not None:
            return "attention the kernel does not implement"
        if attn.softmax_scale is not None or attn.clip_qkv is not None or attn.temperature_scale is not None:
            return "a non-default attention scale"
        if attn.qk_norm not in ("none", "per_head"):
            return f"the {attn.qk_norm} q/k norm"
        if not all(_plain_linear(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
            return "a quantized or wrapped attention projection"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not RMSNorm or not _f32(norm.weight):
                return "a norm the kernel does not implement"
        refusal = _moe_refusal(layer.mlp) if layer.is_moe else _ffn_refusal(layer.mlp)
        if refusal:
            return refusal
    return None


def _weight(t: Tensor | None) -> Tensor:
    return _EMPTY if t is None else t.detach()


def _layer_args(layer: nn.Module, moe_k: int | None) -> tuple[list[Tensor], list[int], list[float], int]:
    attn: Attention = layer.self_attn
    slots = dict.fromkeys(SLOTS, _EMPTY)
    slots.update(
        input_norm=_weight(layer.input_layernorm.weight),
        q_proj=_weight(attn.q_proj.weight),
        q_bias=_weight(attn.q_proj.bias),
        k_proj=_weight(attn.k_proj.weight),
        k_bias=_weight(attn.k_proj.bias),
        v_proj=_weight(attn.v_proj.weight),
        v_bias=_weight(attn.v_proj.bias),
        o_proj=_weight(attn.o_proj.weight),
        o_bias=_weight(attn.o_proj.bias),
        post_attention_norm=_weight(layer.post_attention_layernorm.weight),
    )
    qk_norm, qk_eps = 0, 0.0
    if attn.qk_norm == "per_head":
        qk_norm = 2 if attn.qk_norm_after_rope else 1
        slots.update(q_norm=_weight(attn.q_norm.weight), k_norm=_weight(attn.k_norm.weight))
        qk_eps = attn.q_norm.eps
    ints = dict.fromkeys(INTS, 0)
    ints.update(qk_norm=qk_norm, rope_interleave=int(attn.rope_interleave))
    floats = dict.fromkeys(FLOATS, 1.0)
    floats.update(
        input_norm_eps=layer.input_layernorm.eps,
        post_attention_norm_eps=layer.post_attention_layernorm.eps,
        qk_norm_eps=qk_eps,
    )
    ffn, assignments = layer.mlp, 0
    if layer.is_moe:
        mlp: MoELayer = layer.mlp
        cfg, router = mlp.config, mlp.router
        top_k = cfg.top_k if moe_k is None else int(moe_k)
        if not 1 <= top_k <= cfg.num_experts:
            raise ValueError(f"moe_k={top_k} must be in [1, {cfg.num_experts}] (the number of experts)")
        w_in, w_out = mlp.experts.stacked()
        slots.update(
            router=_weight(router.weight),
            router_bias=_weight(router.bias),
            expert_bias=_weight(router.expert_bias),
            experts_w_in=_weight(w_in),
            experts_w_out=_weight(w_out),
        )
        after_topk = router.strategy is TopKLogitSoftmaxRouting
        ints.update(
            is_moe=1,
            top_k=top_k,
            expert_activation=MOE_ACTIVATIONS[mlp.experts.activation],
            route_kind=2 if after_topk else (0 if cfg.score_func == "softmax" else 1),
            norm_topk_prob=int(bool(cfg.norm_topk_prob) and not after_topk),
        )
        floats["routed_scaling_factor"] = float(cfg.routed_scaling_factor)
        assignments = top_k
        ffn = mlp.shared if cfg.shared_ffn_dim else None
        if ffn is not None and mlp.shared_gate is not None:
            slots["shared_gate"] = _weight(mlp.shared_gate.weight)
    if ffn is not None:
        slots.update(
            ffn_w_in=_weight(ffn.w_in.weight),
            ffn_w_in_bias=_weight(ffn.w_in.bias),
            ffn_w_out=_weight(ffn.w_out.weight),
            ffn_w_out_bias=_weight(ffn.w_out.bias),
        )
        ints["ffn_activation"] = MOE_ACTIVATIONS[ffn.config.activation]
    return [slots[s] for s in SLOTS], [ints[i] for i in INTS], [floats[f] for f in FLOATS], assignments


def native_step_refusal(model: MoEForCausalLM) -> str | None:
    """Why the whole-step kernel cannot decode ``model`` (the kernel missing, or the first model
    feature it lacks); None when it can. It assumes the model is on the eager fast path
    (:func:`moekit.models.decode.native_decode_refusal` checks both); batch size and padding are
    the session's to check."""
    if not step_available():
        return "the native kernels are not loaded"
    return _refusal(model)


def native_step_plan(model: MoEForCausalLM, moe_k: int | None = None) -> NativeStepPlan | None:
    """The kernel's arguments for ``model`` (``moe_k``: experts per token for every MoE layer, None
    for each layer's top-k), or None when :func:`native_step_refusal` gives a reason. Call it
    only for a model on the fast decode path (what :class:`~moekit.models.decode.DecodeSession`
    checks first)."""
    if native_step_refusal(model) is not None:
        return None
    weights, ints, floats, assignments = [], [], [], 0
    for layer in model.layers:
        w, i, f, a = _layer_args(layer, moe_k)
        weights += w
        ints += i
        floats += f
        assignments += a
    attn = model.layers[0].self_attn
    return NativeStepPlan(
        weights=weights,
        ints=ints,
        floats=floats,
        dims=[attn.num_heads, attn.num_kv_heads, attn.head_dim],
        final_norm=_weight(model.norm.weight),
        final_eps=model.norm.eps,
        lm_head=_weight(model.lm_head.weight),
        lm_bias=_weight(model.lm_head.bias),
        assignments=assignments,
    )


def native_step(plan: NativeStepPlan, x_D: Tensor, cache: KVCache, num_keys: int, cos_Dr, sin_Dr) -> Tensor:
    """One batch-1 step: the new token's embedding ``x_D [D]`` -> float32 logits ``[1, V]``.

    Writes each layer's new key/value into ``cache`` at position ``num_keys - 1`` (the cache must
    already hold ``num_keys - 1`` keys per layer and have room for one more) and sets its lengths.
    """
    logits_1V = torch.ops.moekit.decode_step_f32(
        x_D.reshape(-1).contiguous(),
        plan.weights,
        plan.ints,
        plan.floats,
        cache.keys,
        cache.values,
        num_keys,
        cos_Dr.reshape(-1),
        sin_Dr.reshape(-1),
        plan.final_norm,
        plan.final_eps,
        plan.lm_head,
        plan.lm_bias,
        plan.dims,
    )
    cache.lengths = [num_keys] * cache.num_layers
    return logits_1V
