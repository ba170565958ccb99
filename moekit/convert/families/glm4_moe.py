"""GLM-4-MoE (``model_type: "glm4_moe"``, ``Glm4MoeForCausalLM``).

GQA attention with Llama names (q/k/v biases with ``attention_bias``, per-head q/k RMSNorm with
``use_qk_norm``) and partial RoPE: ``partial_rotary_factor`` (default 0.5, read from
``rope_parameters`` or the top level) -> ``ModelConfig.partial_rotary_factor``, rotating the
first ``int(head_dim * factor)`` dims of each head in halves. The MoE is DeepSeek-V3's: sigmoid
scores, group-limited top-k scored by the sum of each group's top 2 (``n_group``/``topk_group``),
``e_score_correction_bias`` -> the router's ``expert_bias`` (choice only), ``norm_topk_prob``,
``routed_scaling_factor``, ungated shared experts (``n_shared_experts * moe_intermediate_size``)
and dense first layers (``first_k_dense_replace``). Multi-token-prediction layers are skipped.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Target, refuse_export
from moekit.convert.families.deepseek_v3 import DeepseekV3Adapter
from moekit.convert.families.llama import LlamaAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


class Glm4MoeAdapter(DeepseekV3Adapter):
    """GLM-4-MoE: DeepSeek-V3 routing on GQA attention with partial RoPE."""

    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    fp32_routers = True
    model_features = frozenset({"partial_rotary_factor"})
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "n_shared_experts": 1,
        "n_routed_experts": 128,
        "num_experts_per_tok": 8,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "use_qk_norm": False,
        "attention_bias": False,
        "moe_intermediate_size": 1408,
        "intermediate_size": 10944,
    }
    default_partial_rotary_factor = 0.5
    partial_rope = True
    sliding = False  # the family has no sliding window (Dots1 has)

    def common_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Llama's shared fields plus the partial-RoPE factor."""
        out = LlamaAdapter.common_from_hf(self, r)
        return out | {"partial_rotary_factor": r.partial_rotary_factor(self.default_partial_rotary_factor)}

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """q/k/v biases and per-head q/k norms."""
        return {
            "attention_bias": bool(r.get("attention_bias")),
            "qk_norm": "per_head" if r.get("use_qk_norm") else "none",
        }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        ffn = r.require("moe_intermediate_size")
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=ffn,
            num_experts=r.first("n_routed_experts", "num_local_experts"),
            top_k=r.require("num_experts_per_tok"),
            score_func="sigmoid",
            norm_topk_prob=bool(r.get("norm_topk_prob")),
            routed_scaling_factor=float(r.get("routed_scaling_factor")),
            num_expert_groups=int(r.get("n_group") or 1),
            num_limited_groups=int(r.get("topk_group") or 1),
            group_score="top2_sum",
            use_expert_bias=True,
            shared_ffn_dim=int(r.get("n_shared_experts") or 0) * ffn,
        )
        return ModelConfig(
            **kwargs,
            ffn_dim=r.require("intermediate_size"),
            moe=moe,
            moe_placement="all",
            num_dense_first_layers=min(int(r.get("first_k_dense_replace") or 0), kwargs["num_layers"]),
            aux_loss_coef=0.0,
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        allowed = {"score_func", "routed_scaling_factor", "num_expert_groups", "num_limited_groups"}
        moe = self.check_moe(cfg, allowed=allowed | {"use_expert_bias", "shared_ffn_dim"})
        if cfg.qk_norm not in ("none", "per_head"):
            raise refuse_export(self.model_type, "qk_norm", cfg.qk_norm, "GLM-4-MoE norms q/k per head")
        self.check_attention(cfg, qk_norm=cfg.qk_norm, bias=None, sliding=self.sliding)
        for name, want in (("score_func", "sigmoid"), ("use_expert_bias", True), ("group_score", "top2_sum")):
            if getattr(moe, name) != want:
                raise refuse_export(
                    self.model_type, f"moe.{name}", getattr(moe, name), f"GLM-4-MoE needs {want!r}"
                )
        if moe.shared_ffn_dim % moe.ffn_dim:
            raise refuse_export(
                self.model_type,
                "moe.shared_ffn_dim",
                moe.shared_ffn_dim,
                "must be n_shared_experts * ffn_dim",
            )
        if cfg.moe_placement != "all" or cfg.moe_layer_freq != 1:
            raise refuse_export(
                self.model_type, "moe_placement", cfg.moe_placement, "MoE in every layer after the first k"
            )
        out = self.common_to_hf(cfg)
        # GLM defaults to 0.5 when the key is missing, so the factor is always written.
        out["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
        return out | {
            "partial_rotary_factor": cfg.partial_rotary_factor,
            "attention_bias": cfg.attention_bias,
            "use_qk_norm": cfg.qk_norm == "per_head",
            "intermediate_size": cfg.ffn_dim or moe.ffn_dim,
            "moe_intermediate_size": moe.ffn_dim,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.shared_ffn_dim // moe.ffn_dim,
            "num_experts_per_tok": moe.top_k,
            "n_group": moe.num_expert_groups,
            "topk_group": moe.num_limited_groups,
            "norm_topk_prob": moe.norm_topk_prob,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "first_k_dense_replace": cfg.num_dense_first_layers,
            "num_nextn_predict_layers": 0,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """GQA attention with partial RoPE and sigmoid routing."""
        return (
            cfg.attention_type == "mha"
            and cfg.partial_rotary_factor != 1.0
            and cfg.moe is not None
            and cfg.moe.score_func == "sigmoid"
        )

    def attention_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Llama-named q/k/v/o (+ q/k/v biases, q/k norms)."""
        return LlamaAdapter.attention_targets(self, cfg, i)
