"""Llama 4 text (``model_type: "llama4_text"``, ``Llama4ForCausalLM``).

GQA attention with Llama names; RoPE on interleaved pairs (transformers' complex rotation ->
``rope_interleave``) except on the NoPE layers (``no_rope_layers[i] == 0`` ->
``nope_layer_indices``), which instead scale their queries by the attention temperature
(``attn_temperature_tuning``, ``attn_scale``, ``floor_scale``); the RoPE layers L2-normalise q/k
without a weight (``use_qk_norm`` -> ``qk_norm="l2"``) and attend in chunks
(``layer_types`` ``"chunked_attention"``, ``attention_chunk_size``), the NoPE layers attend fully.
``attention_bias`` biases q/k/v and o. The FFN is ``feed_forward``: MoE on ``moe_layers``
(``interleave_moe_layer_step``), dense of width ``intermediate_size_mlp`` elsewhere. MoE: sigmoid
of the top-k logits (top-1 by default), not renormalised, applied to the expert *input*
(``moe.weights_on_input``), plus an ungated shared expert as wide as the experts.
``experts.gate_up_proj [E, D, 2F]`` (gate columns first) and ``experts.down_proj [E, F, D]`` are
stored transposed. The multimodal ``llama4`` wrapper is not read.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader, Piece, Target, refuse_export
from moekit.convert.families.llama import LlamaAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig

_HF_TO_MASK = {"chunked_attention": "chunked", "full_attention": "full"}
_MASK_TO_HF = {v: k for k, v in _HF_TO_MASK.items()}
_LLAMA4_MOE = {"score_func": "sigmoid", "weights_on_input": True, "norm_topk_prob": False}


class Llama4TextAdapter(LlamaAdapter):
    """Llama 4 text: chunked/NoPE layers, L2 q/k norm, temperature tuning, weights-on-input MoE."""

    model_type = "llama4_text"
    architecture = "Llama4ForCausalLM"
    model_features = frozenset(
        {
            "rope_interleave",
            "attention_out_bias",
            "attention_layer_types",
            "attention_chunk_size",
            "nope_layer_indices",
            "attention_temperature_scale",
            "attention_floor_scale",
        }
    )
    defaults = LlamaAdapter.defaults | {
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096 * 32,
        "num_local_experts": 16,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        "no_rope_layer_interval": 4,
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "router_aux_loss_coef": 0.001,
    }
    default_rope_theta = 500000.0

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """See the module docstring."""
        num_layers = r.require("num_hidden_layers")
        interval = r.get("no_rope_layer_interval")
        uses_rope = r.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
        nope = tuple(i for i in range(num_layers) if not uses_rope[i])
        chunk = r.hf.get("attention_chunk_size", 8192)
        hf_types = r.get("layer_types") or [
            "chunked_attention" if uses_rope[i] and chunk is not None else "full_attention"
            for i in range(num_layers)
        ]
        unknown = sorted(set(hf_types) - set(_HF_TO_MASK))
        if unknown:
            raise ValueError(
                f"llama4_text config.json: unsupported option layer_types={unknown} "
                "(moekit reads chunked_attention and full_attention)"
            )
        types = tuple(_HF_TO_MASK[t] for t in hf_types)
        bias = bool(r.get("attention_bias"))
        return {
            "rope_interleave": True,
            "qk_norm": "l2" if r.get("use_qk_norm") else "none",
            "nope_layer_indices": nope or None,
            "attention_layer_types": types,
            "attention_chunk_size": chunk if "chunked" in types else None,
            "attention_temperature_scale": float(r.get("attn_scale"))
            if r.get("attn_temperature_tuning")
            else None,
            "attention_floor_scale": int(r.get("floor_scale")),
            "attention_bias": bias,
            "attention_out_bias": bias,
        }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        num_layers = kwargs["num_layers"]
        step = int(r.get("interleave_moe_layer_step"))
        moe_layers = r.get("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, num_layers, step))
        ffn = r.require("intermediate_size")
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=ffn,
            num_experts=int(r.require("num_local_experts")),
            top_k=int(r.require("num_experts_per_tok")),
            shared_ffn_dim=ffn,
            **_LLAMA4_MOE,
        )
        return ModelConfig(
            **kwargs,
            ffn_dim=int(r.get("intermediate_size_mlp", ffn)),
            moe=moe,
            moe_placement="explicit",
            moe_layer_indices=tuple(moe_layers),
            aux_loss_coef=float(r.get("router_aux_loss_coef")),
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg, allowed=set(_LLAMA4_MOE) | {"shared_ffn_dim"})
        self.check_attention(cfg, qk_norm=cfg.qk_norm if cfg.qk_norm == "l2" else "none", bias=None)
        for name, value in _LLAMA4_MOE.items():
            if getattr(moe, name) != value:
                raise refuse_export(
                    self.model_type, f"moe.{name}", getattr(moe, name), f"Llama 4 uses {value!r}"
                )
        if moe.shared_ffn_dim != moe.ffn_dim:
            raise refuse_export(
                self.model_type,
                "moe.shared_ffn_dim",
                moe.shared_ffn_dim,
                "one shared expert as wide as the experts",
            )
        if not cfg.rope_interleave:
            raise refuse_export(
                self.model_type, "rope_interleave", False, "Llama 4 rotates interleaved pairs"
            )
        if cfg.attention_out_bias != cfg.attention_bias:
            raise refuse_export(
                self.model_type, "attention_out_bias", cfg.attention_out_bias, "attention_bias covers q/k/v/o"
            )
        types = [cfg.attention_mask_type(i) for i in range(cfg.num_layers)]
        if "sliding" in types:
            raise refuse_export(self.model_type, "sliding_window", cfg.sliding_window, "no sliding window")
        temperature = cfg.attention_temperature_scale
        return self.common_to_hf(cfg) | {
            "attention_bias": cfg.attention_bias,
            "intermediate_size": moe.ffn_dim,
            "intermediate_size_mlp": cfg.ffn_dim or moe.ffn_dim,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "moe_layers": list(cfg.moe_layer_ids),
            "use_qk_norm": cfg.qk_norm == "l2",
            "no_rope_layers": [int(cfg.layer_uses_rope(i)) for i in range(cfg.num_layers)],
            "layer_types": [_MASK_TO_HF[t] for t in types],
            "attention_chunk_size": cfg.attention_chunk_size,
            "attn_temperature_tuning": temperature is not None,
            "attn_scale": 0.1 if temperature is None else temperature,
            "floor_scale": cfg.attention_floor_scale,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": False,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Routing weights on the expert input."""
        return cfg.moe is not None and cfg.moe.weights_on_input

    def attention_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Llama names; the L2 q/k norm has no weights."""
        src, dst = self.layer_prefix(i) + "self_attn.", f"layers.{i}.self_attn."
        out = [Target.copy(f"{dst}{p}_proj.weight", f"{src}{p}_proj.weight") for p in "qkvo"]
        if cfg.attention_bias:
            out += [Target.copy(f"{dst}{p}_proj.bias", f"{src}{p}_proj.bias") for p in "qkv"]
        if cfg.attention_out_bias:
            out.append(Target.copy(f"{dst}o_proj.bias", f"{src}o_proj.bias"))
        return out

    def dense_ffn_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """The dense ``feed_forward.{gate,up,down}_proj`` of layer ``i``."""
        return self.dense_mlp_targets(
            i, cfg.ffn_dim, self.layer_prefix(i) + "feed_forward.", f"layers.{i}.mlp."
        )

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router, transposed stacked experts and the shared expert under ``feed_forward``."""
        src, dst = self.layer_prefix(i) + "feed_forward.", f"layers.{i}.mlp."
        moe = cfg.moe_config(i)
        return [
            Target.copy(f"{dst}router.weight", f"{src}router.weight"),
            Target(f"{dst}experts.w_in", [[Piece(f"{src}experts.gate_up_proj", transpose=True)]]),
            Target(f"{dst}experts.w_out", [[Piece(f"{src}experts.down_proj", transpose=True)]]),
            *self.dense_mlp_targets(i, moe.shared_ffn_dim, f"{src}shared_expert.", f"{dst}shared."),
        ]
