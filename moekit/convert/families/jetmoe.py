"""JetMoE (``model_type: "jetmoe"``, ``JetMoeForCausalLM``).

Attention is a mixture of attention heads (``attention_type="moa"``,
:class:`~moekit.blocks.MixtureOfAttentionHeads`): ``self_attention.experts.router.layer`` picks
``num_experts_per_tok`` of ``num_local_experts`` attention experts (softmax over the chosen
logits); ``experts.input_linear [E, G*Dh, D]`` / ``experts.output_linear [E, D, G*Dh]`` are the
per-expert query/output projections (``Dh = kv_channels``, ``G = num_key_value_heads``),
``kv_proj`` the shared keys and values, ``experts.bias`` the output bias. The FFN is an MoE in
every layer with the same routing, ``mlp.input_linear [E, 2F, D]`` (gate rows first) and
``mlp.output_linear [E, D, F]``, and one output bias ``mlp.bias`` (``moe.output_bias``).
Embeddings are tied by default. transformers' layer norms use eps 1e-6 whatever
``rms_norm_eps`` says (only the final norm reads it), so other values are refused.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import Target, refuse_export
from moekit.convert.families.llama import LlamaAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig

_LAYER_NORM_EPS = 1e-6


class JetMoeAdapter(LlamaAdapter):
    """JetMoE: mixture of attention heads and an MoE FFN with a shared output bias."""

    model_type = "jetmoe"
    architecture = "JetMoeForCausalLM"
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "initializer_range": 0.01,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "kv_channels": 128,
        "aux_loss_coef": 0.01,
    }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        hf = dict(hf)
        hf.setdefault("hidden_act", hf.get("activation_function", "silu"))
        r = self.reader(hf)
        if float(r.get("rms_norm_eps")) != _LAYER_NORM_EPS:
            raise ValueError(
                f"jetmoe config.json: unsupported option rms_norm_eps={r.get('rms_norm_eps')!r} "
                "(transformers' JetMoE layer norms use 1e-6 and only its final norm reads it); "
                "moekit can only import rms_norm_eps=1e-06"
            )
        num_kv = int(r.require("num_key_value_heads"))
        top_k = int(r.require("num_experts_per_tok"))
        num_experts = int(r.require("num_local_experts"))
        hf["num_attention_heads"] = num_kv * top_k  # transformers derives it the same way
        hf["head_dim"] = int(r.require("kv_channels"))
        kwargs = self.common_from_hf(self.reader(hf))
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=int(r.require("intermediate_size")),
            num_experts=num_experts,
            top_k=top_k,
            softmax_order="after_topk",
            output_bias=True,
        )
        return ModelConfig(
            **kwargs,
            attention_type="moa",
            moa_num_experts=num_experts,
            moa_top_k=top_k,
            moe=moe,
            moe_placement="all",
            aux_loss_coef=float(r.get("aux_loss_coef")),
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg, allowed={"softmax_order", "output_bias"})
        if cfg.attention_type != "moa":
            raise refuse_export(
                self.model_type, "attention_type", cfg.attention_type, "JetMoE attention is MoA"
            )
        if moe.softmax_order != "after_topk" or not moe.output_bias:
            raise refuse_export(
                self.model_type,
                "moe.softmax_order",
                moe.softmax_order,
                "JetMoE: softmax after top-k, output bias",
            )
        if (cfg.moa_num_experts, cfg.moa_top_k) != (moe.num_experts, moe.top_k):
            raise refuse_export(
                self.model_type,
                "moa_num_experts/moa_top_k",
                (cfg.moa_num_experts, cfg.moa_top_k),
                "JetMoE shares num_local_experts and num_experts_per_tok between attention and FFN",
            )
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(self.model_type, "moe_placement", cfg.dense_layer_indices, "no dense layers")
        if cfg.rms_norm_eps != _LAYER_NORM_EPS or cfg.sliding_window is not None:
            raise refuse_export(
                self.model_type, "rms_norm_eps", cfg.rms_norm_eps, "transformers' JetMoE norms use 1e-6"
            )
        out = self.common_to_hf(cfg)
        for key in ("num_attention_heads", "head_dim", "hidden_act"):
            out.pop(key)
        return out | {
            "kv_channels": cfg.attn_head_dim,
            "activation_function": "silu",
            "intermediate_size": moe.ffn_dim,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": False,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Mixture-of-attention-heads attention."""
        return cfg.attention_type == "moa"

    def attention_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """The MoA router, per-expert query/output projections, shared kv_proj and output bias."""
        src, dst = self.layer_prefix(i) + "self_attention.", f"layers.{i}.self_attn."
        return [
            Target.copy(f"{dst}router.weight", f"{src}experts.router.layer.weight"),
            Target.copy(f"{dst}w_q", f"{src}experts.input_linear.weight"),
            Target.copy(f"{dst}w_o", f"{src}experts.output_linear.weight"),
            Target.copy(f"{dst}kv_proj.weight", f"{src}kv_proj.weight"),
            Target.copy(f"{dst}out_bias", f"{src}experts.bias"),
        ]

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router ``mlp.router.layer``, stacked experts ``input_linear``/``output_linear``, ``mlp.bias``."""
        src, dst = self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp."
        return [
            Target.copy(f"{dst}router.weight", f"{src}router.layer.weight"),
            Target.copy(f"{dst}experts.w_in", f"{src}input_linear.weight"),
            Target.copy(f"{dst}experts.w_out", f"{src}output_linear.weight"),
            Target.copy(f"{dst}output_bias", f"{src}bias"),
        ]
