"""Configs of the reusable blocks: :class:`RopeConfig`, :class:`AttentionConfig`, :class:`MLAConfig`.

Each is a small :class:`~moekit.config.JsonConfig` that names only what its block needs, so a
family (decoder LM, vision encoder, time-series forecaster) builds the blocks from its own config
without importing another family's. ``moekit.models.ModelConfig`` builds them with
``rope_config()``, ``attention_config()`` and ``mla_config()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moekit.config import JsonConfig, check_choice

QK_NORMS = ("none", "per_head", "full", "l2")
ROPE_TYPES = ("default", "linear", "yarn", "llama3")

# Keys each rope_scaling type accepts (HF's names). "rope_type" (HF >= 4.45) and "type" (older)
# both name the type.
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    },
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
_ROPE_REQUIRED = {
    "default": set(),
    "linear": {"factor"},
    "yarn": set(),  # factor may be derived from max_position_embeddings / original_max_position_embeddings
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    """``"default"`` without scaling, else ``rope_scaling["rope_type"]`` (or HF's older ``"type"``)."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def check_rope_scaling(owner: str, rope_scaling: Any, field: str = "rope_scaling") -> None:
    """Raises ``ValueError`` naming ``owner.field`` unless ``rope_scaling`` is None or a valid HF dict."""
    rs = rope_scaling
    if rs is None:
        return
    where = f"{owner}.{field}"
    if not isinstance(rs, dict):
        raise ValueError(f"{where} must be a dict or None, got {type(rs).__name__}")
    rope_type = rope_type_of(rs)
    check_choice(owner, f"{field}['rope_type']", rope_type, ROPE_TYPES)
    params = {k: v for k, v in rs.items() if k not in ("rope_type", "type")}
    unknown = sorted(set(params) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for rope_type={rope_type!r}; "
            f"valid keys are {sorted(_ROPE_KEYS[rope_type])}"
        )
    missing = sorted(_ROPE_REQUIRED[rope_type] - set(params))
    if missing:
        raise ValueError(f"{where}: rope_type={rope_type!r} needs key(s) {missing}")
    factor = params.get("factor")
    if factor is not None and factor < 1.0:
        raise ValueError(f"{where}['factor'] must be >= 1, got {factor}")
    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ValueError(f"{where}: llama3 needs high_freq_factor > low_freq_factor")


@dataclass(kw_only=True)
class RopeConfig(JsonConfig):
    """Rotary position embedding tables.

    Attributes:
        head_dim: the rotated width Dh (even).
        theta: RoPE base.
        scaling: ``None`` or an HF-style dict with ``"rope_type"`` (or ``"type"``) in ``"linear"``
            (factor), ``"yarn"`` (factor, original_max_position_embeddings, beta_fast, beta_slow,
            mscale, mscale_all_dim, attention_factor, truncate) or ``"llama3"`` (factor,
            original_max_position_embeddings, low_freq_factor, high_freq_factor).
        max_position_embeddings: positions the tables are precomputed for (they grow on demand);
            YaRN also derives a missing factor from it.
    """

    head_dim: int
    theta: float = 10000.0
    scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"RopeConfig.head_dim must be positive and even, got {self.head_dim}")
        if self.theta <= 0:
            raise ValueError(f"RopeConfig.theta must be positive, got {self.theta}")
        if self.max_position_embeddings <= 0:
            raise ValueError(
                f"RopeConfig.max_position_embeddings must be positive, got {self.max_position_embeddings}"
            )
        check_rope_scaling("RopeConfig", self.scaling, "scaling")

    @property
    def rope_type(self) -> str:
        """``"default"``, ``"linear"``, ``"yarn"`` or ``"llama3"``."""
        return rope_type_of(self.scaling)

    def inv_freq_and_scale(self) -> tuple[list[float], float]:
        """Inverse frequencies ``[head_dim // 2]`` and the cos/sin scale, per ``scaling``.

        Follows transformers' ``modeling_rope_utils`` for "linear", "yarn" and "llama3", so
        converted checkpoints see the same frequencies. Pure Python (float64), no torch.
        """
        dim, base = self.head_dim, self.theta
        inv = [base ** (-(2 * j) / dim) for j in range(dim // 2)]
        rs = self.scaling or {}
        rope_type = self.rope_type
        if rope_type == "default":
            return inv, 1.0
        if rope_type == "linear":
            return [f / rs["factor"] for f in inv], 1.0
        if rope_type == "llama3":
            return _llama3_inv_freq(inv, rs), 1.0
        return _yarn_inv_freq(inv, rs, dim, base, self.max_position_embeddings)


def _llama3_inv_freq(inv: list[float], rs: dict[str, Any]) -> list[float]:
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction: ``0.1 * mscale * ln(scale) + 1`` (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    inv: list[float], rs: dict[str, Any], dim: int, base: float, max_positions: int
) -> tuple[list[float], float]:
    orig = rs.get("original_max_position_embeddings") or max_positions
    factor = rs.get("factor") or max_positions / orig
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp, as transformers does
    out = []
    for j, f in enumerate(inv):
        extrapolation = 1.0 - min(max((j - low) / (high - low), 0.0), 1.0)
        out.append(f / factor * (1 - extrapolation) + f * extrapolation)
    return out, float(attention_factor)


@dataclass(kw_only=True)
class AttentionConfig(JsonConfig):
    """Causal GQA self-attention (:class:`~moekit.blocks.Attention`).

    Attributes:
        dim: model width D.
        num_heads: query heads H.
        num_kv_heads: key/value heads G (must divide H).
        head_dim: per-head width Dh.
        qk_norm: ``"none"``, ``"per_head"`` (RMSNorm over Dh, Qwen3), ``"full"`` (RMSNorm over
            the whole q/k projection width, OLMoE) or ``"l2"`` (weightless RMS normalisation over Dh
            of the rotated q/k, Llama 4).
        bias: biases on the q/k/v projections (Qwen2); the output projection has none.
        norm_eps: epsilon of the q/k RMSNorms.
        softmax_scale: the attention scale; ``None`` means ``Dh ** -0.5`` (Granite's
            ``attention_multiplier`` sets it).
        clip_qkv: clamp the q/k/v projections to ``[-clip_qkv, clip_qkv]`` (DBRX); ``None`` for no clamp.
        rope_interleave: q/k rotary dims are stored as interleaved pairs ``(x0, x1), (x2, x3), ...``
            (ERNIE 4.5); they are de-interleaved before the rotate-half rotation, which leaves every
            q.k product as the interleaved rotation gives it.
        out_bias: a bias on the output projection (PhiMoE).
        qk_norm_after_rope: the per-head q/k norms act on the rotated q/k (Hunyuan-MoE) instead of
            before the rotation.
        rope: rotate queries and keys; False attends without positions (Jamba, whose Mamba
            layers carry the order).
        temperature_scale: None, or Llama 4's attention temperature tuning: queries at cache slot
            ``p`` are multiplied by ``1 + temperature_scale * log1p(floor((p + 1) / temperature_floor))``
            (long contexts sharpen attention; 1 for the first ``temperature_floor - 1`` tokens).
        temperature_floor: the token scale of that tuning.
        sinks: a learned per-head logit ``sinks [H]`` joins each softmax denominator (GPT-OSS
            attention sinks): a query may put weight on "nothing", and its attention weights then
            sum to less than 1.
    """

    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: str = "none"
    bias: bool = False
    norm_eps: float = 1e-6
    softmax_scale: float | None = None
    clip_qkv: float | None = None
    rope_interleave: bool = False
    out_bias: bool = False
    qk_norm_after_rope: bool = False
    rope: bool = True
    temperature_scale: float | None = None
    temperature_floor: int = 8192
    sinks: bool = False

    def __post_init__(self) -> None:
        if self.qk_norm_after_rope and self.qk_norm != "per_head":
            raise ValueError("AttentionConfig.qk_norm_after_rope needs qk_norm='per_head'")
        for name in ("dim", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AttentionConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"AttentionConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        check_choice("AttentionConfig", "qk_norm", self.qk_norm, QK_NORMS)
        if self.temperature_floor <= 0:
            raise ValueError(
                f"AttentionConfig.temperature_floor must be positive, got {self.temperature_floor}"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"AttentionConfig.norm_eps must be positive, got {self.norm_eps}")
        for name in ("softmax_scale", "clip_qkv"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"AttentionConfig.{name} must be positive or None, got {value}")


@dataclass(kw_only=True)
class MLAConfig(JsonConfig):
    """Multi-head latent attention (:class:`~moekit.blocks.MLAttention`, DeepSeek-V2/V3).

    Attributes:
        dim: model width D.
        num_heads: heads H.
        kv_lora_rank: R, the key/value latent width (what the KV cache stores per token).
        qk_nope_head_dim: Dn, per-head query/key width without RoPE (may be 0).
        qk_rope_head_dim: Dr, per-head query/key width with RoPE (even).
        v_head_dim: Dv, per-head value width.
        q_lora_rank: query compression rank Q; ``None`` projects queries directly (DeepSeek-V2-Lite).
        rope_interleave: the rotary dims are stored as interleaved pairs (DeepSeek checkpoints).
        softmax_scale: attention scale; ``None`` means ``(Dn + Dr) ** -0.5`` (see
            :func:`mla_softmax_scale` for the YaRN correction).
    """

    dim: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_interleave: bool = False
    softmax_scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "num_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MLAConfig.{name} must be positive, got {getattr(self, name)}")
        if self.qk_nope_head_dim < 0 or self.qk_rope_head_dim % 2:
            raise ValueError(
                "MLAConfig: MLA needs qk_nope_head_dim >= 0 and an even qk_rope_head_dim, got "
                f"{self.qk_nope_head_dim}, {self.qk_rope_head_dim}"
            )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"MLAConfig.q_lora_rank must be positive or None, got {self.q_lora_rank}")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            raise ValueError(f"MLAConfig.softmax_scale must be positive or None, got {self.softmax_scale}")


def mla_softmax_scale(
    qk_nope_head_dim: int, qk_rope_head_dim: int, rope_scaling: dict[str, Any] | None
) -> float:
    """``(Dn + Dr) ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN (DeepSeek)."""
    scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
    rs = rope_scaling or {}
    if rope_type_of(rope_scaling) != "default" and rs.get("mscale_all_dim"):
        mscale = yarn_mscale(rs.get("factor") or 1.0, rs["mscale_all_dim"])
        scale = scale * mscale * mscale
    return scale


@dataclass(kw_only=True)
class MoAConfig(JsonConfig):
    """Mixture of attention heads (:class:`~moekit.blocks.MixtureOfAttentionHeads`, JetMoE).

    Each token's router picks ``top_k`` of ``num_experts`` attention experts (softmax over the
    chosen logits); expert ``e`` owns a query projection ``[G*Dh, D]`` and an output projection
    ``[D, G*Dh]``, all experts share one key/value projection. So a token attends with
    ``H = top_k * G`` query heads, and its output is the routing-weighted sum of its experts'
    output projections plus one bias ``[D]``.

    Attributes:
        dim: model width D.
        num_experts: attention experts E.
        top_k: experts per token K.
        num_kv_heads: key/value heads G (each expert's query has G heads too).
        head_dim: per-head width Dh.
    """

    dim: int
    num_experts: int
    top_k: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("dim", "num_experts", "top_k", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MoAConfig.{name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoAConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")


@dataclass(kw_only=True)
class LightningConfig(JsonConfig):
    """Lightning (linear) attention (:class:`~moekit.blocks.LightningAttention`, MiniMax).

    Attributes:
        dim: model width D.
        num_heads: heads H.
        head_dim: per-head width Dh.
        num_layers: decoder layers L (the decay rate of layer i falls linearly with i / (L - 1)).
        block_size: tokens per block of the parallel form (any value gives the same result).
        norm_eps: epsilon of the output RMSNorm (transformers' MiniMax uses 1e-6).
    """

    dim: int
    num_heads: int
    head_dim: int
    num_layers: int
    block_size: int = 256
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("dim", "num_heads", "head_dim", "num_layers", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LightningConfig.{name} must be positive, got {getattr(self, name)}")
        if self.norm_eps <= 0:
            raise ValueError(f"LightningConfig.norm_eps must be positive, got {self.norm_eps}")
