"""OLMoE (``model_type: "olmoe"``, ``OlmoeForCausalLM``).

Llama names with q/k RMSNorm over the whole projection width (``qk_norm="full"``), every layer
MoE, softmax top-k without renormalisation by default (``norm_topk_prob``). ``clip_qkv`` (clamping
q/k/v) is not modelled and is refused; ``attention_bias`` (which also biases o_proj) is refused.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Target, refuse_export
from moekit.convert.families.llama import LlamaAdapter
from moekit.convert.families.qwen2_moe import qwen_expert_targets
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


class OlmoeAdapter(LlamaAdapter):
    """OLMoE: full-width q/k norm, all layers MoE."""

    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.01,
    }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Full-width q/k norm; ``clip_qkv`` and biases refused."""
        r.refuse("clip_qkv", None, "clamping q/k/v is not modelled")
        r.refuse("attention_bias", False, "bias on o_proj")
        return {"qk_norm": "full"}

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """Every layer MoE; ``intermediate_size`` is the expert width."""
        r = self.reader(hf)
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=r.require("intermediate_size"),
            num_experts=r.first("num_experts", "num_local_experts"),
            top_k=r.require("num_experts_per_tok"),
            norm_topk_prob=bool(r.get("norm_topk_prob")),
        )
        return ModelConfig(
            **kwargs, moe=moe, moe_placement="all", aux_loss_coef=float(r.get("router_aux_loss_coef"))
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg)
        self.check_attention(cfg, qk_norm="full")
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(
                self.model_type, "moe_placement", cfg.dense_layer_indices, "OLMoE has no dense layers"
            )
        return self.common_to_hf(cfg) | {
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "intermediate_size": moe.ffn_dim,
            "norm_topk_prob": moe.norm_topk_prob,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "clip_qkv": None,
            "attention_bias": False,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """MoE with full-width q/k norm."""
        return cfg.moe is not None and cfg.num_moe_layers > 0 and cfg.qk_norm == "full"

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router and experts (the Qwen-style expert names)."""
        moe = cfg.moe_config(i)
        return qwen_expert_targets(
            self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp.", moe.num_experts, moe.ffn_dim
        )
