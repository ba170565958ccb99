"""Per-layer attention options of :class:`~moekit.models.ModelConfig`, kept apart so config.py
stays short: the mask type of each layer (full, sliding, chunked), NoPE layers, and JetMoE's
mixture of attention heads. :class:`AttentionLayout` is a mixin of methods over ModelConfig's
fields (``attention_layer_types``, ``attention_chunk_size``, ``nope_layer_indices``,
``moa_num_experts``, ...); the fields and their docs live on ModelConfig.
"""

from __future__ import annotations

from moekit.blocks.config import LightningConfig, MoAConfig
from moekit.config import check_choice

ATTENTION_MASK_TYPES = ("full", "sliding", "chunked")


class AttentionLayout:
    """Validation and per-layer views of ModelConfig's attention-layout fields (a mixin)."""

    def _check_attention_masks(self) -> None:
        name = "ModelConfig"
        if self.attention_sinks and self.attention_type != "mha":
            raise ValueError(f"{name}.attention_sinks applies to attention_type='mha' only")
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            raise ValueError(
                f"{name}.attention_chunk_size must be positive or None, got {self.attention_chunk_size}"
            )
        types = self.attention_layer_types
        if types is None:
            if self.attention_chunk_size is not None:
                raise ValueError(
                    f"{name}.attention_chunk_size needs attention_layer_types with 'chunked' layers"
                )
            return
        self.attention_layer_types = types = tuple(types)
        if len(types) != self.num_layers:
            raise ValueError(
                f"{name}.attention_layer_types has {len(types)} entries for num_layers={self.num_layers}"
            )
        for t in types:
            check_choice(name, "attention_layer_types[...]", t, ATTENTION_MASK_TYPES)
        if "sliding" in types and self.sliding_window is None:
            raise ValueError(f"{name}.attention_layer_types has 'sliding' layers but sliding_window is None")
        if "chunked" in types and self.attention_chunk_size is None:
            raise ValueError(
                f"{name}.attention_layer_types has 'chunked' layers but attention_chunk_size is None"
            )

    def _check_nope(self) -> None:
        name = "ModelConfig"
        if self.nope_layer_indices is not None:
            self.nope_layer_indices = tuple(self.nope_layer_indices)
            idx = self.nope_layer_indices
            if any(not (0 <= i < self.num_layers) for i in idx) or len(set(idx)) != len(idx):
                raise ValueError(
                    f"{name}.nope_layer_indices={list(idx)} must be distinct layer indices in [0, {self.num_layers})"
                )
            if self.attention_type != "mha":
                raise ValueError(f"{name}.nope_layer_indices applies to attention_type='mha' only")
        if self.attention_floor_scale <= 0:
            raise ValueError(
                f"{name}.attention_floor_scale must be positive, got {self.attention_floor_scale}"
            )
        if self.attention_temperature_scale is not None and self.attention_type != "mha":
            raise ValueError(f"{name}.attention_temperature_scale applies to attention_type='mha' only")

    def _check_moa(self) -> None:
        name = "ModelConfig"
        if self.attention_type != "moa":
            if self.moa_num_experts or self.moa_top_k:
                raise ValueError(f"{name}.moa_num_experts/moa_top_k need attention_type='moa'")
            return
        if self.moa_num_experts <= 0 or not (1 <= self.moa_top_k <= self.moa_num_experts):
            raise ValueError(
                f"{name}: attention_type='moa' needs moa_num_experts > 0 and moa_top_k in [1, moa_num_experts], "
                f"got {self.moa_num_experts}, {self.moa_top_k}"
            )
        if self.num_heads != self.attn_num_kv_heads * self.moa_top_k:
            raise ValueError(
                f"{name}.num_heads={self.num_heads} must be num_kv_heads * moa_top_k = "
                f"{self.attn_num_kv_heads * self.moa_top_k} with attention_type='moa'"
            )
        for field, neutral in (("qk_norm", "none"), ("attention_bias", False), ("use_rope", True)):
            if getattr(self, field) != neutral:
                raise ValueError(f"{name}.{field} is not implemented with attention_type='moa'")

    def moa_config(self) -> MoAConfig:
        """The :class:`~moekit.blocks.MoAConfig` of every MoA layer (``attention_type="moa"``)."""
        return MoAConfig(
            dim=self.dim,
            num_experts=self.moa_num_experts,
            top_k=self.moa_top_k,
            num_kv_heads=self.attn_num_kv_heads,
            head_dim=self.attn_head_dim,
        )

    def layer_uses_rope(self, i: int) -> bool:
        """Whether layer ``i``'s attention rotates q/k (``use_rope`` and not a NoPE layer)."""
        return self.use_rope and i not in (self.nope_layer_indices or ())

    def attention_mask_type(self, i: int) -> str:
        """Layer ``i``'s attention mask: ``"full"``, ``"sliding"`` or ``"chunked"``."""
        if self.attention_layer_types is not None:
            return self.attention_layer_types[i]
        return "full" if self.sliding_window is None else "sliding"

    def _check_linear(self) -> None:
        name = "ModelConfig"
        if self.linear_block_size <= 0:
            raise ValueError(f"{name}.linear_block_size must be positive, got {self.linear_block_size}")
        if self.residual_scales is not None:
            self.residual_scales = tuple(float(v) for v in self.residual_scales)
            if self.norm_placement != "normed_residual":
                raise ValueError(f"{name}.residual_scales needs norm_placement='normed_residual'")
            if len(self.residual_scales) != 6:
                raise ValueError(
                    f"{name}.residual_scales needs 6 numbers (a, b for attention, linear, mlp), "
                    f"got {len(self.residual_scales)}"
                )
        if any(t == "linear" for t in self.layer_types or ()) and self.attention_type != "mha":
            raise ValueError(f"{name}: 'linear' layers need attention_type='mha' for the other layers")

    def sublayer_scales(self, kind: str) -> tuple[float, float]:
        """``(a, b)`` of ``a * residual + b * branch`` for ``kind`` in attention/linear/mlp."""
        if self.residual_scales is None:
            return 1.0, 1.0
        i = ("attention", "linear", "mlp").index(kind)
        return self.residual_scales[2 * i], self.residual_scales[2 * i + 1]

    def lightning_config(self) -> LightningConfig:
        """The :class:`~moekit.blocks.LightningConfig` of every ``"linear"`` layer."""
        return LightningConfig(
            dim=self.dim,
            num_heads=self.num_heads,
            head_dim=self.attn_head_dim,
            num_layers=self.num_layers,
            block_size=self.linear_block_size,
        )
