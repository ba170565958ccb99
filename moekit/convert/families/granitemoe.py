"""Granite-MoE (``model_type: "granitemoe"``) and Granite-MoE-Shared (``"granitemoeshared"``).

Llama attention names and RMSNorms; every layer is MoE. Granite's four scalars map to
:class:`~moekit.models.ModelConfig` family fields: ``embedding_multiplier`` (embeddings times it),
``attention_multiplier`` (the softmax scale itself, default 1.0, not ``head_dim ** -0.5``),
``residual_multiplier`` (each attention and FFN output times it before the residual add) and
``logits_scaling`` (logits divided by it). Routing is top-k on the raw logits with a softmax over
the chosen k (``softmax_order="after_topk"``). Experts are stored fused as
``block_sparse_moe.input_linear [E, 2F, D]`` (gate rows, then up rows) and ``output_linear
[E, D, F]`` with the router at ``block_sparse_moe.router.layer`` (what ``save_pretrained`` writes;
transformers 5's in-memory ``experts.gate_up_proj``/``router.weight`` import too). The shared
variant adds an ungated shared expert ``shared_mlp.input_linear [2S, D]``/``output_linear``
(``shared_intermediate_size``; 0 for none). Refused: ``attention_bias`` (it biases o_proj too).
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Piece, Target, refuse_export
from moekit.convert.families.llama import LlamaAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig

GRANITE_FEATURES = frozenset(
    {"embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"}
)


class GraniteMoeAdapter(LlamaAdapter):
    """Granite-MoE: Llama attention with Granite's multipliers, softmax-after-top-k routing."""

    model_type = "granitemoe"
    architecture = "GraniteMoeForCausalLM"
    model_features = GRANITE_FEATURES
    has_shared = False
    defaults = LlamaAdapter.defaults | {
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001,
        "embedding_multiplier": 1.0,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "attention_multiplier": 1.0,
        "shared_intermediate_size": 0,
    }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """No biases (Granite's would include o_proj); the four multipliers."""
        r.refuse("attention_bias", False, "bias on o_proj")
        return {
            "embedding_multiplier": float(r.get("embedding_multiplier")),
            "residual_multiplier": float(r.get("residual_multiplier")),
            "attention_multiplier": float(r.get("attention_multiplier")),
            "logits_scaling": float(r.get("logits_scaling")),
        }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """Every layer MoE; ``intermediate_size`` is the expert width."""
        r = self.reader(hf)
        if not self.has_shared:
            r.refuse("shared_intermediate_size", 0, "use model_type granitemoeshared for a shared expert")
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=r.require("intermediate_size"),
            num_experts=r.first("num_local_experts", "num_experts"),
            top_k=r.require("num_experts_per_tok"),
            softmax_order="after_topk",
            shared_ffn_dim=int(r.get("shared_intermediate_size") or 0),
        )
        return ModelConfig(
            **kwargs, moe=moe, moe_placement="all", aux_loss_coef=float(r.get("router_aux_loss_coef"))
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        allowed = {"softmax_order"} | ({"shared_ffn_dim"} if self.has_shared else set())
        moe = self.check_moe(cfg, allowed=allowed)
        self.check_attention(cfg)
        if moe.softmax_order != "after_topk":
            raise refuse_export(
                self.model_type,
                "moe.softmax_order",
                moe.softmax_order,
                "Granite takes the softmax after top-k",
            )
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(
                self.model_type, "moe_placement", cfg.dense_layer_indices, "Granite-MoE has no dense layers"
            )
        scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else cfg.attn_head_dim**-0.5
        out = self.common_to_hf(cfg) | {
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "intermediate_size": moe.ffn_dim,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": False,
            "attention_bias": False,
            "embedding_multiplier": cfg.embedding_multiplier,
            "residual_multiplier": cfg.residual_multiplier,
            "attention_multiplier": scale,
            "logits_scaling": cfg.logits_scaling,
        }
        if self.has_shared:
            out["shared_intermediate_size"] = moe.shared_ffn_dim
        return out

    def matches(self, cfg: ModelConfig) -> bool:
        """Softmax-after-top-k MoE (granitemoeshared when it has a shared expert)."""
        moe = cfg.moe
        return (
            moe is not None
            and moe.softmax_order == "after_topk"
            and bool(moe.shared_ffn_dim) == self.has_shared
        )

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Fused experts (``input_linear``/``output_linear``), the router and the shared expert."""
        src, dst = self.layer_prefix(i) + "block_sparse_moe.", f"layers.{i}.mlp."
        moe = cfg.moe_config(i)
        out = [
            Target.copy(f"{dst}router.weight", f"{src}router.layer.weight", f"{src}router.weight"),
            Target.copy(f"{dst}experts.w_in", f"{src}input_linear.weight", f"{src}experts.gate_up_proj"),
            Target.copy(f"{dst}experts.w_out", f"{src}output_linear.weight", f"{src}experts.down_proj"),
        ]
        if moe.shared_ffn_dim:
            shared = self.layer_prefix(i) + "shared_mlp."
            out += [
                Target(f"{dst}shared.w_in.weight", [[Piece(f"{shared}input_linear.weight")]]),
                Target.copy(f"{dst}shared.w_out.weight", f"{shared}output_linear.weight"),
            ]
        return out


class GraniteMoeSharedAdapter(GraniteMoeAdapter):
    """Granite-MoE-Shared: Granite-MoE plus an ungated shared expert."""

    model_type = "granitemoeshared"
    architecture = "GraniteMoeSharedForCausalLM"
    has_shared = True
