"""Token-by-token decoding: a session with a preallocated KV cache and masks, and its fast path.

Shape legend: B = batch, S = prompt length (left-padded), N = new tokens at most, K = keys so far
(``S + tokens generated``), V = vocabulary, D = model width, Dh = RoPE width.

:class:`DecodeSession` drives the decoder layers of a :class:`~moekit.models.MoEForCausalLM`
directly instead of calling ``model.forward`` per token, because the per-call work of the general
forward is pure overhead at one token per row:

* the attention mask, the positions and the RoPE tables are built once for the whole generation
  (``[B, S + N]`` mask buffer whose prefix is sliced per step; RoPE rows gathered once for every
  future position) instead of being rebuilt from a growing ``attention_mask`` every step;
* nothing is concatenated per step: the KV cache is preallocated to ``S + N`` and the output ids
  go into a preallocated ``[B, S + N]`` buffer;
* the LM head runs on the last position only (prefill of S tokens needs one row of logits, not S);
* the MoE layers compute only the experts the step routes to (``moekit.layers`` already does).

Decode steps take a *fast path* when the model allows it (:func:`fast_decode_supported`: GQA
attention with RoPE and no Mamba layers, plain token-choice top-k routers, resident stacked experts; pregated models route each MoE
layer from the previous one's input there too). The same math as the
layers, written for one token per row with fewer operator calls: fused ``F.rms_norm``, the router
as linear -> softmax -> top-k, each routed expert as two matmuls on its own weight slices (ids read
on the host once per layer), and no routing statistics or aux-loss closures, which decoding never
reads. On CPU every operator call costs microseconds of dispatch whatever its size, and the
general layers spend about 0.9 ms per decoder layer per token on them (measured with
``benchmarks/bench_decode.py --profile`` on a dim-64 copy of the benchmark model); the fast path
cuts that by about 3x. The general path is kept for everything else (MLA, top-p, expert choice,
capacity, MoE++ experts, offloaded experts, routing overrides) and is what tests compare against.

With ``compile=True`` a batch-1 session runs each fast-path step as one ``torch.compile`` graph
(:func:`_static_decode_step`): the expert ids are read inside the graph as unbacked ints, the new
key/value are written into the preallocated cache at a dynamic position, and one graph serves
every prompt and length. That removes the remaining per-operator overhead (the step then runs at
the speed of its matmuls alone, ``benchmarks/bench_decode.py``).

Sampling, stopping and streaming live in :mod:`moekit.models.generation` (:func:`iter_tokens`,
:class:`Sampler`, :func:`generate`), which drives a session.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.blocks import Attention, KVCache, RMSNorm, apply_rotary, deinterleave
from moekit.kernels.linear import MOE_ACTIVATIONS, linear, moe_fits, native_available
from moekit.layers import MoELayer
from moekit.layers.experts import activate
from moekit.models.decoder import MoEForCausalLM, attention_masks
from moekit.models.native_step import NativeStepPlan, native_step, native_step_plan, native_step_refusal


def fast_decode_supported(model: MoEForCausalLM) -> bool:
    """Whether :class:`DecodeSession` can take the fast decode path for this model (see the module doc).

    The MoE side asks each layer (:attr:`~moekit.layers.MoELayer.supports_fast_decode`: its
    router, dispatcher, storage and routing override); the rest checks attention and norms.
    """
    cfg = model.config
    if cfg.sliding_window is not None or cfg.attention_layer_types is not None or cfg.attention_sinks:
        return False
    # Family features the fast step does not implement (Granite multipliers, DBRX clipping).
    if (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) != (1.0, 1.0, 1.0):
        return False
    if cfg.attention_multiplier is not None or cfg.clip_qkv is not None or cfg.norm_placement != "pre":
        return False
    if not cfg.use_rope or any(t != "attention" for t in cfg.layer_types or ()) or cfg.nope_layer_indices:
        return False  # hybrids and NoPE attention take the general layers
    if cfg.qk_norm == "l2" or cfg.attention_temperature_scale is not None:
        return False  # Llama 4's q/k L2 norm and temperature tuning
    for layer in model.layers:
        attn = layer.self_attn
        if type(attn) is not Attention or attn.qk_norm == "full":
            return False
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not RMSNorm:
                return False
        if layer.is_moe and not (isinstance(layer.mlp, MoELayer) and layer.mlp.supports_fast_decode):
            return False
    return True


def native_decode_refusal(model: MoEForCausalLM) -> str | None:
    """Why a batch-1, unpadded float32 session of ``model`` cannot run each step as one native
    kernel call (:mod:`moekit.models.native_step`); None when it can."""
    if not fast_decode_supported(model):
        return "the model is off the fast decode path"
    return native_step_refusal(model)


def compiled_step_supported(model: MoEForCausalLM) -> bool:
    """Whether the compiled batch-1 step (:func:`_static_decode_step`) can run this model: the fast
    path, with every MoE layer's experts held stacked (the graph indexes the stacked weights with
    the routed ids). Quantized experts take the eager fast path through their own
    :meth:`~moekit.layers.ExpertWeights.decode_token` instead."""
    return fast_decode_supported(model) and all(
        layer.mlp.experts.stacked() is not None for layer in model.layers if layer.is_moe
    )


def _rms(norm: RMSNorm, x: Tensor) -> Tensor:
    # One fused kernel instead of six; RMSNorm computes in float32 too.
    return F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.eps).to(x.dtype)


def _proj(module: nn.Module, x: Tensor, native: bool | None = None) -> Tensor:
    """A projection at a few rows: plain ``nn.Linear`` layers through the native GEMV
    (:func:`moekit.kernels.linear.linear`, ~2x MKL's bandwidth at M=1 here); anything else (a
    quantized or LoRA-wrapped projection) through its own forward. ``native``: None asks
    :func:`~moekit.kernels.linear.native_available`, False forces ``F.linear``."""
    if type(module) is nn.Linear:
        return linear(x, module.weight, module.bias, native)
    return module(x)


def _project_qkv(
    attn: Attention, x_B1D: Tensor, cos, sin, native: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries ``[B, H, 1, Dh]`` and the new key/value ``[B, G, 1, Dh]``, normed and rotated."""
    b = x_B1D.shape[0]
    q_BH1d = _proj(attn.q_proj, x_B1D, native).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k_BG1d = _proj(attn.k_proj, x_B1D, native).view(b, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v_BG1d = _proj(attn.v_proj, x_B1D, native).view(b, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    if attn.qk_norm == "per_head" and not attn.qk_norm_after_rope:
        q_BH1d, k_BG1d = _rms(attn.q_norm, q_BH1d), _rms(attn.k_norm, k_BG1d)
    if attn.rope_interleave:
        q_BH1d, k_BG1d = deinterleave(q_BH1d), deinterleave(k_BG1d)
    q_BH1d, k_BG1d = apply_rotary(q_BH1d, cos, sin), apply_rotary(k_BG1d, cos, sin)
    if attn.qk_norm_after_rope:
        q_BH1d, k_BG1d = _rms(attn.q_norm, q_BH1d), _rms(attn.k_norm, k_BG1d)
    return q_BH1d, k_BG1d, v_BG1d


def _attend(
    attn: Attention, q_BH1d: Tensor, k_BGKd: Tensor, v_BGKd: Tensor, mask, native: bool | None = None
) -> Tensor:
    """Attention over the cached keys and the output projection: ``[B, 1, D]``."""
    b = q_BH1d.shape[0]
    out_BH1d = F.scaled_dot_product_attention(
        q_BH1d, k_BGKd, v_BGKd, attn_mask=mask, enable_gqa=attn.num_kv_heads != attn.num_heads
    )
    return _proj(attn.o_proj, out_BH1d.transpose(1, 2).reshape(b, 1, attn.num_heads * attn.head_dim), native)


def _fast_attention(attn: Attention, x_B1D: Tensor, cos, sin, mask, cache: KVCache) -> Tensor:
    q_BH1d, k_BG1d, v_BG1d = _project_qkv(attn, x_B1D, cos, sin)
    k_BGKd, v_BGKd = cache.update(attn.layer_idx, k_BG1d, v_BG1d)
    return _attend(attn, q_BH1d, k_BGKd, v_BGKd, mask)


def _fast_route(mlp: MoELayer, x_BD: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
    """The router for one token per row: ``(expert ids [B, K], gate weights [B, K])`` in ``x``'s dtype."""
    ids_BK, weights_BK = mlp.router.route_small(x_BD, k)
    return ids_BK, weights_BK.to(x_BD.dtype)


def _shared_experts(mlp: MoELayer, x_BD: Tensor, out_BD: Tensor) -> Tensor:
    if not mlp.config.shared_ffn_dim:
        return out_BD
    shared_BD = mlp.shared(x_BD)
    if mlp.shared_gate is not None:
        shared_BD = torch.sigmoid(mlp.shared_gate(x_BD)) * shared_BD
    return out_BD + shared_BD


def _one_row_experts(mlp: MoELayer, x_1D: Tensor, ids: list, weights_1K: Tensor) -> Tensor:
    """The routed experts of one token ``[1, D]``: two matmuls on each chosen expert's weight slices.

    ``ids`` are the K chosen experts as ints (unbacked symbolic ints under ``torch.compile``, where
    indexing the stacked weights with them stays a zero-copy view of one expert's slice).
    """
    cfg = mlp.config
    w_in_EHD, w_out_EDF = mlp.experts.w_in, mlp.experts.w_out
    out_1D = None
    for slot, expert in enumerate(ids):
        torch._check(expert >= 0)
        torch._check(expert < cfg.num_experts)
        y_1D = F.linear(activate(F.linear(x_1D, w_in_EHD[expert]), cfg.activation), w_out_EDF[expert])
        y_1D = y_1D * weights_1K[:, slot : slot + 1]
        out_1D = y_1D if out_1D is None else out_1D + y_1D
    return out_1D


def _fast_moe(
    mlp: MoELayer, x_BD: Tensor, k: int | None, route_BD: Tensor | None = None
) -> tuple[Tensor, int]:
    """The MoE layer for one token per row; returns ``(out [B, D], assignments computed)``.

    ``route_BD``: what the router reads instead of ``x_BD`` (pregated: the previous MoE input)."""
    ids_BK, weights_BK = _fast_route(mlp, x_BD if route_BD is None else route_BD, k)
    k = ids_BK.shape[1]
    ids = ids_BK.tolist()  # the one host read per layer: which experts' weights to touch
    if len(ids) == 1:
        out_BD = mlp.experts.decode_token(x_BD, ids[0], weights_BK)
    else:
        out_BD = _grouped_experts(mlp, x_BD, ids, weights_BK)
    return _shared_experts(mlp, x_BD, out_BD), len(ids) * k


def _grouped_experts(mlp: MoELayer, x_BD: Tensor, ids: list, weights_BK: Tensor) -> Tensor:
    """The routed experts of B tokens: their (token, slot) assignments sorted by expert, so each
    chosen expert runs once on a contiguous slice of one gathered input (a few operator calls per
    expert, which is what a decode step of a continuous batch pays for).

    Each token's outputs are summed in slot order, as :func:`_one_row_experts` does for one token.
    Legend here: A = B * K assignments.
    """
    b, k = len(ids), len(ids[0])
    order = sorted(range(b * k), key=lambda a: ids[a // k][a % k])  # stable: ties keep row order
    device = x_BD.device
    order_A = torch.tensor(order, device=device)
    x_AD = x_BD.index_select(0, order_A // k)
    experts = mlp.experts
    pieces, start = [], 0
    while start < len(order):
        expert = ids[order[start] // k][order[start] % k]
        end = start + 1
        while end < len(order) and ids[order[end] // k][order[end] % k] == expert:
            end += 1
        pieces.append(experts.expert_forward(expert, x_AD[start:end]))
        start = end
    y_AD = torch.cat(pieces) * weights_BK.reshape(-1).index_select(0, order_A)[:, None]
    # Back to (token, slot) order, then sum the slots: token-by-token the same additions as alone.
    y_BKD = y_AD.new_empty(b * k, y_AD.shape[1]).index_copy_(0, order_A, y_AD).view(b, k, -1)
    return y_BKD.sum(1)


def fast_layers_step(
    model: MoEForCausalLM, x_B1D: Tensor, cos, sin, mask, cache, moe_k: int | None
) -> tuple[Tensor, int]:
    """The fast path's decoder layers for one token per row: ``(float32 logits [B, V], assignments)``.

    ``cache`` is a :class:`KVCache` or a :class:`~moekit.blocks.RaggedKVCache` (anything whose
    ``update`` appends one key/value per row and returns the keys ``mask`` ``[B, 1, 1, K]`` covers).
    """
    assignments = 0
    pregated = model.config.pregated
    route_BD = None  # pregated: the previous MoE layer's input
    for layer in model.layers:
        h_B1D = x_B1D + _fast_attention(
            layer.self_attn, _rms(layer.input_layernorm, x_B1D), cos, sin, mask, cache
        )
        normed_B1D = _rms(layer.post_attention_layernorm, h_B1D)
        if layer.is_moe:
            out_BD, num = _fast_moe(layer.mlp, normed_B1D[:, 0], moe_k, route_BD)
            if pregated:
                route_BD = normed_B1D[:, 0]
            assignments += num
            x_B1D = h_B1D + out_BD[:, None]
        else:
            x_B1D = h_B1D + layer.mlp(normed_B1D)
    return _proj(model.lm_head, _rms(model.norm, x_B1D[:, 0])).float(), assignments


def general_layers_step(
    model: MoEForCausalLM,
    x_BSD: Tensor,
    cos,
    sin,
    mask,
    token_mask_BS,
    cache,
    moe_k: int | None,
    count_experts: bool = False,
    logits: bool = True,
) -> tuple[Tensor | None, int]:
    """The general decoder layers over S new tokens per row: ``(float32 last-position logits [B, V], assignments)``.

    ``assignments`` (routed (token, expert) pairs) is counted only with ``count_experts`` (it
    costs a reduction per layer), else 0. ``logits=False`` skips the LM head (a prefill chunk
    that is not the prompt's last only fills the cache) and returns None for the logits.
    """
    use_residual = model.config.moe is not None and model.config.moe.gating_residual
    pregated = model.config.pregated
    prev_logits_TE, pregate_BSD, assignments = None, None, 0
    for layer in model.layers:
        x_BSD, moe_out = layer(
            x_BSD,
            cos,
            sin,
            mask,
            token_mask_BS,
            prev_logits_TE if use_residual else None,
            moe_k,
            cache=cache,
            router_input_BSD=pregate_BSD,
        )
        if moe_out is not None:
            prev_logits_TE = moe_out.routing.router_logits
            if pregated:
                pregate_BSD = moe_out.moe_input
            if count_experts:
                assignments += int((moe_out.routing.expert_ids >= 0).sum())
    if not logits:
        return None, assignments
    # Only the last position's logits are ever needed: skip S-1 rows of the LM head.
    return model.lm_logits(x_BSD[:, -1]).float(), assignments


def _static_decode_step(
    model: MoEForCausalLM,
    next_1: Tensor,
    cos,
    sin,
    mask_11K: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    moe_k: int | None,
    native: bool = False,
) -> Tensor:
    """One batch-1 decode step written for ``torch.compile``: returns float32 logits ``[1, V]``.

    The same math as :meth:`DecodeSession._fast_step`, but without Python-side bookkeeping, so
    the whole step traces to one graph: the new key/value go straight into the session's
    preallocated cache buffers (``keys``/``values``: per layer ``[1, G, capacity, Dh]``) at
    position ``K - 1``, where ``K`` (the keys so far) is the mask's last dimension, marked
    dynamic so every step reuses the graph; each MoE layer's chosen experts are read as unbacked
    ints, which keeps the expert matmuls zero-copy views of the stacked weights. With ``native``
    (a constant the graph specializes on) the projections, the LM head and the stacked experts
    run the native fp32 ops instead (the experts as one opaque call that reads the ids itself).
    """
    num_keys = mask_11K.shape[-1]
    x_11D = model.embed_tokens(next_1[:, None])
    route_1D = None  # pregated: the previous MoE layer's input
    for layer, k_buf, v_buf in zip(model.layers, keys, values, strict=True):
        attn = layer.self_attn
        q_1H1d, k_1G1d, v_1G1d = _project_qkv(attn, _rms(layer.input_layernorm, x_11D), cos, sin, native)
        k_buf[:, :, num_keys - 1 : num_keys] = k_1G1d
        v_buf[:, :, num_keys - 1 : num_keys] = v_1G1d
        h_11D = x_11D + _attend(
            attn, q_1H1d, k_buf[:, :, :num_keys], v_buf[:, :, :num_keys], mask_11K, native
        )
        normed_1D = _rms(layer.post_attention_layernorm, h_11D)[:, 0]
        mlp = layer.mlp
        if layer.is_moe:
            ids_1K, weights_1K = _fast_route(mlp, normed_1D if route_1D is None else route_1D, moe_k)
            stacks, act = mlp.experts.stacked(), mlp.experts.activation
            if native and stacks is not None and moe_fits(normed_1D, *stacks, act):
                gates_K = weights_1K[0].to(torch.float32)
                out_1D = torch.ops.moekit.moe_decode_f32(
                    normed_1D, *stacks, ids_1K[0], gates_K, MOE_ACTIVATIONS[act]
                )
            else:
                out_1D = _one_row_experts(mlp, normed_1D, ids_1K[0].tolist(), weights_1K)
            x_11D = h_11D + _shared_experts(mlp, normed_1D, out_1D)[:, None]
            if model.config.pregated:
                route_1D = normed_1D
        else:
            x_11D = h_11D + mlp(normed_1D)[:, None]
    return _proj(model.lm_head, _rms(model.norm, x_11D[:, 0]), native).float()


class DecodeSession:
    """One batch's decoding state: KV cache, mask buffer, positions and RoPE rows, all preallocated.

    Call :meth:`prefill` once, then :meth:`step` with each chosen token. Both return float32
    next-token logits ``[B, V]``.

    Args:
        model: the language model (used in eval mode; gradients are never tracked).
        input_ids: ``[B, S]`` prompt ids, left-padded for prompts of different lengths.
        attention_mask: ``[B, S]``, 1 for real tokens and 0 for the left padding (None: all real).
        max_new_tokens: N, how many tokens this session may still decode (sizes every buffer).
        moe_k: experts per token for every MoE layer (dynamic k); None keeps each layer's top-k.
        count_experts: accumulate ``expert_assignments`` (routed (token, expert) pairs computed),
            for measuring what dynamic k saves; off by default because it adds a reduction per layer.
        compile: run each decode step as one ``torch.compile`` graph (:func:`_static_decode_step`),
            which removes the per-operator Python and dispatch overhead. It applies to batch-1
            sessions on the fast path and is ignored otherwise (same tokens either way). The first
            step of a process compiles (seconds to a minute on CPU); later sessions of any prompt
            or length reuse the graph while the model's structure stays the same.
        compile_fallback: if compiling fails, warn and decode eagerly instead of raising (what
            ``generate(compile="auto")`` asks for).
        inputs_embeds: ``[B, S, D]`` prompt embeddings for the prefill instead of
            ``embed(input_ids)`` (a VLM's spliced image + text embeddings); decode steps embed
            the new tokens as usual.
    """

    def __init__(
        self,
        model: MoEForCausalLM,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 0,
        moe_k: int | None = None,
        count_experts: bool = False,
        compile: bool = False,
        compile_fallback: bool = False,
        inputs_embeds: Tensor | None = None,
    ) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length>0], got {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        cfg = model.config
        self.model, self.moe_k, self.count_experts = model, moe_k, count_experts
        batch, prompt_len = input_ids.shape
        capacity = prompt_len + max_new_tokens
        device = input_ids.device
        self.input_ids, self.prompt_len, self.max_new_tokens = input_ids, prompt_len, max_new_tokens
        self.expert_assignments = 0
        if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(
                f"inputs_embeds {tuple(inputs_embeds.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        self._prefill_embeds = inputs_embeds
        real_BS = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.bool)
        )
        if not bool(real_BS[:, -1].all()):
            raise ValueError("attention_mask: pad prompts on the left (the last prompt token must be real)")
        self.padded = not bool(real_BS.all())
        # One bool buffer for the whole generation: generated tokens are always real, so each step
        # only widens the slice it passes to attention ([B, 1, 1, K], a view, never rebuilt).
        self.mask_BK = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.mask_BK[:, :prompt_len] = real_BS
        self._mask_B11C = self.mask_BK[:, None, None, :]
        # Positions skip the left padding, so a padded row decodes exactly like the row alone.
        prompt_pos_BS = (real_BS.long().cumsum(-1) - 1).clamp_min(0)
        next_pos_B = prompt_pos_BS[:, -1] + 1
        decode_pos_BN = next_pos_B[:, None] + torch.arange(max_new_tokens, device=device)
        self._prompt_pos_BS = prompt_pos_BS
        rotary = model.rotary
        # Stored step-major ([N, B, 1, 1, Dh]) so each step's rows are one contiguous block whose
        # strides do not depend on N (a compiled step would otherwise recompile per length).
        self._cos_NB11d = self._sin_NB11d = None
        if max_new_tokens:
            cos_B1Nd, sin_B1Nd = rotary(decode_pos_BN, capacity)
            # Fresh buffers: .contiguous() would keep the N-dependent strides of size-1 dims.
            step_major = (max_new_tokens, batch, 1, 1, cos_B1Nd.shape[-1])
            self._cos_NB11d = cos_B1Nd.new_empty(step_major).copy_(
                cos_B1Nd.permute(2, 0, 1, 3)[:, :, :, None]
            )
            self._sin_NB11d = sin_B1Nd.new_empty(step_major).copy_(
                sin_B1Nd.permute(2, 0, 1, 3)[:, :, :, None]
            )
        self.cache = KVCache(cfg.num_layers, max_length=capacity)
        self.num_decoded = 0
        # Masks beyond the shared causal one (sliding windows, per-layer mask types) are built per call.
        self._masked = cfg.sliding_window is not None or cfg.attention_layer_types is not None
        #: take the fast decode path (see :func:`fast_decode_supported`); set False to force the
        #: general layers (what the fast path is tested against).
        self.fast = fast_decode_supported(model)
        self._compiled = None
        self._compile_fallback = compile_fallback
        # Decided once per session: the compiled graph is specialized on it.
        self._native = native_available()
        if compile and self.fast and batch == 1 and compiled_step_supported(model):
            self._compiled = torch.compile(_static_decode_step, fullgraph=True)
        self._step_plan: NativeStepPlan | None = None
        if self.fast and self._compiled is None and batch == 1 and not self.padded and not self._masked:
            self._step_plan = native_step_plan(model, moe_k)
        #: run each decode step as one native kernel call (:mod:`moekit.models.native_step`) when
        #: the model allows it; set False to force the eager fast path (what the kernel is tested
        #: against).
        self.use_native_step = self._step_plan is not None
        #: decode steps that ran as one native kernel call (what tests and benchmarks assert).
        self.num_native_steps = 0

    @property
    def compiled(self) -> bool:
        """Whether decode steps run the compiled graph (False after a compile fallback)."""
        return self._compiled is not None and self.fast

    def _fast_step(self, x_B1D: Tensor, cos, sin, mask) -> Tensor:
        logits_BV, assignments = fast_layers_step(self.model, x_B1D, cos, sin, mask, self.cache, self.moe_k)
        if self.count_experts:
            self.expert_assignments += assignments
        return logits_BV

    def _compiled_step(self, next_1: Tensor, cos, sin, mask_11K: Tensor, num_keys: int) -> Tensor:
        cache = self.cache
        torch._dynamo.maybe_mark_dynamic(mask_11K, 3)
        # Scalar capture lets the graph read the chosen expert ids; patched per call so the
        # setting never leaks into the caller's own torch.compile use.
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            logits_1V = self._compiled(
                self.model, next_1, cos, sin, mask_11K, cache.keys, cache.values, self.moe_k, self._native
            )
        cache.lengths = [num_keys] * cache.num_layers
        if self.count_experts:
            self.expert_assignments += sum(
                self.moe_k or layer.mlp.config.top_k for layer in self.model.layers if layer.is_moe
            )
        return logits_1V

    def _run_layers(self, x_BSD: Tensor, cos, sin, mask, token_mask_BS) -> Tensor:
        logits_BV, assignments = general_layers_step(
            self.model, x_BSD, cos, sin, mask, token_mask_BS, self.cache, self.moe_k, self.count_experts
        )
        self.expert_assignments += assignments
        return logits_BV

    @torch.no_grad()
    def prefill(self) -> Tensor:
        """Runs the prompt; returns the ``[B, V]`` logits for the first new token."""
        if self.cache.seq_len:
            raise RuntimeError("DecodeSession.prefill: already prefilled")
        batch, prompt_len = self.input_ids.shape
        device = self.input_ids.device
        cos, sin = self.model.rotary(self._prompt_pos_BS, prompt_len)
        if self.padded or self._masked:
            mask = attention_masks(
                self.model.config,
                self.mask_BK[:, :prompt_len] if self.padded else None,
                batch,
                prompt_len,
                0,
                device,
            )
        else:
            mask = None  # plain causal: SDPA's is_causal path
        token_mask = self.mask_BK[:, :prompt_len] if self.padded else None
        embeds = self.model.embed(self.input_ids) if self._prefill_embeds is None else self._prefill_embeds
        self._prefill_embeds = None  # the cache holds what the prefill needed; free the copy
        return self._run_layers(embeds, cos, sin, mask, token_mask)

    @torch.no_grad()
    def step(self, next_B: Tensor) -> Tensor:
        """Feeds one token per row (``[B]`` int64); returns the ``[B, V]`` logits for the next one."""
        t = self.num_decoded
        if t >= self.max_new_tokens:
            raise RuntimeError(f"DecodeSession.step: all {self.max_new_tokens} preallocated steps are used")
        num_keys = self.prompt_len + t + 1
        if self._masked:
            mask = attention_masks(
                self.model.config, self.mask_BK[:, :num_keys], next_B.shape[0], 1, num_keys - 1, next_B.device
            )
        else:
            mask = self._mask_B11C[..., :num_keys]
        cos, sin = self._cos_NB11d[t], self._sin_NB11d[t]
        self.num_decoded = t + 1
        if self._compiled is not None and self.fast:
            if not self._compile_fallback:
                return self._compiled_step(next_B, cos, sin, mask, num_keys)
            try:
                return self._compiled_step(next_B, cos, sin, mask, num_keys)
            except Exception as err:  # noqa: BLE001 - the eager path below gives the same tokens
                # A compile failure (no C++ compiler, an unsupported op) happens before the step
                # writes the cache, so the eager step can take over from the same state.
                warnings.warn(
                    f"decode step: torch.compile failed ({err!r:.200}); decoding eagerly", stacklevel=2
                )
                self._compiled = None
        x_B1D = self.model.embed(next_B[:, None])
        if self.fast and self.use_native_step and self._step_plan is not None:
            if self.count_experts:
                self.expert_assignments += self._step_plan.assignments
            self.num_native_steps += 1
            return native_step(self._step_plan, x_B1D, self.cache, num_keys, cos, sin)
        if self.fast:
            return self._fast_step(x_B1D, cos, sin, mask)
        return self._run_layers(x_B1D, cos, sin, mask, None)
