"""Hunyuan-MoE v1 (``model_type: "hunyuan_v1_moe"``, ``HunYuanMoEV1ForCausalLM``).

GQA attention with Llama names plus per-head q/k RMSNorms ``query_layernorm``/``key_layernorm``
applied *after* the rotation (``qk_norm_after_rope``); ``attention_bias`` biases q/k/v and o_proj.
``head_dim`` must be given (transformers fails without it). Every layer is MoE: softmax top-k
(``moe_topk``), renormalised; experts and the always-on ungated shared expert ``mlp.shared_mlp``
both have width ``intermediate_size``; the router is ``mlp.gate.wg`` (float32 in transformers).
Refused: per-layer lists for ``num_experts``/``moe_topk``.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import (
    HFConfigReader,
    Target,
    expert_in_layouts,
    expert_out_layouts,
    refuse_export,
)
from moekit.convert.families.llama import LlamaAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


class HunyuanV1MoeAdapter(LlamaAdapter):
    """Hunyuan-MoE v1: post-RoPE q/k norms, biased attention, shared expert in every layer."""

    model_type = "hunyuan_v1_moe"
    architecture = "HunYuanMoEV1ForCausalLM"
    fp32_routers = True
    model_features = frozenset({"qk_norm_after_rope", "attention_out_bias"})
    defaults = LlamaAdapter.defaults | {"rms_norm_eps": 1e-5, "num_experts": 1, "moe_topk": 1}

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Per-head q/k norms after RoPE; one bias switch for q/k/v/o."""
        bias = bool(r.get("attention_bias"))
        r.require("head_dim")
        return {
            "qk_norm": "per_head",
            "qk_norm_after_rope": True,
            "attention_bias": bias,
            "attention_out_bias": bias,
        }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        for key in ("num_experts", "moe_topk"):
            if isinstance(r.get(key), list):
                raise ValueError(
                    f"hunyuan_v1_moe config.json: unsupported option {key}={r.get(key)!r} "
                    "(per-layer values; moekit uses one value for every layer)"
                )
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        ffn = r.require("intermediate_size")
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=ffn,
            num_experts=int(r.first("num_experts", "num_local_experts")),
            top_k=int(r.first("moe_topk", "num_experts_per_tok")),
            norm_topk_prob=True,
            shared_ffn_dim=ffn,
        )
        return ModelConfig(**kwargs, ffn_dim=ffn, moe=moe, moe_placement="all", aux_loss_coef=0.0)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg, allowed={"shared_ffn_dim"})
        self.check_attention(cfg, qk_norm="per_head", bias=None)
        if not cfg.qk_norm_after_rope:
            raise refuse_export(self.model_type, "qk_norm_after_rope", False, "Hunyuan norms q/k after RoPE")
        if cfg.attention_out_bias != cfg.attention_bias:
            raise refuse_export(
                self.model_type, "attention_out_bias", cfg.attention_out_bias, "attention_bias covers q/k/v/o"
            )
        if moe.shared_ffn_dim != moe.ffn_dim or not moe.norm_topk_prob:
            raise refuse_export(
                self.model_type,
                "moe.shared_ffn_dim",
                moe.shared_ffn_dim,
                "Hunyuan has one shared expert as wide as the experts and renormalises",
            )
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(self.model_type, "moe_placement", cfg.dense_layer_indices, "no dense layers")
        return self.common_to_hf(cfg) | {
            "attention_bias": cfg.attention_bias,
            "intermediate_size": moe.ffn_dim,
            "num_experts": moe.num_experts,
            "moe_topk": moe.top_k,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Per-head q/k norms after RoPE."""
        return cfg.qk_norm_after_rope and cfg.moe is not None

    def attention_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Llama names; the q/k norms are ``query_layernorm``/``key_layernorm``."""
        src, dst = self.layer_prefix(i) + "self_attn.", f"layers.{i}.self_attn."
        out = [Target.copy(f"{dst}{p}_proj.weight", f"{src}{p}_proj.weight") for p in "qkvo"]
        if cfg.attention_bias:
            out += [Target.copy(f"{dst}{p}_proj.bias", f"{src}{p}_proj.bias") for p in "qkv"]
        if cfg.attention_out_bias:
            out.append(Target.copy(f"{dst}o_proj.bias", f"{src}o_proj.bias"))
        out.append(Target.copy(f"{dst}q_norm.weight", f"{src}query_layernorm.weight"))
        out.append(Target.copy(f"{dst}k_norm.weight", f"{src}key_layernorm.weight"))
        return out

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router ``gate.wg``, per-expert or fused experts, and ``shared_mlp``."""
        src, dst = self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp."
        moe = cfg.moe_config(i)
        n = moe.num_experts
        gate_up = [
            (f"{src}experts.{e}.gate_proj.weight", f"{src}experts.{e}.up_proj.weight") for e in range(n)
        ]
        out = [
            Target.copy(f"{dst}router.weight", f"{src}gate.wg.weight"),
            Target(
                f"{dst}experts.w_in", expert_in_layouts(gate_up, f"{src}experts.gate_up_proj", n, moe.ffn_dim)
            ),
            Target(
                f"{dst}experts.w_out",
                expert_out_layouts(
                    [f"{src}experts.{e}.down_proj.weight" for e in range(n)], f"{src}experts.down_proj"
                ),
            ),
        ]
        return out + self.dense_mlp_targets(i, moe.shared_ffn_dim, f"{src}shared_mlp.", f"{dst}shared.")
