"""The MoE decoder language model: decoder layers (blocks from ``moekit.blocks``) and the LM.

Shape legend: B = batch, S = new tokens in this call, P = tokens already in the KV cache,
K = P + S keys, D = model width, Dh = RoPE width, V = vocabulary, T = B * S tokens (flattened
for the MoE layers), E = experts.

Conventions follow Hugging Face's Llama/Qwen3 family so converters only rename keys: pre-norm
layers, rotate-half RoPE, SwiGLU, ``attention_mask`` ``[B, P + S]`` with 1 for real tokens,
labels shifted inside the model with -100 ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moekit.blocks import (
    Attention,
    KVCache,
    LightningAttention,
    MambaMixer,
    MixtureOfAttentionHeads,
    MLAttention,
    RMSNorm,
    RotaryEmbedding,
    build_attention_mask,
)
from moekit.kernels import linear_ce
from moekit.kernels.gemm import apply_linear
from moekit.layers import FeedForward, FFNConfig, MoELayer, MoEOutput, RoutingInfo
from moekit.layers.experts import StackedExpertWeights
from moekit.layers.lora import LoRAExpertWeights
from moekit.models.config import ModelConfig
from moekit.models.objectives import MODEL_CONFIG_COEFS, LossWeights, shifted_labels, token_cross_entropy
from moekit.models.outputs import CausalLMOutput, mean_aux_losses

# Aux-loss names ``forward(labels=...)`` weights, paired with their ModelConfig coefficient.
AUX_LOSS_COEFS = MODEL_CONFIG_COEFS


def make_norm(config: ModelConfig) -> nn.Module:
    """The layer/final norm of ``config.norm_type``: :class:`RMSNorm` or ``nn.LayerNorm`` (``[D] -> [D]``)."""
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.dim, eps=config.rms_norm_eps, bias=config.norm_bias)
    return RMSNorm(config.dim, config.rms_norm_eps)


def attention_masks(
    config: ModelConfig,
    attention_mask_BK: Tensor | None,
    batch: int,
    num_new: int,
    num_past: int,
    device: torch.device,
) -> Tensor | dict[str, Tensor | None] | None:
    """The SDPA mask(s) of one forward: one ``[B, 1, S, K]`` bool mask (or None for plain causal)
    shared by every layer, or, with per-layer ``attention_layer_types``, ``{mask type: mask}``
    from which each :class:`DecoderLayer` takes its own (see :func:`~moekit.blocks.build_attention_mask`)."""
    if config.attention_layer_types is None:
        return build_attention_mask(
            attention_mask_BK, batch, num_new, num_past, config.sliding_window, device
        )
    return {
        kind: build_attention_mask(
            attention_mask_BK,
            batch,
            num_new,
            num_past,
            config.sliding_window if kind == "sliding" else None,
            device,
            config.attention_chunk_size if kind == "chunked" else None,
        )
        for kind in sorted(set(config.attention_layer_types))
    }


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + mixer(norm(x))``, then ``h + mlp(norm(h))``; ``mlp`` is dense or MoE.

    The token mixer is attention (``self_attn``: GQA or MLA) or, for ``"mamba"`` layers of a
    hybrid (:meth:`ModelConfig.layer_type`), a :class:`~moekit.blocks.MambaMixer` (``mamba``;
    ``self_attn`` is then None).

    Submodules: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``; with
    ``norm_placement="post"`` the block is ``x + norm(attn(x))``, then ``h + norm(mlp(h))``, with
    ``post_attention_layernorm`` and ``post_feedforward_layernorm`` and no ``input_layernorm``
    (:class:`~moekit.layers.FeedForward` or :class:`~moekit.layers.MoELayer`).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.mask_type = config.attention_mask_type(layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.residual_multiplier = config.residual_multiplier
        self.post_norm = config.norm_placement == "post"
        if not self.post_norm:
            self.input_layernorm = make_norm(config)
        self.mamba: MambaMixer | None = None
        self.linear = config.layer_type(layer_idx) == "linear"
        kind = "linear" if self.linear else "attention"
        self.normed_residual = config.norm_placement == "normed_residual"
        self.mixer_scales, self.mlp_scales = config.sublayer_scales(kind), config.sublayer_scales("mlp")
        if self.linear:
            self.self_attn = LightningAttention(config.lightning_config(), layer_idx)
        elif config.layer_type(layer_idx) == "mamba":
            assert config.mamba is not None  # ModelConfig checks it
            self.mamba = MambaMixer(config.mamba, layer_idx)
            self.self_attn: nn.Module | None = None
        elif config.attention_type == "mla":
            self.self_attn: nn.Module = MLAttention(config.mla_config(), layer_idx)
        elif config.attention_type == "moa":
            self.self_attn = MixtureOfAttentionHeads(config.moa_config(), layer_idx)
        else:
            self.self_attn = Attention(config.attention_config(layer_idx), layer_idx)
        self.post_attention_layernorm = make_norm(config)
        if self.post_norm:
            self.post_feedforward_layernorm = make_norm(config)
        if self.is_moe:
            self.mlp: nn.Module = MoELayer(config.moe_config(layer_idx))
        else:
            self.mlp = FeedForward(
                FFNConfig(dim=config.dim, ffn_dim=config.ffn_dim, activation=config.dense_ffn_activation)
            )

    def forward(
        self,
        x_BSD: Tensor,
        cos_B1Sd: Tensor,
        sin_B1Sd: Tensor,
        mask_B1SK: Tensor | None = None,
        token_mask_BS: Tensor | None = None,
        prev_logits_TE: Tensor | None = None,
        moe_k: int | None = None,
        cache: KVCache | None = None,
        router_input_BSD: Tensor | None = None,
    ) -> tuple[Tensor, MoEOutput | None]:
        """Returns ``(x_BSD, moe_output)``; ``moe_output`` is None for dense layers.

        ``token_mask_BS`` (bool, False for padding) keeps padding out of routing statistics;
        ``prev_logits_TE`` feeds the gating residual; ``moe_k`` overrides the layer's top-k;
        ``router_input_BSD`` is what the router reads instead of this layer's MoE input
        (``ModelConfig.pregated``: the previous MoE layer's input).
        ``mask_B1SK`` may be a ``{mask type: mask}`` dict (:func:`attention_masks`): the layer takes
        its own.
        """
        if isinstance(mask_B1SK, dict):
            mask_B1SK = mask_B1SK[self.mask_type]
        if self.post_norm:
            return self._post_norm_forward(
                x_BSD,
                cos_B1Sd,
                sin_B1Sd,
                mask_B1SK,
                token_mask_BS,
                prev_logits_TE,
                moe_k,
                cache,
                router_input_BSD,
            )
        normed_BSD = self.input_layernorm(x_BSD)
        if self.mamba is not None:
            mixed_BSD = self.mamba(normed_BSD, token_mask_BS, cache)
        elif self.linear:
            mixed_BSD = self.self_attn(normed_BSD, token_mask_BS, cache)
        else:
            mixed_BSD = self.self_attn(normed_BSD, cos_B1Sd, sin_B1Sd, mask_B1SK, cache)
        if self.normed_residual:
            return self._normed_residual_forward(normed_BSD, mixed_BSD, token_mask_BS, prev_logits_TE, moe_k)
        h_BSD = x_BSD + self._scaled(mixed_BSD)
        normed_BSD = self.post_attention_layernorm(h_BSD)
        if not self.is_moe:
            return h_BSD + self._scaled(self.mlp(normed_BSD)), None
        out = self.mlp(
            normed_BSD,
            token_mask=token_mask_BS,
            prev_logits=prev_logits_TE,
            k=moe_k,
            router_input=router_input_BSD,
        )
        return h_BSD + self._scaled(out.hidden), out

    def _normed_residual_forward(self, normed_BSD, mixed_BSD, token_mask_BS, prev_logits_TE, moe_k):
        # MiniMax: each sublayer's residual is its *normed* input, both sides scaled (alpha, beta).
        (a1, b1), (a2, b2) = self.mixer_scales, self.mlp_scales
        normed2_BSD = self.post_attention_layernorm(normed_BSD * a1 + mixed_BSD * b1)
        if not self.is_moe:
            return normed2_BSD * a2 + self.mlp(normed2_BSD) * b2, None
        out = self.mlp(normed2_BSD, token_mask=token_mask_BS, prev_logits=prev_logits_TE, k=moe_k)
        return normed2_BSD * a2 + out.hidden * b2, out

    def _post_norm_forward(
        self, x_BSD, cos_B1Sd, sin_B1Sd, mask_B1SK, token_mask_BS, prev_logits_TE, moe_k, cache, router_in
    ):
        # OLMo-2 order: each sublayer reads the raw stream and its output is normed before the add.
        attn_BSD = self.self_attn(x_BSD, cos_B1Sd, sin_B1Sd, mask_B1SK, cache)
        h_BSD = x_BSD + self._scaled(self.post_attention_layernorm(attn_BSD))
        if not self.is_moe:
            return h_BSD + self._scaled(self.post_feedforward_layernorm(self.mlp(h_BSD))), None
        out = self.mlp(
            h_BSD, token_mask=token_mask_BS, prev_logits=prev_logits_TE, k=moe_k, router_input=router_in
        )
        return h_BSD + self._scaled(self.post_feedforward_layernorm(out.hidden)), out

    def _scaled(self, branch_BSD: Tensor) -> Tensor:
        # Granite's residual_multiplier; 1.0 (every other family) skips the multiply.
        m = self.residual_multiplier
        return branch_BSD if m == 1.0 else branch_BSD * m


class MoEForCausalLM(nn.Module):
    """Decoder-only LM whose FFNs are dense or MoE per :meth:`ModelConfig.is_moe_layer`.

    Submodules: ``embed_tokens`` (``[V, D]``), ``layers`` (``nn.ModuleList`` of
    :class:`DecoderLayer`), ``norm``, ``lm_head`` (``[V, D]``, tied to the embedding when
    ``tie_word_embeddings``), ``rotary``.

    Attributes:
        config: the :class:`ModelConfig`.
        gradient_checkpointing: recompute each layer in backward (set by the trainer; only in
            training mode and without a KV cache).
        num_eager_decode_tokens: batch-1 tokens :func:`~moekit.models.generation.generate` decoded
            on the eager fast path so far (0 at construction); ``compile="auto"`` compiles the
            decode step once this reaches its threshold.
        decode_compiled: a compiled decode step has run for this model (False at construction),
            so ``compile="auto"`` reuses the cached graph from then on.

    Provenance, set by the function that produced the model (None or empty when it did not):
        name_or_path: the folder it was loaded from (``moekit.convert`` sets it; ``save_hf`` copies
            the tokenizer from there).
        hf_token_ids: the HF config's special-token ids (``bos_token_id``, ...) to write back on export.
        quant_config: the quantization config with the widths used (``moekit.compress``), which
            ``save_quantized`` writes; None for an unquantized model.
        pruned_experts: per MoE layer, the old expert ids kept (``surgery.prune``).
        merged_groups: per MoE layer, the groups of old expert ids merged into each new expert
            (``surgery.merge``).
        dmu_clusters: ``[N]`` the cluster id of each input sequence (``surgery.dmu``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.num_eager_decode_tokens = 0
        self.decode_compiled = False
        self.name_or_path: str | None = None
        self.hf_token_ids: dict[str, int] = {}
        self.quant_config: Any = None  # a moekit.compress config (a higher floor: not imported here)
        self.pruned_experts: list[list[int]] | None = None
        self.merged_groups: list[list[list[int]]] | None = None
        self.dmu_clusters: Tensor | None = None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=config.lm_head_bias)
        self.rotary = RotaryEmbedding(config.rope_config())
        self.tie_weights()
        self.init_weights()

    def embed(self, input_ids_BS: Tensor) -> Tensor:
        """Token embeddings ``[B, S, D]``, times ``embedding_multiplier`` (Granite; 1 elsewhere)."""
        x_BSD = self.embed_tokens(input_ids_BS)
        m = self.config.embedding_multiplier
        return x_BSD if m == 1.0 else x_BSD * m

    def lm_logits(self, x_BSD: Tensor) -> Tensor:
        """Logits ``[..., V]`` of final hidden states: ``lm_head(norm(x)) / logits_scaling``."""
        logits = apply_linear(self.lm_head, self.norm(x_BSD))
        s = self.config.logits_scaling
        return logits if s == 1.0 else logits / s

    def tie_weights(self) -> None:
        """Makes ``lm_head`` share the embedding when ``tie_word_embeddings`` (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def tied_weight_names(self) -> list[str]:
        """State-dict names that alias another tensor, so model folders do not store them."""
        return ["lm_head.weight"] if self.config.tie_word_embeddings else []

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs in layer order (what ``routing`` aligns with)."""
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by role, from module types (the ``--freeze`` groups).

        ``router``, ``experts`` (MoE++ constant experts included), ``shared`` (shared experts and
        PR-MoE's residual branch), ``attention``, ``embeddings`` (``embed_tokens``, ``lm_head``),
        ``norms``, ``dense_ffn``, ``non_experts`` (all but router/experts/shared),
        ``all_but_router``, ``all_but_experts``. Names are ``named_parameters()`` names.
        """
        from moekit.models.param_groups import module_param_names, moe_parameter_groups

        groups = moe_parameter_groups(self)
        known = {name for name, _ in self.named_parameters()}
        groups["attention"] = [
            n
            for i, layer in enumerate(self.layers)
            for n in module_param_names(layer.self_attn, f"layers.{i}.self_attn")
        ]
        groups["embeddings"] = [
            n
            for n in module_param_names(self.embed_tokens, "embed_tokens")
            + module_param_names(self.lm_head, "lm_head")
            if n in known
        ]
        groups["dense_ffn"] = [
            n
            for i, layer in enumerate(self.layers)
            if not isinstance(layer.mlp, MoELayer)
            for n in module_param_names(layer.mlp, f"layers.{i}.mlp")
        ]
        return groups

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialises every weight here, in one place.

        Linear and embedding weights ~ N(0, initializer_range), biases 0, norms 1. Projections that
        write into the residual stream (``o_proj``, FFN/expert ``w_out``) get std divided by
        sqrt(2 * num_layers) so the stream's variance does not grow with depth (GPT-2). Experts use
        the same std as dense FFNs, so a 1-expert MoE starts like a dense model. Mamba mixers keep
        their own SSM init (:meth:`~moekit.blocks.MambaMixer.reset_ssm_parameters`) and PyTorch's
        conv init. Trainable routers
        start at N(0, initializer_range): near-uniform routing. Frozen routers (SMoE-Dropout) keep
        the layer's own init because their logit scale is their routing sharpness forever. The
        gating-residual projection and the expert bias stay zero: a new layer routes as if it had
        neither.
        """
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, StackedExpertWeights):
                nn.init.normal_(module.w_in, std=std)
                nn.init.normal_(module.w_out, std=out_std)
            elif isinstance(module, LoRAExpertWeights):  # base like a dense FFN; B = 0
                nn.init.normal_(module.w_in, std=std)
                nn.init.normal_(module.w_out, std=out_std)
                module.reset_lora()
        for layer in self.layers:
            if layer.mamba is not None:
                nn.init.normal_(layer.mamba.out_proj.weight, std=out_std)
                layer.mamba.reset_ssm_parameters()  # A, D and the time-step bias, overwritten above
            elif isinstance(layer.self_attn, MixtureOfAttentionHeads):
                layer.self_attn.reset_parameters(std, out_std)
            elif isinstance(layer.self_attn, LightningAttention):
                nn.init.normal_(layer.self_attn.out_proj.weight, std=out_std)
            else:
                nn.init.normal_(layer.self_attn.o_proj.weight, std=out_std)
                if getattr(layer.self_attn, "sinks", None) is not None:
                    nn.init.zeros_(layer.self_attn.sinks)  # a new sink starts at logit 0
            mlp = layer.mlp
            if isinstance(mlp, FeedForward):
                nn.init.normal_(mlp.w_out.weight, std=out_std)
                continue
            router = mlp.router
            if router.weight is None:  # centroid routing: no projection; k-means sets the centroids
                router.reset_parameters()
            elif router.weight.requires_grad:
                nn.init.normal_(router.weight, std=std)
                if router.bias is not None:
                    nn.init.zeros_(router.bias)
            else:
                router.reset_parameters()
            if router.residual_weight is not None:
                nn.init.zeros_(router.residual_weight)
            if router.expert_bias is not None:
                router.expert_bias.zero_()
            if mlp.config.num_constant_experts:
                # The MoE++ code draws v ~ N(0, 1); here the residual stream has std ~0.02, so v
                # that large would swamp it. Use the model's init scale instead.
                nn.init.normal_(mlp.const_gate, std=std)
                nn.init.normal_(mlp.const_vec, std=std)
            if mlp.config.shared_ffn_dim:
                nn.init.normal_(mlp.shared.w_out.weight, std=out_std)
            if mlp.output_bias is not None:
                nn.init.zeros_(mlp.output_bias)
            if mlp.config.residual_moe:
                nn.init.normal_(mlp.residual_mlp.w_out.weight, std=out_std)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        output_router_logits: bool = False,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        position_ids: Tensor | None = None,
        moe_k: int | None = None,
        inputs_embeds: Tensor | None = None,
        shift_labels: Tensor | None = None,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """Runs the model (Hugging Face calling conventions).

        Args:
            input_ids: ``[B, S]`` int64 token ids (the new tokens when a cache is given).
            attention_mask: ``[B, P + S]``, 1 for real tokens and 0 for padding (left padding for
                generation); covers the cached tokens too. None means every token is real.
            labels: ``[B, S]`` targets aligned with ``input_ids``; shifted inside (token t predicts
                label t + 1); -100 is ignored.
            output_router_logits: accepted for HF compatibility; ``routing`` is always returned.
            past_key_values: a :class:`KVCache` from an earlier call (P cached tokens).
            use_cache: return a cache (a new one when ``past_key_values`` is None).
            position_ids: ``[B, S]``; by default the cumulative sum of ``attention_mask`` minus 1
                (so left padding does not shift positions), else ``P + arange(S)``.
            moe_k: experts per token for every MoE layer in this call (overrides ``top_k``).
            inputs_embeds: ``[B, S, D]`` used instead of ``embed_tokens(input_ids)`` (a VLM splices
                image features into them); ``input_ids`` still gives the shape.
            shift_labels: ``[B, S]`` targets already aligned with the positions (position t is
                scored on ``shift_labels[t]``), used instead of ``labels`` (transformers' name).
            return_logits: False with labels computes the loss chunk by chunk without the
                ``[B, S, V]`` logits (:func:`moekit.kernels.linear_ce.linear_cross_entropy`, the
                same loss and gradients); ``logits`` is then None. What training uses.

        Returns:
            :class:`CausalLMOutput`.
        """
        del output_router_logits  # routing is cheap and always returned
        cfg = self.config
        batch, num_new = input_ids.shape
        device = input_ids.device
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(cfg.num_layers)
        num_past = cache.seq_len if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.shape != (batch, num_past + num_new):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, "
                    f"{num_past + num_new}) = (batch, cached + new tokens)"
                )
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: take the fast causal path
        num_positions = None  # unknown for caller-given positions
        if position_ids is None:
            num_positions = num_past + num_new
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, num_past:]
            else:
                position_ids = torch.arange(num_past, num_past + num_new, device=device).expand(batch, -1)
        token_mask_BS = None if attention_mask is None else attention_mask[:, num_past:].to(torch.bool)
        mask_B1SK = attention_masks(cfg, attention_mask, batch, num_new, num_past, device)
        cos, sin = self.rotary(position_ids, num_positions)

        x_BSD = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        routing: list[RoutingInfo] = []
        layer_aux: list[Mapping[str, Tensor]] = []
        prev_logits_TE = None
        pregate_BSD = None  # pregated: the previous MoE layer's input, what the next one routes from
        use_residual = cfg.moe is not None and cfg.moe.gating_residual
        checkpointing = self.gradient_checkpointing and self.training and cache is None
        for layer in self.layers:
            args = (
                x_BSD,
                cos,
                sin,
                mask_B1SK,
                token_mask_BS,
                prev_logits_TE if use_residual else None,
                moe_k,
            )
            if checkpointing:
                x_BSD, moe_out = checkpoint(layer, *args, None, pregate_BSD, use_reentrant=False)
            else:
                x_BSD, moe_out = layer(*args, cache=cache, router_input_BSD=pregate_BSD)
            if moe_out is not None:
                routing.append(moe_out.routing)
                layer_aux.append(moe_out.aux_losses)
                prev_logits_TE = moe_out.routing.router_logits
                if cfg.pregated:
                    pregate_BSD = moe_out.moe_input
        if shift_labels is None and labels is not None:
            shift_labels = shifted_labels(labels)
        fused = not return_logits and shift_labels is not None and self._fused_loss_ok()
        logits_BSV = None if fused else self.lm_logits(x_BSD)

        aux_losses = mean_aux_losses(layer_aux)

        def weighted_aux() -> Tensor:
            # The config's recommended coefficients (HF convention); training weights come from
            # the objective (moekit.models.objectives), which does not read this.
            return LossWeights.from_model_config(cfg).weighted(aux_losses, x_BSD)

        out = CausalLMOutput(None, None, logits_BSV, aux_losses, routing, cache, aux_loss_fn=weighted_aux)
        if shift_labels is not None:
            if fused:
                h_ND = self.norm(x_BSD).reshape(-1, cfg.dim)
                out.lm_loss = linear_ce.linear_cross_entropy(
                    h_ND, self.lm_head.weight, self.lm_head.bias, shift_labels.reshape(-1), cfg.logits_scaling
                )
            else:
                out.lm_loss = token_cross_entropy(logits_BSV, shift_labels)
            out.loss = out.lm_loss + out.aux_loss
        return out

    #: ``forward(return_logits=False)`` is understood (the training objective checks this).
    supports_fused_loss = True

    def _fused_loss_ok(self) -> bool:
        # Only a plain head: a quantized, LoRA-wrapped or hooked one runs its own forward.
        head = self.lm_head
        return type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks)

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; tied weights count once.

        With ``active_only``, FFN-expert weights of each MoE layer count ``top_k / E`` of their
        size (E = all experts the router scores, so MoE++ zero-computation experts dilute it);
        routers, shared experts, dense layers, attention and embeddings count fully. For top-p
        and expert-choice routers ``top_k`` is only the nominal k, so the count is nominal too.
        """
        expert_params = {}
        if active_only:
            for mlp in self.moe_layers:
                frac = mlp.config.top_k / mlp.config.num_total_experts
                for p in mlp.experts.routed_parameters():
                    expert_params[id(p)] = frac
        seen, total = set(), 0.0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * expert_params.get(id(p), 1.0)
        return round(total)

    def generate(self, input_ids: Tensor, **kwargs) -> Tensor:
        """Generates up to ``max_new_tokens`` per row; returns ``[B, S + new]`` ids.

        Takes :func:`moekit.models.generation.generate`'s keyword arguments: HF's
        (``attention_mask``, ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``eos_token_id``, ``pad_token_id``, ``use_cache``, ``generator``,
        ``streamer``) and moekit's (``sampler``, ``moe_k``, ``compile``, ``source``).
        """
        from moekit.models.generation import generate

        return generate(self, input_ids, **kwargs)

    def save_pretrained(self, path: str | Path, format: str = "moekit") -> None:
        """Writes ``config.json`` and ``model.safetensors`` (see :mod:`moekit.models.io`); ``format="hf"``
        writes a Hugging Face folder through :func:`moekit.convert.save_hf`."""
        from moekit.models.io import save_pretrained

        save_pretrained(self, path, format=format)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> MoEForCausalLM:
        """Loads a folder written by :meth:`save_pretrained` (safetensors only)."""
        from moekit.models.io import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)
