"""FlexOlmo (``model_type: "flex_olmo"``, ``FlexOlmoForCausalLM``).

OLMoE's attention (q/k RMSNorm over the whole projection width, ``qk_norm="full"``) and routing
(softmax top-k, optional ``norm_topk_prob``, Qwen-style expert names) in OLMo-2's post-norm
blocks: ``x + norm(attn(x))`` then ``h + norm(mlp(h))`` (``norm_placement="post"``; the layers
hold ``post_attention_layernorm`` and ``post_feedforward_layernorm``, no input norm).
``attention_bias`` biases q/k/v and o_proj. Every layer is MoE.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Target, refuse_export
from moekit.convert.families.llama import LlamaAdapter
from moekit.convert.families.olmoe import OlmoeAdapter
from moekit.models.config import ModelConfig


class FlexOlmoAdapter(OlmoeAdapter):
    """FlexOlmo: OLMoE attention and routing with post-norm blocks."""

    model_type = "flex_olmo"
    architecture = "FlexOlmoForCausalLM"
    model_features = frozenset({"norm_placement", "attention_out_bias"})
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "num_experts": 7,
        "num_experts_per_tok": 5,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.01,
    }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Full-width q/k norm; one bias switch for q/k/v/o; post-norm blocks."""
        bias = bool(r.get("attention_bias"))
        return {
            "qk_norm": "full",
            "attention_bias": bias,
            "attention_out_bias": bias,
            "norm_placement": "post",
        }

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg)
        self.check_attention(cfg, qk_norm="full", bias=None)
        if cfg.norm_placement != "post":
            raise refuse_export(
                self.model_type, "norm_placement", cfg.norm_placement, "FlexOlmo is post-norm"
            )
        if cfg.attention_out_bias != cfg.attention_bias:
            raise refuse_export(
                self.model_type, "attention_out_bias", cfg.attention_out_bias, "attention_bias covers q/k/v/o"
            )
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(self.model_type, "moe_placement", cfg.dense_layer_indices, "no dense layers")
        return self.common_to_hf(cfg) | {
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "intermediate_size": moe.ffn_dim,
            "norm_topk_prob": moe.norm_topk_prob,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "attention_bias": cfg.attention_bias,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Post-norm MoE."""
        return cfg.moe is not None and cfg.norm_placement == "post"

    def targets(self, cfg: ModelConfig) -> list[Target]:
        """OLMoE's map with the post-feedforward norm instead of the input norm."""
        out = [t for t in super().targets(cfg) if not t.name.endswith("input_layernorm.weight")]
        for i in range(cfg.num_layers):
            name = "post_feedforward_layernorm.weight"
            out.append(Target.copy(f"layers.{i}.{name}", f"{self.layer_prefix(i)}{name}"))
        return out
