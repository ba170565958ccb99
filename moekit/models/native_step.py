"""The whole-step native decode: a batch-1 step of a decoder LM in one kernel call.

Shape legend: D = model width, Dr = rotary width, K = keys after this token, V = vocabulary.

:class:`~moekit.models.decode.DecodeSession` uses it for batch-1, unpadded sessions on the fast
path when :func:`native_step_plan` can describe the model to the kernel
(``moekit/kernels/csrc/decode_step.cpp``). The kernel runs every decoder layer, the final norm
and the LM head inside one OpenMP team, so a step pays one call instead of ~150 operator
dispatches, and the threads stay together between the GEMVs. It covers the common decoder:

* pre-norm RMSNorm layers with GQA attention, RoPE (rotate-half, partial or interleaved), optional
  q/k/v/o biases and per-head q/k norms, full causal attention at the default scale;
* token-choice top-k routers (softmax or sigmoid scores, or a softmax over the chosen logits;
  bias, selection-only expert bias, ``norm_topk_prob``, ``routed_scaling_factor``), with an
  optional (gated) shared expert; dense FFN layers; the activations of
  :data:`~moekit.kernels.linear.MOE_ACTIVATIONS`;
* every weight matrix float32, or moekit's quantized codes on the native kernel layout
  (``moekit quantize``: int8 or int4 experts, and with ``--include-non-experts`` the attention
  and the LM head too), mixed freely, e.g. experts of different bit widths.

Quantized modules take part through a protocol, because this package sits below
:mod:`moekit.compress`: a projection offers ``native_matrix()`` -> ``(codes, scale, zero, bits,
group)`` or None, and an expert storage offers
:meth:`~moekit.layers.ExpertWeights.native_step_matrices`.

Anything else keeps the eager fast path, which is the reference the kernel is tested against
(``tests/test_native_step.py``). ``MOEKIT_KERNELS=0`` turns it off with the other kernels.

Adding a feature: give it a slot in :mod:`moekit.kernels.step` and in the C++ enums (in the
same order), fill it in :func:`_layer_args`, and remove its refusal from :func:`_refusal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.blocks import Attention, KVCache, RMSNorm
from moekit.kernels.linear import MOE_ACTIVATIONS
from moekit.kernels.memory import move_to_hugepages
from moekit.kernels.step import FLOAT_BITS, FLOATS, INTS, SLOTS, new_plan, step_available
from moekit.layers import MoELayer
from moekit.layers.experts import FeedForward, StackedExpertWeights
from moekit.layers.router import Router
from moekit.layers.strategies import TopKLogitSoftmaxRouting, TopKRouting
from moekit.models.decoder import MoEForCausalLM

_EMPTY = torch.empty(0)
#: one weight as the kernel takes it: (float32 weight or codes, scale, zero, bits, group).
Matrix = tuple[Tensor, Tensor, Tensor, int, int]


@dataclass
class NativeStepPlan:
    """A built ``torch.classes.moekit.DecodeStepPlan`` and what one step computes.

    Attributes:
        kernel: the plan object (holds references to every weight it reads).
        assignments: routed (token, expert) pairs one step computes.
        quantized: weight matrices on quantized codes (0 for a float32 model).
    """

    kernel: Any
    assignments: int
    quantized: int


def _f32(*tensors: Tensor | None) -> bool:
    return all(
        t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())
        for t in tensors
    )


def _matrix(module: nn.Module) -> Matrix | None:
    """The kernel's form of a projection's weight, or None when it has none."""
    if type(module) is nn.Linear:
        return (module.weight.detach(), _EMPTY, _EMPTY, FLOAT_BITS, 0) if _f32(module.weight) else None
    native = getattr(module, "native_matrix", None)
    return native() if callable(native) else None


def _bias(module: nn.Module) -> Tensor | None:
    return getattr(module, "bias", None)


def _projection_ok(module: nn.Module) -> bool:
    return _matrix(module) is not None and _f32(_bias(module))


def _ffn_refusal(ffn: nn.Module) -> str | None:
    if type(ffn) is not FeedForward or ffn.config.activation not in MOE_ACTIVATIONS:
        return "an FFN the kernel does not implement"
    if not (_projection_ok(ffn.w_in) and _projection_ok(ffn.w_out)):
        return "an FFN projection without a native form"
    return None


def _expert_matrices(mlp: MoELayer) -> tuple[list[Matrix], list[Matrix]] | None:
    return mlp.experts.native_step_matrices()


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
    if getattr(experts, "activation", None) not in MOE_ACTIVATIONS:
        return "an expert activation the kernel does not implement"
    stacks = experts.stacked() if type(experts) is StackedExpertWeights else None
    if not (stacks is not None and _f32(*stacks)) and _expert_matrices(mlp) is None:
        return "experts with neither float32 stacks nor native matrices"
    if cfg.shared_ffn_dim:
        refusal = _ffn_refusal(mlp.shared)
        if refusal or (mlp.shared_gate is not None and type(mlp.shared_gate) is not nn.Linear):
            return refusal or "a quantized shared-expert gate"
    return None


def _refusal(model: MoEForCausalLM) -> str | None:
    """Why the kernel cannot run ``model`` (None when it can). Callers have already checked
    :func:`~moekit.models.decode.fast_decode_supported`."""
    if model.config.pregated:
        return "pregated routing"
    if type(model.norm) is not RMSNorm or not _projection_ok(model.lm_head) or not _f32(model.norm.weight):
        return "an output head the kernel does not implement"
    for layer in model.layers:
        attn = layer.self_attn
        if type(attn) is not Attention or not attn.rope or attn.sinks is not None:
            return "attention the kernel does not implement"
        if attn.softmax_scale is not None or attn.clip_qkv is not None or attn.temperature_scale is not None:
            return "a non-default attention scale"
        if attn.qk_norm not in ("none", "per_head"):
            return f"the {attn.qk_norm} q/k norm"
        if not all(_projection_ok(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
            return "an attention projection without a native form"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not RMSNorm or not _f32(norm.weight):
                return "a norm the kernel does not implement"
        refusal = _moe_refusal(layer.mlp) if layer.is_moe else _ffn_refusal(layer.mlp)
        if refusal:
            return refusal
    return None


def _vector(t: Tensor | None) -> Matrix:
    return (_EMPTY if t is None else t.detach(), _EMPTY, _EMPTY, FLOAT_BITS, 0)


def _layer_args(layer: nn.Module, moe_k: int | None) -> tuple[list[Matrix], list[int], list[float], int]:
    """One layer's entries: (weights in SLOTS order then any per-expert matrices, ints, floats,
    assignments per step)."""
    attn: Attention = layer.self_attn
    slots: dict[str, Matrix] = dict.fromkeys(SLOTS, _vector(None))
    slots.update(
        input_norm=_vector(layer.input_layernorm.weight),
        q_proj=_matrix(attn.q_proj),
        q_bias=_vector(_bias(attn.q_proj)),
        k_proj=_matrix(attn.k_proj),
        k_bias=_vector(_bias(attn.k_proj)),
        v_proj=_matrix(attn.v_proj),
        v_bias=_vector(_bias(attn.v_proj)),
        o_proj=_matrix(attn.o_proj),
        o_bias=_vector(_bias(attn.o_proj)),
        post_attention_norm=_vector(layer.post_attention_layernorm.weight),
    )
    qk_norm, qk_eps = 0, 0.0
    if attn.qk_norm == "per_head":
        qk_norm = 2 if attn.qk_norm_after_rope else 1
        slots.update(q_norm=_vector(attn.q_norm.weight), k_norm=_vector(attn.k_norm.weight))
        qk_eps = attn.q_norm.eps
    ints = dict.fromkeys(INTS, 0)
    ints.update(qk_norm=qk_norm, rope_interleave=int(attn.rope_interleave))
    floats = dict.fromkeys(FLOATS, 1.0)
    floats.update(
        input_norm_eps=layer.input_layernorm.eps,
        post_attention_norm_eps=layer.post_attention_layernorm.eps,
        qk_norm_eps=qk_eps,
    )
    ffn, assignments, per_expert = layer.mlp, 0, []
    if layer.is_moe:
        mlp: MoELayer = layer.mlp
        cfg, router = mlp.config, mlp.router
        top_k = cfg.top_k if moe_k is None else int(moe_k)
        if not 1 <= top_k <= cfg.num_experts:
            raise ValueError(f"moe_k={top_k} must be in [1, {cfg.num_experts}] (the number of experts)")
        slots.update(
            router=_vector(router.weight),
            router_bias=_vector(router.bias),
            expert_bias=_vector(router.expert_bias),
        )
        stacks = mlp.experts.stacked() if type(mlp.experts) is StackedExpertWeights else None
        if stacks is not None and _f32(*stacks):
            slots.update(experts_w_in=_vector(stacks[0]), experts_w_out=_vector(stacks[1]))
        else:
            ins, outs = _expert_matrices(mlp)
            per_expert = list(ins) + list(outs)
            ints["num_expert_matrices"] = len(ins)
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
            slots["shared_gate"] = _vector(mlp.shared_gate.weight)
    if ffn is not None:
        slots.update(
            ffn_w_in=_matrix(ffn.w_in),
            ffn_w_in_bias=_vector(_bias(ffn.w_in)),
            ffn_w_out=_matrix(ffn.w_out),
            ffn_w_out_bias=_vector(_bias(ffn.w_out)),
        )
        ints["ffn_activation"] = MOE_ACTIVATIONS[ffn.config.activation]
    entries = [slots[s] for s in SLOTS] + per_expert
    return entries, [ints[i] for i in INTS], [floats[f] for f in FLOATS], assignments


def native_step_refusal(model: MoEForCausalLM) -> str | None:
    """Why the whole-step kernel cannot decode ``model`` (the kernel missing, or the first model
    feature it lacks); None when it can. It assumes the model is on the eager fast path
    (:func:`moekit.models.decode.native_decode_refusal` checks both); batch size and padding are
    the session's to check."""
    if not step_available():
        return "the native kernels are not loaded"
    return _refusal(model)


