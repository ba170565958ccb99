"""dots.llm1 (``model_type: "dots1"``, ``Dots1ForCausalLM``).

GLM-4-MoE's routing (DeepSeek-V3's: sigmoid scores, group-limited top-k by top-2 sums,
``e_score_correction_bias`` for the choice, ``norm_topk_prob``, ``routed_scaling_factor``, ungated
``n_shared_experts``, ``first_k_dense_replace``) on GQA attention with full RoPE, per-head q/k
RMSNorm (always) and q/k/v/o biases (``attention_bias``). Sliding windows are per layer
(``layer_types`` from ``sliding_window``/``max_window_layers``); moekit has one window for all
layers, so "all full" or "all sliding" import and a mix is refused naming ``layer_types``.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, refuse_export
from moekit.convert.families.glm4_moe import Glm4MoeAdapter
from moekit.convert.families.llama import LlamaAdapter
from moekit.convert.families.qwen2 import qwen_sliding_to_hf, qwen_sliding_window
from moekit.models.config import ModelConfig


class Dots1Adapter(Glm4MoeAdapter):
    """dots.llm1: GLM-4-MoE routing, per-head q/k norm, full RoPE, one sliding window at most."""

    model_type = "dots1"
    architecture = "Dots1ForCausalLM"
    model_features = frozenset({"attention_out_bias"})
    partial_rope = False
    sliding = True
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "attention_bias": False,
        "moe_intermediate_size": 1408,
        "intermediate_size": 10944,
    }

    def common_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Llama's shared fields (full RoPE)."""
        return LlamaAdapter.common_from_hf(self, r)

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Per-head q/k norms, q/k/v/o biases (one switch), one sliding window at most."""
        bias = bool(r.get("attention_bias"))
        return {
            "attention_bias": bias,
            "attention_out_bias": bias,
            "qk_norm": "per_head",
            "sliding_window": qwen_sliding_window(r, r.require("num_hidden_layers")),
        }

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        if cfg.qk_norm != "per_head":
            raise refuse_export(self.model_type, "qk_norm", cfg.qk_norm, "dots1 always norms q/k per head")
        if cfg.attention_out_bias != cfg.attention_bias:
            raise refuse_export(
                self.model_type, "attention_out_bias", cfg.attention_out_bias, "attention_bias covers q/k/v/o"
            )
        out = super().config_to_hf(cfg)
        for key in ("partial_rotary_factor", "use_qk_norm", "num_nextn_predict_layers"):
            out.pop(key, None)
        out["rope_parameters"].pop("partial_rotary_factor", None)
        return out | qwen_sliding_to_hf(cfg)

    def matches(self, cfg: ModelConfig) -> bool:
        """GQA with per-head q/k norm, full RoPE and sigmoid routing with a correction bias."""
        moe = cfg.moe
        return (
            cfg.attention_type == "mha"
            and cfg.qk_norm == "per_head"
            and cfg.partial_rotary_factor == 1.0
            and moe is not None
            and moe.score_func == "sigmoid"
            and moe.use_expert_bias
        )
