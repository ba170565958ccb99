"""Qwen3 (``model_type: "qwen3"``, ``Qwen3ForCausalLM``): dense Llama layout with per-head q/k RMSNorm.

The dense presets (``dense-small``, ``dense-base``) export here. ``attention_bias`` would add an
o_proj bias, which moekit lacks, so it is refused.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader
from moekit.convert.families.llama import LlamaAdapter
from moekit.convert.families.qwen2 import qwen_sliding_to_hf, qwen_sliding_window
from moekit.models.config import ModelConfig


class Qwen3Adapter(LlamaAdapter):
    """Llama names plus ``self_attn.{q,k}_norm.weight`` over ``head_dim``."""

    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    defaults = LlamaAdapter.defaults | {"max_position_embeddings": 32768, "head_dim": 128}

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Per-head q/k norm; no biases; one sliding window at most."""
        r.refuse("attention_bias", False, "bias on o_proj")
        return {
            "qk_norm": "per_head",
            "sliding_window": qwen_sliding_window(r, r.require("num_hidden_layers")),
        }

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """Dense with per-head q/k norm."""
        self.check_dense(cfg)
        self.check_attention(cfg, qk_norm="per_head", sliding=True)
        return (
            self.common_to_hf(cfg)
            | {"intermediate_size": cfg.ffn_dim, "attention_bias": False}
            | qwen_sliding_to_hf(cfg)
        )

    def matches(self, cfg: ModelConfig) -> bool:
        """Dense with per-head q/k norm."""
        return cfg.num_moe_layers == 0 and cfg.attention_type == "mha" and cfg.qk_norm == "per_head"