def native_step_plan(model: MoEForCausalLM, moe_k: int | None = None) -> NativeStepPlan | None:
    """The kernel's plan for ``model`` (``moe_k``: experts per token for every MoE layer, None for
    each layer's top-k), or None when :func:`native_step_refusal` gives a reason. Call it only
    for a model on the fast decode path (what :class:`~moekit.models.decode.DecodeSession`
    checks first)."""
    if native_step_refusal(model) is not None:
        return None
    # The step streams every active weight once: huge pages spare it a TLB miss and a prefetcher
    # restart per 4 KiB (moekit.kernels.memory). Done once per model, before any view is taken.
    move_to_hugepages(model)
    entries, ints, floats, assignments = [], [], [], 0
    for layer in model.layers:
        e, i, f, a = _layer_args(layer, moe_k)
        entries += e
        ints += i
        floats += f
        assignments += a
    entries += [_vector(model.norm.weight), _matrix(model.lm_head), _vector(_bias(model.lm_head))]
    floats.append(float(model.norm.eps))
    attn = model.layers[0].self_attn
    columns = list(zip(*entries, strict=True))
    kernel = new_plan(
        list(columns[0]),
        list(columns[1]),
        list(columns[2]),
        list(columns[3]),
        list(columns[4]),
        ints,
        floats,
        [len(model.layers), attn.num_heads, attn.num_kv_heads, attn.head_dim],
    )
    quantized = sum(1 for e in entries if e[3] != FLOAT_BITS)
    return NativeStepPlan(kernel=kernel, assignments=assignments, quantized=quantized)


def native_step(plan: NativeStepPlan, x_D: Tensor, cache: KVCache, num_keys: int, cos_Dr, sin_Dr) -> Tensor:
    """One batch-1 step: the new token's embedding ``x_D [D]`` -> float32 logits ``[1, V]``.

    Writes each layer's new key/value into ``cache`` at position ``num_keys - 1`` (the cache must
    already hold ``num_keys - 1`` keys per layer and have room for one more) and sets its lengths.
    """
    logits_1V = plan.kernel.step(
        x_D.reshape(-1).float().contiguous(),
        cache.keys,
        cache.values,
        num_keys,
        cos_Dr.reshape(-1).float(),
        sin_Dr.reshape(-1).float(),
    )
    cache.lengths = [num_keys] * cache.num_layers
    return logits_1V
