"""DeepSeek-V2 (``model_type: "deepseek_v2"``, ``DeepseekV2ForCausalLM``).

Attention is DeepSeek-V3's multi-head latent attention with the same tensor names; its RoPE
multiplies interleaved pairs as complex numbers, which is ``rope_interleave=True`` (always: the
family has no switch). Routing: softmax scores, then ``topk_method``:

* ``"greedy"``: plain top-k over the scores;
* ``"group_limited_greedy"``: groups (``n_group``) scored by their best expert (``group_score="max"``),
  the best ``topk_group`` groups kept, top-k inside them.

The chosen scores are multiplied by ``routed_scaling_factor`` and never renormalised (transformers
ignores ``norm_topk_prob`` here, so moekit does too: ``norm_topk_prob=False``). Shared experts
(``n_shared_experts * moe_intermediate_size``, ungated) and dense first layers
(``first_k_dense_replace``) as in V3. Refused: ``topk_method`` values other than the two above,
``attention_bias``, ``mlp_bias``.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Target, refuse_export
from moekit.convert.families.deepseek_v3 import DeepseekV3Adapter
from moekit.convert.families.llama import LlamaAdapter
from moekit.convert.families.qwen2_moe import qwen_expert_targets
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig

TOPK_METHODS = ("greedy", "group_limited_greedy")


class DeepseekV2Adapter(DeepseekV3Adapter):
    """DeepSeek-V2: MLA + softmax (group-limited) greedy routing with shared experts."""

    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    fp32_routers = False
    defaults = LlamaAdapter.defaults | {
        "max_position_embeddings": 2048,
        "n_shared_experts": 2,
        "n_routed_experts": 64,
        "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "greedy",
        "first_k_dense_replace": 0,
        "moe_intermediate_size": 1407,
        "intermediate_size": 11008,
    }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """MLA fields with interleaved RoPE; biases refused."""
        return super().attention_from_hf(r) | {"rope_interleave": True}

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        r.refuse("mlp_bias", False, "biases in the FFN")
        method = r.get("topk_method")
        if method not in TOPK_METHODS:
            raise ValueError(
                f"deepseek_v2 config.json: unsupported option topk_method={method!r} "
                f"(moekit models {list(TOPK_METHODS)})"
            )
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        ffn = r.require("moe_intermediate_size")
        grouped = method == "group_limited_greedy"
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=ffn,
            num_experts=r.first("n_routed_experts", "num_local_experts"),
            top_k=r.require("num_experts_per_tok"),
            score_func="softmax",
            norm_topk_prob=False,
            routed_scaling_factor=float(r.get("routed_scaling_factor")),
            num_expert_groups=int(r.require("n_group")) if grouped else 1,
            num_limited_groups=int(r.require("topk_group")) if grouped else 1,
            group_score="max" if grouped else "top2_sum",
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
        allowed = {"routed_scaling_factor", "num_expert_groups", "num_limited_groups", "shared_ffn_dim"}
        moe = self.check_moe(cfg, allowed=allowed)
        if cfg.attention_type != "mla":
            raise refuse_export(self.model_type, "attention_type", cfg.attention_type, "DeepSeek-V2 uses MLA")
        if not cfg.rope_interleave:
            raise refuse_export(
                self.model_type, "rope_interleave", False, "DeepSeek-V2 rotates interleaved pairs"
            )
        if cfg.sliding_window is not None:
            raise refuse_export(self.model_type, "sliding_window", cfg.sliding_window, "no sliding window")
        if moe.norm_topk_prob:
            raise refuse_export(self.model_type, "moe.norm_topk_prob", True, "DeepSeek-V2 never renormalises")
        grouped = moe.num_expert_groups > 1
        if grouped and moe.group_score != "max":
            raise refuse_export(
                self.model_type, "moe.group_score", moe.group_score, "DeepSeek-V2 scores a group by its max"
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
        out.pop("head_dim")
        return out | {
            "num_key_value_heads": cfg.num_heads,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "attention_bias": False,
            "mlp_bias": False,
            "intermediate_size": cfg.ffn_dim or moe.ffn_dim,
            "moe_intermediate_size": moe.ffn_dim,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.shared_ffn_dim // moe.ffn_dim,
            "num_experts_per_tok": moe.top_k,
            "topk_method": "group_limited_greedy" if grouped else "greedy",
            "n_group": moe.num_expert_groups if grouped else None,
            "topk_group": moe.num_limited_groups if grouped else None,
            "norm_topk_prob": False,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "first_k_dense_replace": cfg.num_dense_first_layers,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """MLA attention with softmax routing."""
        return cfg.attention_type == "mla" and cfg.moe is not None and cfg.moe.score_func == "softmax"

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router, experts and the ungated shared experts (no correction bias)."""
        src, dst = self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp."
        moe = cfg.moe_config(i)
        out = qwen_expert_targets(src, dst, moe.num_experts, moe.ffn_dim)
        if moe.shared_ffn_dim:
            out += self.dense_mlp_targets(i, moe.shared_ffn_dim, f"{src}shared_experts.", f"{dst}shared.")
        return out
