"""Qwen2-MoE (``model_type: "qwen2_moe"``, ``Qwen2MoeForCausalLM``).

Maps: ``num_experts``/``num_experts_per_tok``/``moe_intermediate_size`` -> ``moe``;
``shared_expert_intermediate_size`` -> ``moe.shared_ffn_dim`` with ``moe.shared_expert_gate``
(``sigmoid(shared_expert_gate(x))`` scales the shared expert); ``norm_topk_prob``;
``decoder_sparse_step`` -> ``moe_layer_freq``; ``mlp_only_layers`` -> explicit MoE layer indices;
``qkv_bias`` -> ``attention_bias`` (q/k/v only).

The expert key layout defined here (``mlp.gate``, ``mlp.experts.{e}.{gate,up,down}_proj`` or the
fused ``mlp.experts.gate_up_proj``/``down_proj``) is the one transformers calls "qwen2_moe"; the
Qwen3-MoE, OLMoE and DeepSeek-V3 adapters reuse :func:`qwen_expert_targets`.
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
from moekit.convert.families.qwen2 import qwen_sliding_to_hf, qwen_sliding_window
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


def qwen_expert_targets(src: str, dst: str, num_experts: int, ffn_dim: int) -> list[Target]:
    """Router ``{src}gate.weight`` and experts ``{src}experts.*`` -> moekit ``{dst}router``/``{dst}experts``."""
    gate_up = [
        (f"{src}experts.{e}.gate_proj.weight", f"{src}experts.{e}.up_proj.weight") for e in range(num_experts)
    ]
    down = [f"{src}experts.{e}.down_proj.weight" for e in range(num_experts)]
    return [
        Target.copy(f"{dst}router.weight", f"{src}gate.weight"),
        Target(
            f"{dst}experts.w_in",
            expert_in_layouts(gate_up, f"{src}experts.gate_up_proj", num_experts, ffn_dim),
        ),
        Target(f"{dst}experts.w_out", expert_out_layouts(down, f"{src}experts.down_proj")),
    ]


def qwen_placement_from_hf(r: HFConfigReader, num_layers: int) -> dict[str, Any]:
    """``decoder_sparse_step`` + ``mlp_only_layers`` -> moekit placement fields."""
    step = int(r.get("decoder_sparse_step", 1) or 1)
    mlp_only = sorted(r.get("mlp_only_layers", []) or [])
    if not mlp_only:
        return {"moe_placement": "all", "moe_layer_freq": step}
    ids = [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
    return {"moe_placement": "explicit", "moe_layer_indices": tuple(ids)}


def qwen_placement_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse: a step when the placement is a plain frequency, else ``mlp_only_layers``."""
    if cfg.moe_placement == "all" and cfg.num_dense_first_layers == 0:
        return {"decoder_sparse_step": cfg.moe_layer_freq, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1, "mlp_only_layers": cfg.dense_layer_indices}


class Qwen2MoeAdapter(LlamaAdapter):
    """Qwen2-MoE: q/k/v biases, gated shared expert, sparse step and MLP-only layers."""

    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    defaults = LlamaAdapter.defaults | {
        "max_position_embeddings": 32768,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "qkv_bias": True,
        "router_aux_loss_coef": 0.001,
    }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """``qkv_bias`` (q/k/v only) and at most one sliding window."""
        return {
            "attention_bias": bool(r.get("qkv_bias")),
            "sliding_window": qwen_sliding_window(r, r.require("num_hidden_layers")),
        }

    def moe_from_hf(self, r: HFConfigReader) -> MoEConfig:
        """The MoE template (softmax top-k, optional renormalisation, gated shared expert)."""
        shared = int(r.get("shared_expert_intermediate_size") or 0)
        return MoEConfig(
            dim=r.require("hidden_size"),
            ffn_dim=r.require("moe_intermediate_size"),
            num_experts=r.first("num_experts", "num_local_experts"),
            top_k=r.require("num_experts_per_tok"),
            norm_topk_prob=bool(r.get("norm_topk_prob")),
            shared_ffn_dim=shared,
            shared_expert_gate=shared > 0,
        )

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        num_experts = r.first("num_experts", "num_local_experts")
        if not num_experts:
            return ModelConfig(
                **kwargs, ffn_dim=r.require("intermediate_size"), moe=None, moe_placement="none"
            )
        return ModelConfig(
            **kwargs,
            ffn_dim=r.get("intermediate_size", 0) or 0,
            moe=self.moe_from_hf(r),
            aux_loss_coef=float(r.get("router_aux_loss_coef", 0.0)),
            **qwen_placement_from_hf(r, kwargs["num_layers"]),
        )

    def check_export(self, cfg: ModelConfig) -> MoEConfig:
        """Refuses what Qwen2-MoE lacks; its shared expert is mandatory and gated."""
        moe = self.check_moe(cfg, allowed={"shared_ffn_dim", "shared_expert_gate"})
        if not (moe.shared_ffn_dim and moe.shared_expert_gate):
            raise refuse_export(
                self.model_type,
                "moe.shared_expert_gate",
                moe.shared_expert_gate,
                "Qwen2-MoE needs a gated shared expert",
            )
        self.check_attention(cfg, bias=None, sliding=True)
        return moe

    def moe_to_hf(self, cfg: ModelConfig, moe: MoEConfig) -> dict[str, Any]:
        """Expert fields shared by the Qwen MoE families."""
        return {
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.ffn_dim,
            "norm_topk_prob": moe.norm_topk_prob,
            "intermediate_size": cfg.ffn_dim or moe.ffn_dim * moe.top_k,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": False,
        } | qwen_placement_to_hf(cfg)

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_export(cfg)
        return (
            self.common_to_hf(cfg)
            | self.moe_to_hf(cfg, moe)
            | {"shared_expert_intermediate_size": moe.shared_ffn_dim, "qkv_bias": cfg.attention_bias}
            | qwen_sliding_to_hf(cfg, disabled=0)
        )

    def matches(self, cfg: ModelConfig) -> bool:
        """MoE with a gated shared expert."""
        return cfg.moe is not None and cfg.num_moe_layers > 0 and cfg.moe.shared_expert_gate

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router, experts, shared expert and its gate."""
        src, dst = self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp."
        moe = cfg.moe_config(i)
        out = qwen_expert_targets(src, dst, moe.num_experts, moe.ffn_dim)
        out += self.dense_mlp_targets(i, moe.shared_ffn_dim, f"{src}shared_expert.", f"{dst}shared.")
        out.append(Target.copy(f"{dst}shared_gate.weight", f"{src}shared_expert_gate.weight"))
        return out
