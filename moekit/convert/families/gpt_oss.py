"""GPT-OSS (``model_type: "gpt_oss"``, ``GptOssForCausalLM``).

GQA attention with Llama names, biases on q/k/v/o (``attention_bias``, default on) and one
learned sink logit per head (``self_attn.sinks`` -> ``ModelConfig.attention_sinks``);
``layer_types`` alternates ``"sliding_attention"`` (``sliding_window``) and ``"full_attention"``
(-> ``attention_layer_types``). Every layer is MoE: the router ``mlp.router`` has a bias and
takes the softmax over the top-k logits (``softmax_order="after_topk"``); the experts have
biases (``moe.ffn_bias``) and the clamped SwiGLU (``swiglu_clamped``, ``swiglu_alpha``,
``swiglu_limit``).

Expert tensors are stacked and transposed: ``mlp.experts.gate_up_proj [E, D, 2F]`` with gate and
up columns *interleaved* (gate j at 2j) and its bias ``[E, 2F]`` likewise, ``down_proj [E, F, D]``
and ``down_proj_bias [E, D]``. Released checkpoints store the two weights as MXFP4
(``*_blocks``/``*_scales``, ``quantization_config.quant_method="mxfp4"``): import dequantizes them
(:mod:`moekit.convert.mxfp4`); export writes the dense layout above.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Piece, Target, refuse_export
from moekit.convert.families.llama import LlamaAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig

_HF_TO_MASK = {"sliding_attention": "sliding", "full_attention": "full"}
_MASK_TO_HF = {v: k for k, v in _HF_TO_MASK.items()}
# MoE options GPT-OSS sets away from their neutral values, and the values it needs.
_GPT_OSS_MOE = {
    "activation": "swiglu_clamped",
    "softmax_order": "after_topk",
    "router_bias": True,
    "ffn_bias": True,
}


class GptOssAdapter(LlamaAdapter):
    """GPT-OSS: attention sinks, sliding/full alternation, biased router and experts, clamped SwiGLU."""

    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    model_features = frozenset({"attention_out_bias", "attention_sinks", "attention_layer_types"})
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "attention_bias": True,
        "sliding_window": 128,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
        "router_aux_loss_coef": 0.001,
        "head_dim": 64,
    }
    default_rope_theta = 150000.0

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Biases on q/k/v/o together, sinks, and the per-layer sliding/full list."""
        bias = bool(r.get("attention_bias"))
        num_layers = r.require("num_hidden_layers")
        hf_types = r.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        ]
        unknown = sorted(set(hf_types) - set(_HF_TO_MASK))
        if unknown:
            raise ValueError(
                f"gpt_oss config.json: unsupported option layer_types={unknown} "
                "(moekit reads sliding_attention and full_attention)"
            )
        types = tuple(_HF_TO_MASK[t] for t in hf_types)
        window = r.get("sliding_window") if "sliding" in types else None
        if "sliding" in types and window is None:
            raise ValueError("gpt_oss config.json: layer_types has sliding layers but sliding_window is None")
        return {
            "attention_bias": bias,
            "attention_out_bias": bias,
            "attention_sinks": True,
            "attention_layer_types": types,
            "sliding_window": window,
        }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        quant = hf.get("quantization_config") or {}
        if quant and quant.get("quant_method") != "mxfp4":
            raise ValueError(
                f"gpt_oss config.json: unsupported option quantization_config.quant_method="
                f"{quant.get('quant_method')!r} (moekit dequantizes mxfp4 checkpoints only)"
            )
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=r.require("intermediate_size"),
            num_experts=int(r.first("num_local_experts", "num_experts")),
            top_k=int(r.require("num_experts_per_tok")),
            swiglu_alpha=float(r.get("swiglu_alpha")),
            swiglu_limit=float(r.get("swiglu_limit")),
            **_GPT_OSS_MOE,
        )
        return ModelConfig(
            **kwargs, moe=moe, moe_placement="all", aux_loss_coef=float(r.get("router_aux_loss_coef"))
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg, allowed=set(_GPT_OSS_MOE) | {"swiglu_alpha", "swiglu_limit"})
        self.check_attention(cfg, bias=None, sliding=True)
        for name, value in _GPT_OSS_MOE.items():
            if getattr(moe, name) != value:
                raise refuse_export(
                    self.model_type, f"moe.{name}", getattr(moe, name), f"GPT-OSS uses {value!r}"
                )
        if not cfg.attention_sinks:
            raise refuse_export(self.model_type, "attention_sinks", False, "GPT-OSS attention has sinks")
        if cfg.attention_out_bias != cfg.attention_bias:
            raise refuse_export(
                self.model_type, "attention_out_bias", cfg.attention_out_bias, "attention_bias covers q/k/v/o"
            )
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(self.model_type, "moe_placement", cfg.dense_layer_indices, "no dense layers")
        types = [cfg.attention_mask_type(i) for i in range(cfg.num_layers)]
        if "chunked" in types:
            raise refuse_export(self.model_type, "attention_layer_types", "chunked", "no chunked attention")
        return self.common_to_hf(cfg) | {
            "attention_bias": cfg.attention_bias,
            "layer_types": [_MASK_TO_HF[t] for t in types],
            "sliding_window": cfg.sliding_window,
            "intermediate_size": moe.ffn_dim,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "swiglu_alpha": moe.swiglu_alpha,
            "swiglu_limit": moe.swiglu_limit,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": False,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Attention sinks on an MoE model."""
        return cfg.attention_sinks and cfg.moe is not None

    def attention_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Llama names plus the per-head ``sinks``."""
        src, dst = self.layer_prefix(i) + "self_attn.", f"layers.{i}.self_attn."
        return super().attention_targets(cfg, i) + [Target.copy(f"{dst}sinks", f"{src}sinks")]

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router weight and bias; dense (exported) or MXFP4 expert weights, and their biases."""
        src, dst = self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp."
        gate_up, down = f"{src}experts.gate_up_proj", f"{src}experts.down_proj"
        return [
            Target.copy(f"{dst}router.weight", f"{src}router.weight"),
            Target.copy(f"{dst}router.bias", f"{src}router.bias"),
            Target(
                f"{dst}experts.w_in",
                [
                    [Piece(gate_up, transpose=True, interleave_dim=-2)],
                    [Piece(f"{gate_up}_blocks", mxfp4_scales=f"{gate_up}_scales", interleave_dim=-2)],
                ],
            ),
            Target(f"{dst}experts.b_in", [[Piece(f"{gate_up}_bias", interleave_dim=-1)]]),
            Target(
                f"{dst}experts.w_out",
                [[Piece(down, transpose=True)], [Piece(f"{down}_blocks", mxfp4_scales=f"{down}_scales")]],
            ),
            Target.copy(f"{dst}experts.b_out", f"{down}_bias"),
        ]
