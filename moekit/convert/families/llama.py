"""Llama (``model_type: "llama"``, ``LlamaForCausalLM``), the dense base of the Llama-like key layout.

HF layout: ``model.embed_tokens``, ``model.layers.{i}.{input_layernorm,post_attention_layernorm}``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``,
``model.norm``, ``lm_head``. moekit's dense ``mlp.w_in`` stacks gate rows then up rows.

The other Llama-like adapters (Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3) subclass :class:`LlamaAdapter` and override the hooks where their layout differs.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import (
    FamilyAdapter,
    HFConfigReader,
    Piece,
    Target,
    refuse_export,
    rope_to_hf,
)
from moekit.models.config import ModelConfig


class LlamaAdapter(FamilyAdapter):
    """Dense Llama; the hooks below are the Llama-like layout shared by subclasses."""

    model_type = "llama"
    architecture = "LlamaForCausalLM"
    defaults: dict[str, Any] = {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }
    default_rope_theta = 10000.0
    # The family reads partial_rotary_factor itself (refused by the rope reader otherwise).
    partial_rope = False

    # ---- config: HF -> moekit ------------------------------------------------------------------
    def reader(self, hf: dict[str, Any]) -> HFConfigReader:
        """An :class:`HFConfigReader` with this family's defaults."""
        return HFConfigReader(hf, self.model_type, self.defaults)

    def common_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Shape, norm, rope and embedding fields every Llama-like family shares."""
        r.refuse("hidden_act", "silu", "moekit's FFNs are SwiGLU")
        r.refuse("pretraining_tp", 1, "tensor-parallel slicing of the reference implementation")
        theta, scaling = r.rope(self.default_rope_theta, partial=self.partial_rope)
        num_heads = r.require("num_attention_heads")
        return {
            "vocab_size": r.require("vocab_size"),
            "dim": r.require("hidden_size"),
            "num_layers": r.require("num_hidden_layers"),
            "num_heads": num_heads,
            "num_kv_heads": r.get("num_key_value_heads", num_heads),
            "head_dim": r.get("head_dim"),
            "rms_norm_eps": float(r.get("rms_norm_eps")),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "max_position_embeddings": r.get("max_position_embeddings"),
            "tie_word_embeddings": bool(r.get("tie_word_embeddings")),
            "initializer_range": float(r.get("initializer_range")),
        }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Llama: ``attention_bias`` puts biases on q/k/v *and* o_proj; moekit has none on o_proj."""
        r.refuse("attention_bias", False, "bias on o_proj")
        r.refuse("mlp_bias", False, "biases in the FFN")
        return {}

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """Dense model: ``ffn_dim = intermediate_size``, ``moe=None``."""
        r = self.reader(hf)
        kwargs = self.common_from_hf(r) | self.attention_from_hf(r)
        return ModelConfig(**kwargs, ffn_dim=r.require("intermediate_size"), moe=None, moe_placement="none")

    # ---- config: moekit -> HF ------------------------------------------------------------------
    def common_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """The shared HF fields (``model_type``, ``architectures``, shapes, rope)."""
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.attn_num_kv_heads,
            "head_dim": cfg.attn_head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_parameters": rope_to_hf(cfg),
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "initializer_range": cfg.initializer_range,
            "attention_dropout": 0.0,
            "use_cache": True,
        }

    def check_dense(self, cfg: ModelConfig) -> None:
        """Refuses MoE layers and non-SwiGLU FFNs for a dense family."""
        if cfg.num_moe_layers:
            raise refuse_export(self.model_type, "moe", "MoE layers", "a dense family")
        if cfg.dense_ffn_activation != "swiglu":
            raise refuse_export(
                self.model_type, "dense_ffn_activation", cfg.dense_ffn_activation, "HF uses SiLU"
            )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """Dense Llama: no biases, no q/k norm, no sliding window."""
        self.check_dense(cfg)
        self.check_attention(cfg)
        return self.common_to_hf(cfg) | {
            "intermediate_size": cfg.ffn_dim,
            "attention_bias": False,
            "mlp_bias": False,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Dense, plain attention."""
        return (
            cfg.num_moe_layers == 0
            and cfg.attention_type == "mha"
            and cfg.qk_norm == "none"
            and not cfg.attention_bias
            and cfg.sliding_window is None
        )

    # ---- key map -------------------------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        """HF prefix of decoder layer ``i``."""
        return f"model.layers.{i}."

    def attention_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """q/k/v/o projections, their biases and q/k norms (Llama names)."""
        src, dst = self.layer_prefix(i) + "self_attn.", f"layers.{i}.self_attn."
        out = [Target.copy(f"{dst}{p}_proj.weight", f"{src}{p}_proj.weight") for p in "qkvo"]
        if cfg.attention_bias:
            out += [Target.copy(f"{dst}{p}_proj.bias", f"{src}{p}_proj.bias") for p in "qkv"]
        if cfg.attention_out_bias:
            out.append(Target.copy(f"{dst}o_proj.bias", f"{src}o_proj.bias"))
        if cfg.qk_norm != "none":
            out += [Target.copy(f"{dst}{p}_norm.weight", f"{src}{p}_norm.weight") for p in "qk"]
        return out

    def dense_mlp_targets(self, i: int, ffn_dim: int, src: str, dst: str) -> list[Target]:
        """A SwiGLU MLP ``{src}{gate,up,down}_proj`` -> moekit ``{dst}w_in`` (gate rows first) / ``w_out``."""
        w_in = [
            Piece(f"{src}gate_proj.weight", (slice(0, ffn_dim),)),
            Piece(f"{src}up_proj.weight", (slice(ffn_dim, None),)),
        ]
        return [
            Target(f"{dst}w_in.weight", [w_in]),
            Target.copy(f"{dst}w_out.weight", f"{src}down_proj.weight"),
        ]

    def dense_ffn_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """The dense FFN of layer ``i`` (``mlp.{gate,up,down}_proj``; Llama 4 overrides the prefix)."""
        return self.dense_mlp_targets(i, cfg.ffn_dim, self.layer_prefix(i) + "mlp.", f"layers.{i}.mlp.")

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """The MoE FFN of layer ``i`` (MoE families override)."""
        raise NotImplementedError(f"{self.model_type} has no MoE layers")

    def targets(self, cfg: ModelConfig) -> list[Target]:
        """Embedding, per-layer norms/attention/FFN, final norm, lm_head (unless tied)."""
        out = [Target.copy("embed_tokens.weight", "model.embed_tokens.weight")]
        for i in range(cfg.num_layers):
            src, dst = self.layer_prefix(i), f"layers.{i}."
            out.append(Target.copy(f"{dst}input_layernorm.weight", f"{src}input_layernorm.weight"))
            out.append(
                Target.copy(f"{dst}post_attention_layernorm.weight", f"{src}post_attention_layernorm.weight")
            )
            out += self.attention_targets(cfg, i)
            if cfg.is_moe_layer(i):
                out += self.moe_targets(cfg, i)
            else:
                out += self.dense_ffn_targets(cfg, i)
        out.append(Target.copy("norm.weight", "model.norm.weight"))
        if not cfg.tie_word_embeddings:
            out.append(Target.copy("lm_head.weight", "lm_head.weight"))
        return out
