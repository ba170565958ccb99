"""DeepSeek-V3 (``model_type: "deepseek_v3"``, ``DeepseekV3ForCausalLM``).

Attention is multi-head latent attention (``attention_type="mla"``): ``q_a_proj``/``q_a_layernorm``/
``q_b_proj`` (or ``q_proj`` without ``q_lora_rank``), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
``kv_b_proj``, ``o_proj``; ``rope_interleave`` keeps the checkpoint's interleaved rotary rows.
Routing: sigmoid scores, group-limited top-k (``n_group``/``topk_group``, groups scored by the sum
of their top-2), ``e_score_correction_bias`` -> the router's ``expert_bias`` buffer (choice only),
``norm_topk_prob``, ``routed_scaling_factor``; ``n_shared_experts * moe_intermediate_size`` ->
``moe.shared_ffn_dim`` (ungated); ``first_k_dense_replace`` -> ``num_dense_first_layers``.
Multi-token-prediction layers (``num_nextn_predict_layers``) are not part of the causal LM;
their tensors are skipped on import, as transformers does.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Target, refuse_export, rope_to_hf
from moekit.convert.families.llama import LlamaAdapter
from moekit.convert.families.qwen2_moe import qwen_expert_targets
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


class DeepseekV3Adapter(LlamaAdapter):
    """DeepSeek-V3: MLA + sigmoid group-limited routing with shared experts."""

    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    fp32_routers = True  # gate.weight and e_score_correction_bias stay float32, as in transformers
    defaults = LlamaAdapter.defaults | {
        "max_position_embeddings": 4096,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "rope_interleave": True,
        "moe_intermediate_size": 2048,
        "intermediate_size": 18432,
    }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """MLA fields; biases refused."""
        r.refuse("attention_bias", False, "biases in MLA projections")
        q_rank = r.hf["q_lora_rank"] if "q_lora_rank" in r.hf else r.defaults["q_lora_rank"]
        return {
            "attention_type": "mla",
            "q_lora_rank": q_rank,
            "kv_lora_rank": r.require("kv_lora_rank"),
            "qk_nope_head_dim": r.require("qk_nope_head_dim"),
            "qk_rope_head_dim": r.require("qk_rope_head_dim"),
            "v_head_dim": r.require("v_head_dim"),
            "rope_interleave": bool(r.get("rope_interleave")),
            "num_kv_heads": None,
            "head_dim": r.require("v_head_dim"),  # unused by MLA; keeps dim % num_heads checks out of the way
        }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        r.refuse("scoring_func", "sigmoid", "DeepSeek-V3 routing uses sigmoid scores")
        r.refuse("topk_method", "noaux_tc", "only the aux-loss-free group-limited top-k is modelled")
        r.refuse("moe_layer_freq", 1, "MoE in every layer after first_k_dense_replace")
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
        if cfg.attention_type != "mla":
            raise refuse_export(self.model_type, "attention_type", cfg.attention_type, "DeepSeek-V3 uses MLA")
        if cfg.sliding_window is not None:
            raise refuse_export(self.model_type, "sliding_window", cfg.sliding_window, "no sliding window")
        for name, want in (("score_func", "sigmoid"), ("use_expert_bias", True), ("group_score", "top2_sum")):
            if getattr(moe, name) != want:
                raise refuse_export(
                    self.model_type, f"moe.{name}", getattr(moe, name), f"DeepSeek-V3 needs {want!r}"
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
                self.model_type,
                "moe_placement",
                cfg.moe_placement,
                "DeepSeek-V3 has MoE in every layer after the first k",
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
            "rope_interleave": cfg.rope_interleave,
            "rope_parameters": rope_to_hf(cfg),
            "attention_bias": False,
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
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """MLA attention."""
        return cfg.attention_type == "mla"

    def attention_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """MLA projections and norms."""
        src, dst = self.layer_prefix(i) + "self_attn.", f"layers.{i}.self_attn."
        if cfg.q_lora_rank is None:
            out = [Target.copy(f"{dst}q_proj.weight", f"{src}q_proj.weight")]
        else:
            out = [
                Target.copy(f"{dst}q_a_proj.weight", f"{src}q_a_proj.weight"),
                Target.copy(f"{dst}q_a_norm.weight", f"{src}q_a_layernorm.weight"),
                Target.copy(f"{dst}q_b_proj.weight", f"{src}q_b_proj.weight"),
            ]
        return out + [
            Target.copy(f"{dst}kv_a_proj.weight", f"{src}kv_a_proj_with_mqa.weight"),
            Target.copy(f"{dst}kv_a_norm.weight", f"{src}kv_a_layernorm.weight"),
            Target.copy(f"{dst}kv_b_proj.weight", f"{src}kv_b_proj.weight"),
            Target.copy(f"{dst}o_proj.weight", f"{src}o_proj.weight"),
        ]

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router (+ correction bias), experts and the ungated shared experts."""
        src, dst = self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp."
        moe = cfg.moe_config(i)
        out = qwen_expert_targets(src, dst, moe.num_experts, moe.ffn_dim)
        out.append(Target.copy(f"{dst}router.expert_bias", f"{src}gate.e_score_correction_bias"))
        if moe.shared_ffn_dim:
            out += self.dense_mlp_targets(i, moe.shared_ffn_dim, f"{src}shared_experts.", f"{dst}shared.")
        return out
