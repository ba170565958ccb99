"""Qwen3-MoE (``model_type: "qwen3_moe"``, ``Qwen3MoeForCausalLM``): moekit's default preset family.

Like Qwen2-MoE without the shared expert and without q/k/v biases, plus per-head q/k RMSNorm
(``self_attn.{q,k}_norm`` over ``head_dim``). ``attention_bias`` would also bias o_proj and is
refused. The presets ``moe-tiny``/``moe-small``/``moe-base`` export here.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Target
from moekit.convert.families.qwen2 import qwen_sliding_to_hf, qwen_sliding_window
from moekit.convert.families.qwen2_moe import Qwen2MoeAdapter, qwen_expert_targets
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


class Qwen3MoeAdapter(Qwen2MoeAdapter):
    """Qwen3-MoE: per-head q/k norm, no shared expert, no biases."""

    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    defaults = Qwen2MoeAdapter.defaults | {
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "shared_expert_intermediate_size": 0,
    }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Per-head q/k norm, no biases, at most one sliding window."""
        r.refuse("attention_bias", False, "bias on o_proj")
        return {
            "qk_norm": "per_head",
            "sliding_window": qwen_sliding_window(r, r.require("num_hidden_layers")),
        }

    def moe_from_hf(self, r: HFConfigReader) -> MoEConfig:
        """Softmax top-k without a shared expert."""
        return super().moe_from_hf(r).replace(shared_ffn_dim=0, shared_expert_gate=False)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg)
        self.check_attention(cfg, qk_norm="per_head", sliding=True)
        sliding = qwen_sliding_to_hf(cfg)
        sliding.pop("layer_types")
        sliding.pop("max_window_layers")
        return self.common_to_hf(cfg) | self.moe_to_hf(cfg, moe) | {"attention_bias": False} | sliding

    def matches(self, cfg: ModelConfig) -> bool:
        """MoE with per-head q/k norm."""
        return cfg.moe is not None and cfg.num_moe_layers > 0 and cfg.qk_norm == "per_head"

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router and experts."""
        moe = cfg.moe_config(i)
        return qwen_expert_targets(
            self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp.", moe.num_experts, moe.ffn_dim
        )
