"""Mixtral (``model_type: "mixtral"``, ``MixtralForCausalLM``).

Llama attention names; every layer is MoE with softmax top-k, always renormalised
(``norm_topk_prob=True``; a moekit model without renormalisation cannot export here). Checkpoints
store experts per expert as ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down)
with the router at ``block_sparse_moe.gate`` (what transformers 5.24's ``save_pretrained`` still
writes); transformers 5's in-memory/fused layout is ``mlp.experts.gate_up_proj [E, 2F, D]``,
``mlp.experts.down_proj [E, D, F]``, ``mlp.gate``. Both import. ``router_jitter_noise`` maps to
``moe.noise="jitter"`` (training only). ``sliding_window`` applies to all layers.
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


class MixtralAdapter(LlamaAdapter):
    """Mixtral: renormalised softmax top-k in every layer."""

    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096 * 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
    }
    default_rope_theta = 1e6

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """No biases; one sliding window (or None)."""
        if "layer_types" in r.hf:
            raise ValueError(
                "mixtral config.json: unsupported option layer_types (per-layer attention types)"
            )
        return {"sliding_window": r.hf.get("sliding_window")}

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """Every layer MoE; ``intermediate_size`` is the expert width."""
        r = self.reader(hf)
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        jitter = float(r.get("router_jitter_noise") or 0.0)
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=r.require("intermediate_size"),
            num_experts=r.first("num_local_experts", "num_experts"),
            top_k=r.require("num_experts_per_tok"),
            norm_topk_prob=True,
            noise="jitter" if jitter > 0 else "none",
            noise_eps=jitter if jitter > 0 else 1e-2,
        )
        return ModelConfig(
            **kwargs, moe=moe, moe_placement="all", aux_loss_coef=float(r.get("router_aux_loss_coef"))
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg)
        self.check_attention(cfg, sliding=True)
        if not moe.norm_topk_prob:
            raise refuse_export(self.model_type, "moe.norm_topk_prob", False, "Mixtral always renormalises")
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(
                self.model_type, "moe_placement", cfg.dense_layer_indices, "Mixtral has no dense layers"
            )
        return self.common_to_hf(cfg) | {
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "intermediate_size": moe.ffn_dim,
            "sliding_window": cfg.sliding_window,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "router_jitter_noise": moe.noise_eps if moe.noise == "jitter" else 0.0,
            "output_router_logits": False,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """MoE in every layer, plain attention, renormalised softmax top-k."""
        return (
            cfg.moe is not None
            and cfg.num_moe_layers == cfg.num_layers
            and cfg.qk_norm == "none"
            and cfg.attention_type == "mha"
            and not cfg.attention_bias
            and cfg.moe.norm_topk_prob
            and not cfg.moe.shared_ffn_dim
        )

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Per-expert ``block_sparse_moe.experts.{e}.w1/w3/w2`` (exported) or fused ``mlp.experts.*``."""
        moe = cfg.moe_config(i)
        old, new, dst = (
            self.layer_prefix(i) + "block_sparse_moe.",
            self.layer_prefix(i) + "mlp.",
            f"layers.{i}.mlp.",
        )
        n = moe.num_experts
        gate_up = [(f"{old}experts.{e}.w1.weight", f"{old}experts.{e}.w3.weight") for e in range(n)]
        w_in = expert_in_layouts(gate_up, f"{new}experts.gate_up_proj", n, moe.ffn_dim)
        w_out = expert_out_layouts(
            [f"{old}experts.{e}.w2.weight" for e in range(n)], f"{new}experts.down_proj"
        )
        return [
            Target.copy(f"{dst}router.weight", f"{old}gate.weight", f"{new}gate.weight"),
            Target(f"{dst}experts.w_in", w_in),
            Target(f"{dst}experts.w_out", w_out),
        ]
