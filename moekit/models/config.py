"""Configuration of the MoE decoder language model (:class:`ModelConfig`).

One flat dataclass with the per-layer MoE template nested as a :class:`~moekit.layers.MoEConfig`.
Field names are moekit's own (``num_`` prefix for counts); Hugging Face names appear only in the
converters' key maps. The fields cover what the HF MoE families need:

    Mixtral      moe (softmax top-2), sliding_window, rope_theta
    Qwen2-MoE    attention_bias, moe.shared_ffn_dim + moe.shared_expert_gate, moe.norm_topk_prob,
                 moe_layer_freq (decoder_sparse_step), explicit moe_layer_indices (mlp_only_layers)
    Qwen3-MoE    qk_norm="per_head", head_dim, moe.norm_topk_prob
    OLMoE        qk_norm="full" (RMSNorm over the whole q/k projection width)
    DeepSeek-V3  num_dense_first_layers (first_k_dense_replace), moe.score_func="sigmoid", expert
                 groups, moe.use_expert_bias, moe.routed_scaling_factor, rope_scaling "yarn"
                 attention_type="mla" (multi-head latent attention: q_lora_rank, kv_lora_rank,
                 qk_nope_head_dim, qk_rope_head_dim, v_head_dim), rope_interleave
    GLM-4-MoE    partial_rotary_factor (plus DeepSeek-V3's routing on GQA attention)
    Granite-MoE  embedding_multiplier, residual_multiplier, attention_multiplier, logits_scaling,
                 moe.softmax_order="after_topk"
    ERNIE 4.5    rope_interleave on GQA attention, moe.use_expert_bias with softmax scores
    PhiMoE       norm_type="layernorm" + norm_bias, attention_out_bias, lm_head_bias,
                 moe.router_type="sparsemixer"
    DBRX         clip_qkv, norm_type="layernorm"
    Hunyuan-MoE  qk_norm_after_rope
    FlexOlmo     norm_placement="post"
    JetMoE       attention_type="moa" (moa_num_experts, moa_top_k), moe.output_bias
    Llama 4      nope_layer_indices, qk_norm="l2", attention temperature, "chunked" layers, moe.weights_on_input
    MiniMax      layer_types "linear", norm_placement="normed_residual", residual_scales
    GPT-OSS      attention_sinks, attention_layer_types, moe.activation="swiglu_clamped", moe.ffn_bias
The family fields come last in the field list, each neutral by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.blocks.config import (
    QK_NORMS,
    AttentionConfig,
    MLAConfig,
    RopeConfig,
    check_rope_scaling,
    mla_softmax_scale,
    rope_type_of,
)
from moekit.blocks.ssm import MambaConfig
from moekit.config import JsonConfig, check_choice
from moekit.layers.config import ACTIVATIONS, MoEConfig
from moekit.models.attention_layout import AttentionLayout

MOE_PLACEMENTS = ("all", "every_other", "first_half", "second_half", "explicit", "none")
ATTENTION_TYPES = ("mha", "mla", "moa")
NORM_TYPES = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post", "normed_residual")
LAYER_TYPES = ("attention", "mamba", "linear")
_AUX_COEFS = ("aux_loss_coef", "z_loss_coef", "seq_balance_coef", "entropy_loss_coef")


@dataclass(kw_only=True)
class ModelConfig(JsonConfig, AttentionLayout):
    """A decoder-only language model whose FFNs are dense or MoE, chosen per layer.

    Shape:
        vocab_size: V.
        dim: model width D.
        num_layers: decoder layers L.
        num_heads: query heads H.
        num_kv_heads: key/value heads (GQA); ``None`` means ``num_heads`` (plain multi-head).
        head_dim: per-head width; ``None`` means ``dim // num_heads`` (see :attr:`attn_head_dim`).
        ffn_dim: width of the dense FFN (unused, may be 0, when every layer is MoE).
        dense_ffn_activation: ``"swiglu"`` or ``"gelu"`` for dense layers.

    MoE placement (see :meth:`is_moe_layer`):
        moe: the per-layer MoE template; ``None`` makes a dense model. ``moe.dim`` must equal ``dim``.
        moe_placement: ``"all"``, ``"every_other"`` (odd layers 1, 3, ...), ``"first_half"``,
            ``"second_half"``, ``"explicit"`` (exactly ``moe_layer_indices``) or ``"none"``.
        moe_layer_indices: the MoE layers for ``"explicit"``.
        num_dense_first_layers: the first N layers stay dense (DeepSeek ``first_k_dense_replace``).
        moe_layer_freq: layer i can be MoE only if ``(i + 1) % moe_layer_freq == 0`` (Qwen2-MoE
            ``decoder_sparse_step``).
        experts_per_layer: FFN experts of each MoE layer in order (PR-MoE pyramids); ``None`` uses
            ``moe.num_experts`` everywhere. ``moe.gating_residual`` lives in the template too.

    Attention:
        rope_theta: RoPE base.
        rope_scaling: ``None`` or an HF-style dict with ``"rope_type"`` (or ``"type"``) in
            ``"linear"`` (factor), ``"yarn"`` (factor, original_max_position_embeddings, beta_fast,
            beta_slow, mscale, mscale_all_dim, attention_factor, truncate) or ``"llama3"`` (factor,
            original_max_position_embeddings, low_freq_factor, high_freq_factor).
        max_position_embeddings: positions the RoPE tables are precomputed for (they grow on demand).
        qk_norm: ``"none"``, ``"per_head"`` (RMSNorm over head_dim, Qwen3) or ``"full"`` (RMSNorm
            over the whole q/k projection width, OLMoE).
        attention_bias: biases on the q/k/v projections (Qwen2); the output projection has none.
        sliding_window: each token sees itself and the previous ``sliding_window - 1`` tokens.
        attention_type: ``"mha"`` (GQA with q/k/v projections, see :class:`~moekit.blocks.Attention`)
            or ``"mla"`` (DeepSeek multi-head latent attention, :class:`~moekit.blocks.MLAttention`;
            ``num_kv_heads``, ``head_dim``, ``qk_norm`` and ``attention_bias`` do not apply), or
            ``"moa"`` (JetMoE's mixture of attention heads, see ``moa_num_experts``).
        q_lora_rank: MLA query compression rank; ``None`` projects queries directly (DeepSeek-V2-Lite).
        kv_lora_rank: MLA key/value latent width (what the KV cache stores per token).
        qk_nope_head_dim, qk_rope_head_dim: MLA per-head query/key widths without and with RoPE.
        v_head_dim: MLA per-head value width.
        rope_interleave: the rotary dims are stored as interleaved pairs ``(x0, x1), (x2, x3), ...``
            instead of halves (DeepSeek checkpoints); the math de-interleaves before rotating.

    Other:
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: ``lm_head`` shares the embedding matrix.
        initializer_range: std of the normal init.
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's special ids, when known
            (written to Hugging Face exports and ``generation_config.json``, so ``generate`` stops
            at end of text there too). ``eos_token_id`` may list several ids.

    Family features (appended; each neutral by default):
        partial_rotary_factor: RoPE rotates the first ``int(head_dim * factor)`` dims of each GQA
            head and passes the rest through (GLM-4-MoE: 0.5). 1.0 rotates the whole head.
        embedding_multiplier: scales the token embeddings (Granite).
        residual_multiplier: scales each attention and FFN output before it joins the residual
            stream (Granite).
        attention_multiplier: the attention softmax scale; ``None`` means ``head_dim ** -0.5``
            (Granite).
        logits_scaling: the LM logits are divided by it (Granite).
        clip_qkv: clamps the q/k/v projections to ``[-clip_qkv, clip_qkv]`` (DBRX); None: no clamp.
        norm_type: ``"rmsnorm"`` or ``"layernorm"`` (mean-centred ``nn.LayerNorm``, eps ``rms_norm_eps``;
            PhiMoE, DBRX) for the layer norms and the final norm (q/k norms stay RMSNorm).
        norm_bias: the LayerNorms have a bias (PhiMoE); only with ``norm_type="layernorm"``.
        attention_out_bias: the attention output projection has a bias (PhiMoE's ``attention_bias``).
        lm_head_bias: the LM head has a bias (PhiMoE ``lm_head_bias``).
        qk_norm_after_rope: the per-head q/k norms act after the rotation (Hunyuan-MoE).
        norm_placement: ``"pre"`` (``x + f(norm(x))``, every family but OLMo-2 style ones) or
            ``"post"`` (``x + norm(f(x))``: the layer has ``post_attention_layernorm`` and
            ``post_feedforward_layernorm`` and no ``input_layernorm``; FlexOlmo).
        attention_sinks: each attention head has a learned sink logit in its softmax denominator
            (GPT-OSS; :func:`~moekit.blocks.attend_with_sinks`).
        attention_layer_types: per layer ``"full"`` (causal), ``"sliding"`` (``sliding_window``)
            or ``"chunked"`` (``attention_chunk_size``); None means ``"sliding"`` everywhere when
            ``sliding_window`` is set, else ``"full"`` (see :meth:`attention_mask_type`). GPT-OSS
            alternates sliding and full layers.
        attention_chunk_size: the chunk of ``"chunked"`` layers (each token sees the earlier tokens
            of its own chunk only; Llama 4).
        nope_layer_indices: layers without RoPE (Llama 4's NoPE layers; ``use_rope=False``: all);
            with ``qk_norm="l2"`` only the RoPE layers norm q/k, as Llama 4 does.
        residual_scales: None, or ``((a, b) per "attention", "linear", "mlp")`` as a 6-tuple: each
            sublayer gives ``a * residual + b * branch`` (MiniMax's alpha/beta factors).
            ``norm_placement="normed_residual"`` makes the residual the *normed* input (MiniMax).
        moa_num_experts, moa_top_k: with ``attention_type="moa"`` (JetMoE's mixture of attention
            heads, :class:`~moekit.blocks.MixtureOfAttentionHeads`): the attention experts and how
            many each token uses; ``num_heads`` must be ``num_kv_heads * moa_top_k``.
        attention_temperature_scale: None, or Llama 4's attention temperature tuning on the layers
            without RoPE (see :class:`~moekit.blocks.AttentionConfig` ``temperature_scale``).
        attention_floor_scale: its token scale (``floor_scale``).
        With ``attention_type="mha"``, ``rope_interleave`` stores q/k rotary dims as interleaved pairs
        (ERNIE 4.5).

    Token mixers (hybrid layouts, see :meth:`layer_type`; :func:`~moekit.models.layer_layouts.periodic_layer_types` builds
    Jamba's periods, :func:`~moekit.models.layer_layouts.layout_from_pattern` BlackMamba-style strings):
        layer_types: per layer ``"attention"`` (``attention_type``: GQA or MLA), ``"mamba"``
            (:class:`~moekit.blocks.MambaMixer`) or ``"linear"`` (MiniMax's lightning attention,
            :class:`~moekit.blocks.LightningAttention`, ``linear_block_size``); None: attention.
        mamba: the Mamba mixer of every ``"mamba"`` layer (required with one); ``mamba.dim`` must
            equal ``dim``.
        use_rope: rotate queries and keys; False gives attention without positions (Jamba).

    Routing:
        pregated: Pre-gated MoE (Hwang et al., ISCA'24): every MoE layer after the first routes
            from the previous MoE layer's input (its router is the pre-gate that layer computes one
            block early), so layer l+1's experts are known, and can be fetched, while layer l runs.
            The first MoE layer routes from its own input. ``moekit.surgery.to_pregated`` converts
            a trained model, which then needs fine-tuning. No Hugging Face family has it.

    Recommended loss coefficients (aux losses are averaged over MoE layers). Training does not read
    these directly: the objective's weights come from ``TrainConfig`` (``aux_loss_coef`` etc.) and
    fall back to these values when the TrainConfig leaves them None. They stay in the model config
    because ``forward(labels=...)`` follows the Hugging Face convention of adding the weighted aux
    loss (``router_aux_loss_coef`` lives in an HF config too) and converters carry them over:
        aux_loss_coef: on ``aux_losses["load_balance"]``.
        z_loss_coef: on ``aux_losses["z_loss"]``.
        seq_balance_coef: on ``aux_losses["seq_balance"]`` (DeepSeek-V3 sequence-wise balance).
        entropy_loss_coef: on ``aux_losses["entropy"]`` (top-p routing's dynamic loss).
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int = 0
    dense_ffn_activation: str = "swiglu"

    moe: MoEConfig | None = None
    moe_placement: str = "all"
    moe_layer_indices: tuple[int, ...] | None = None
    num_dense_first_layers: int = 0
    moe_layer_freq: int = 1
    experts_per_layer: tuple[int, ...] | None = None

    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    qk_norm: str = "none"
    attention_bias: bool = False
    sliding_window: int | None = None
    attention_type: str = "mha"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    seq_balance_coef: float = 0.0
    entropy_loss_coef: float = 0.0

    partial_rotary_factor: float = 1.0
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    clip_qkv: float | None = None
    norm_type: str = "rmsnorm"
    norm_bias: bool = False
    attention_out_bias: bool = False
    lm_head_bias: bool = False
    qk_norm_after_rope: bool = False
    norm_placement: str = "pre"
    layer_types: tuple[str, ...] | None = None
    mamba: MambaConfig | None = None
    use_rope: bool = True
    pregated: bool = False
    attention_sinks: bool = False
    attention_layer_types: tuple[str, ...] | None = None
    attention_chunk_size: int | None = None
    nope_layer_indices: tuple[int, ...] | None = None
    moa_num_experts: int = 0
    moa_top_k: int = 0
    linear_block_size: int = 256
    residual_scales: tuple[float, ...] | None = None
    attention_temperature_scale: float | None = None
    attention_floor_scale: int = 8192

    def __post_init__(self) -> None:
        name = "ModelConfig"
        for field in ("vocab_size", "dim", "num_layers", "num_heads", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{name}.{field} must be positive, got {getattr(self, field)}")
        if self.moe_layer_indices is not None:
            self.moe_layer_indices = tuple(self.moe_layer_indices)
        if self.experts_per_layer is not None:
            self.experts_per_layer = tuple(self.experts_per_layer)
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(
                f"{name}.head_dim must be positive (or None for dim // num_heads), got {self.head_dim}"
            )
        if self.head_dim is None and self.dim % self.num_heads:
            raise ValueError(
                f"{name}.num_heads={self.num_heads} does not divide dim={self.dim}; change num_heads "
                "or set head_dim explicitly"
            )
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ValueError(
                f"{name}.num_kv_heads={self.num_kv_heads} must be positive and divide num_heads={self.num_heads}"
            )
        if self.ffn_dim < 0:
            raise ValueError(f"{name}.ffn_dim must be >= 0, got {self.ffn_dim}")
        check_choice(name, "dense_ffn_activation", self.dense_ffn_activation, ACTIVATIONS)
        check_choice(name, "moe_placement", self.moe_placement, MOE_PLACEMENTS)
        check_choice(name, "qk_norm", self.qk_norm, QK_NORMS)
        check_choice(name, "attention_type", self.attention_type, ATTENTION_TYPES)
        if self.attention_type == "mla":
            for field in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, field) <= 0:
                    raise ValueError(f"{name}.{field} must be positive with attention_type='mla'")
            if self.qk_nope_head_dim < 0 or self.qk_rope_head_dim % 2:
                raise ValueError(
                    f"{name}: MLA needs qk_nope_head_dim >= 0 and an even qk_rope_head_dim, got "
                    f"{self.qk_nope_head_dim}, {self.qk_rope_head_dim}"
                )
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                raise ValueError(f"{name}.q_lora_rank must be positive or None, got {self.q_lora_rank}")
            if self.qk_norm != "none":
                raise ValueError(f"{name}.qk_norm={self.qk_norm!r} does not apply to attention_type='mla'")
        elif self.rope_interleave and self.partial_rotary_factor != 1.0:
            raise ValueError(f"{name}.rope_interleave is not implemented with partial_rotary_factor < 1")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"{name}.rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"{name}.rope_theta must be positive, got {self.rope_theta}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"{name}.sliding_window must be positive or None, got {self.sliding_window}")
        if self.initializer_range <= 0:
            raise ValueError(f"{name}.initializer_range must be positive, got {self.initializer_range}")
        for field in _AUX_COEFS:
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field} must be >= 0, got {getattr(self, field)}")
        self._check_rope_scaling()
        self._check_family_features()
        self._check_placement()
        self._check_mixers()
        if self.ffn_dim == 0 and self.num_moe_layers < self.num_layers:
            raise ValueError(
                f"{name}.ffn_dim must be positive: layers {self.dense_layer_indices} are dense "
                "(set ffn_dim, or place MoE in every layer)"
            )

    def _check_rope_scaling(self) -> None:
        check_rope_scaling("ModelConfig", self.rope_scaling)

    def _check_family_features(self) -> None:
        name = "ModelConfig"
        factor = self.partial_rotary_factor
        if not (0.0 < factor <= 1.0):
            raise ValueError(f"{name}.partial_rotary_factor must be in (0, 1], got {factor}")
        if factor != 1.0:
            if self.attention_type != "mha":
                raise ValueError(f"{name}.partial_rotary_factor applies to attention_type='mha' only")
            rot = int(self.attn_head_dim * factor)
            if rot <= 0 or rot % 2:
                raise ValueError(
                    f"{name}.partial_rotary_factor={factor} rotates {rot} of head_dim={self.attn_head_dim} "
                    "dims; it must be a positive even number"
                )
        check_choice(name, "norm_type", self.norm_type, NORM_TYPES)
        check_choice(name, "norm_placement", self.norm_placement, NORM_PLACEMENTS)
        if self.norm_bias and self.norm_type != "layernorm":
            raise ValueError(f"{name}.norm_bias needs norm_type='layernorm' (RMSNorm has no bias)")
        if self.attention_out_bias and self.attention_type != "mha":
            raise ValueError(f"{name}.attention_out_bias applies to attention_type='mha' only")
        if self.qk_norm_after_rope and self.qk_norm != "per_head":
            raise ValueError(f"{name}.qk_norm_after_rope needs qk_norm='per_head'")
        if self.lm_head_bias and self.tie_word_embeddings:
            raise ValueError(f"{name}.lm_head_bias cannot be combined with tie_word_embeddings")
        for field in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{name}.{field} must be positive, got {getattr(self, field)}")
        for field in ("attention_multiplier", "clip_qkv"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"{name}.{field} must be positive or None, got {value}")
            if value is not None and self.attention_type != "mha":
                raise ValueError(f"{name}.{field} applies to attention_type='mha' only")

    def _check_placement(self) -> None:
        name = "ModelConfig"
        if self.moe is not None and self.moe.dim != self.dim:
            raise ValueError(f"{name}.moe.dim={self.moe.dim} must equal dim={self.dim}")
        if self.moe_layer_freq < 1:
            raise ValueError(f"{name}.moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if not (0 <= self.num_dense_first_layers <= self.num_layers):
            raise ValueError(
                f"{name}.num_dense_first_layers must be in [0, num_layers={self.num_layers}], "
                f"got {self.num_dense_first_layers}"
            )
        if self.moe_placement == "explicit":
            idx = self.moe_layer_indices
            if idx is None:
                raise ValueError(f"{name}.moe_layer_indices is required when moe_placement='explicit'")
            if any(not (0 <= i < self.num_layers) for i in idx) or len(set(idx)) != len(idx):
                raise ValueError(
                    f"{name}.moe_layer_indices={list(idx)} must be distinct layer indices in [0, {self.num_layers})"
                )
            if self.moe_layer_freq != 1 or self.num_dense_first_layers != 0:
                raise ValueError(
                    f"{name}: moe_placement='explicit' lists the MoE layers itself; set moe_layer_freq=1 "
                    "and num_dense_first_layers=0"
                )
        elif self.moe_layer_indices is not None:
            raise ValueError(
                f"{name}.moe_layer_indices is only used with moe_placement='explicit' "
                f"(got moe_placement={self.moe_placement!r}); remove it or switch to 'explicit'"
            )
        if self.moe is None and self.moe_placement == "explicit":
            raise ValueError(f"{name}.moe is None but moe_placement='explicit' lists MoE layers; set moe")
        if self.experts_per_layer is not None:
            if self.moe is None:
                raise ValueError(f"{name}.experts_per_layer needs moe to be set")
            if len(self.experts_per_layer) != self.num_moe_layers:
                raise ValueError(
                    f"{name}.experts_per_layer has {len(self.experts_per_layer)} entries but the model has "
                    f"{self.num_moe_layers} MoE layers {self.moe_layer_ids}; give one count per MoE layer"
                )
            for i in self.moe_layer_ids:
                try:
                    self.moe_config(i)
                except ValueError as err:
                    raise ValueError(f"{name}.experts_per_layer: MoE layer {i} is invalid: {err}") from err
            if self.moe.gating_residual and len(set(self.experts_per_layer)) > 1:
                raise ValueError(
                    f"{name}.experts_per_layer={list(self.experts_per_layer)}: moe.gating_residual needs the "
                    "same expert count in every MoE layer (the residual maps logits [E] -> [E])"
                )

    def _check_mixers(self) -> None:
        name = "ModelConfig"
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"{name}.layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}; "
                    "give one per layer"
                )
            for t in self.layer_types:
                check_choice(name, "layer_types[...]", t, LAYER_TYPES)
        if self.mamba_layer_ids and self.mamba is None:
            raise ValueError(
                f"{name}: layers {self.mamba_layer_ids} are 'mamba' but mamba is None; set mamba"
            )
        if self.mamba is not None and self.mamba.dim != self.dim:
            raise ValueError(f"{name}.mamba.dim={self.mamba.dim} must equal dim={self.dim}")
        if not self.use_rope and self.attention_type == "mla":
            raise ValueError(f"{name}.use_rope=False is only implemented for attention_type='mha'")
        if self.pregated and self.moe is None:
            raise ValueError(f"{name}.pregated needs MoE layers (moe is None)")
        if self.pregated and self.moe.gating_residual:
            raise ValueError(f"{name}.pregated cannot be combined with moe.gating_residual")
        self._check_attention_masks()
        self._check_nope()
        self._check_moa()
        self._check_linear()

    def layer_type(self, i: int) -> str:
        """Layer ``i``'s token mixer: ``"attention"`` or ``"mamba"``."""
        if not (0 <= i < self.num_layers):
            raise IndexError(f"layer {i} out of range [0, {self.num_layers})")
        return "attention" if self.layer_types is None else self.layer_types[i]

    @property
    def mamba_layer_ids(self) -> list[int]:
        """Indices of the Mamba layers, ascending (empty for a pure-attention model)."""
        return [i for i, t in enumerate(self.layer_types or ()) if t == "mamba"]

    @property
    def attn_head_dim(self) -> int:
        """The per-head width actually used: ``head_dim`` or ``dim // num_heads``."""
        return self.head_dim if self.head_dim is not None else self.dim // self.num_heads

    @property
    def attn_num_kv_heads(self) -> int:
        """The key/value head count actually used: ``num_kv_heads`` or ``num_heads``."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def rope_head_dim(self) -> int:
        """Width the RoPE tables cover: ``qk_rope_head_dim`` for MLA, else :attr:`attn_head_dim` times
        ``partial_rotary_factor``."""
        if self.attention_type == "mla":
            return self.qk_rope_head_dim
        return int(self.attn_head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        """``"default"`` without scaling, else ``rope_scaling["rope_type"]`` (or HF's older ``"type"``)."""
        return rope_type_of(self.rope_scaling)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` uses the MoE FFN.

        ``"explicit"`` means exactly ``i in moe_layer_indices``. Otherwise layer i is MoE iff the
        placement selects it (``all``; ``every_other``: i odd; ``first_half``: i < L // 2;
        ``second_half``: i >= L // 2; ``none``: never) and ``i >= num_dense_first_layers`` and
        ``(i + 1) % moe_layer_freq == 0``.
        """
        if not (0 <= i < self.num_layers):
            raise IndexError(f"layer {i} out of range [0, {self.num_layers})")
        if self.moe is None or self.moe_placement == "none":
            return False
        if self.moe_placement == "explicit":
            return i in (self.moe_layer_indices or ())
        half = self.num_layers // 2
        selected = {
            "all": True,
            "every_other": i % 2 == 1,
            "first_half": i < half,
            "second_half": i >= half,
        }[self.moe_placement]
        return selected and i >= self.num_dense_first_layers and (i + 1) % self.moe_layer_freq == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices of the MoE layers, ascending."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def dense_layer_indices(self) -> list[int]:
        """Indices of the dense-FFN layers, ascending."""
        return [i for i in range(self.num_layers) if not self.is_moe_layer(i)]

    @property
    def num_moe_layers(self) -> int:
        """How many layers are MoE."""
        return len(self.moe_layer_ids)

    def moe_config(self, i: int) -> MoEConfig:
        """The :class:`MoEConfig` of MoE layer ``i`` (the template with its expert count)."""
        if not self.is_moe_layer(i):
            raise ValueError(f"layer {i} is not an MoE layer (MoE layers: {self.moe_layer_ids})")
        assert self.moe is not None
        if self.experts_per_layer is None:
            return self.moe
        num_experts = self.experts_per_layer[self.moe_layer_ids.index(i)]
        return self.moe if num_experts == self.moe.num_experts else self.moe.replace(num_experts=num_experts)

    def rope_config(self) -> RopeConfig:
        """The :class:`~moekit.blocks.RopeConfig` of the model's rotary tables."""
        return RopeConfig(
            head_dim=self.rope_head_dim,
            theta=self.rope_theta,
            scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
        )

    def attention_config(self, i: int | None = None) -> AttentionConfig:
        """The :class:`~moekit.blocks.AttentionConfig` of GQA layer ``i`` (``attention_type="mha"``);
        ``i=None`` gives the RoPE layers' config (every layer's, without NoPE layers)."""
        rope = self.use_rope if i is None else self.layer_uses_rope(i)
        qk_norm = "none" if self.qk_norm == "l2" and not rope else self.qk_norm
        return AttentionConfig(
            dim=self.dim,
            num_heads=self.num_heads,
            num_kv_heads=self.attn_num_kv_heads,
            head_dim=self.attn_head_dim,
            qk_norm=qk_norm,
            bias=self.attention_bias,
            norm_eps=self.rms_norm_eps,
            softmax_scale=self.attention_multiplier,
            clip_qkv=self.clip_qkv,
            rope_interleave=self.rope_interleave,
            out_bias=self.attention_out_bias,
            qk_norm_after_rope=self.qk_norm_after_rope,
            rope=rope,
            temperature_scale=None if rope else self.attention_temperature_scale,
            temperature_floor=self.attention_floor_scale,
            sinks=self.attention_sinks,
        )

    def mla_config(self) -> MLAConfig:
        """The :class:`~moekit.blocks.MLAConfig` of every MLA layer (``attention_type="mla"``)."""
        return MLAConfig(
            dim=self.dim,
            num_heads=self.num_heads,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            q_lora_rank=self.q_lora_rank,
            rope_interleave=self.rope_interleave,
            softmax_scale=mla_softmax_scale(self.qk_nope_head_dim, self.qk_rope_head_dim, self.rope_scaling),
        )

    def rope_inv_freq_and_scale(self) -> tuple[list[float], float]:
        """RoPE inverse frequencies ``[rope_head_dim // 2]`` and the cos/sin scale, per ``rope_scaling``
        (see :meth:`moekit.blocks.RopeConfig.inv_freq_and_scale`)."""
        return self.rope_config().inv_freq_and_scale()
