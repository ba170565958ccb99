"""PhiMoE (``model_type: "phimoe"``, ``PhimoeForCausalLM``, Phi-3.5-MoE).

Mixtral's key layout (``block_sparse_moe.experts.{e}.w1/w3/w2`` and ``block_sparse_moe.gate``
as ``save_pretrained`` writes them; the in-memory ``mlp.router``/``mlp.experts.gate_up_proj``
import too) with:

* LayerNorms with biases (``norm_type="layernorm"``, ``norm_bias=True``, eps ``rms_norm_eps``);
* ``attention_bias`` on q/k/v *and* o_proj (``attention_bias`` + ``attention_out_bias``);
* ``lm_head_bias``; ``sliding_window`` on every layer;
* sparsemixer top-2 routing (``router_type="sparsemixer"``), with ``router_jitter_noise`` as its
  margin ``moe.sparsemixer_eps`` (used at inference too). Inference is transformers' eval path
  exactly; training uses the deterministic choice (see
  :class:`~moekit.layers.strategies.SparseMixerRouting`). ``input_jitter_noise`` -> training-time
  input jitter (``moe.noise="jitter"``).

Refused: ``num_experts_per_tok != 2`` (transformers' sparsemixer always picks 2) and any RoPE
scaling (PhiMoE switches ``short_mscale``/``long_mscale`` by sequence length; Phi-3.5-MoE's
released ``longrope`` among them).
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
from moekit.convert.families.mixtral import MixtralAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig


class PhimoeAdapter(MixtralAdapter):
    """PhiMoE: Mixtral layout, LayerNorms with biases, biased attention and head, sparsemixer."""

    model_type = "phimoe"
    architecture = "PhimoeForCausalLM"
    model_features = frozenset({"norm_type", "norm_bias", "attention_out_bias", "lm_head_bias"})
    defaults = MixtralAdapter.defaults | {
        "num_local_experts": 16,
        "router_jitter_noise": 0.01,
        "input_jitter_noise": 0.0,
        "attention_bias": False,
        "lm_head_bias": False,
    }

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """Biases on q/k/v/o (one switch); one sliding window (or None)."""
        bias = bool(r.get("attention_bias"))
        return {
            "sliding_window": r.hf.get("sliding_window"),
            "attention_bias": bias,
            "attention_out_bias": bias,
        }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        r.refuse("num_experts_per_tok", 2, "sparsemixer always routes to 2 experts")
        kwargs = LlamaAdapter.common_from_hf(self, r) | self.attention_from_hf(r)
        if kwargs["rope_scaling"] is not None:
            raise ValueError(
                f"phimoe config.json: unsupported option rope_type={kwargs['rope_scaling']['rope_type']!r} "
                "(PhiMoE's scaled RoPE switches short_mscale/long_mscale by sequence length; moekit "
                "imports PhiMoE with default RoPE only)"
            )
        jitter = float(r.get("input_jitter_noise") or 0.0)
        moe = MoEConfig(
            dim=kwargs["dim"],
            ffn_dim=r.require("intermediate_size"),
            num_experts=r.first("num_local_experts", "num_experts"),
            top_k=2,
            router_type="sparsemixer",
            sparsemixer_eps=float(r.get("router_jitter_noise")),
            noise="jitter" if jitter > 0 else "none",
            noise_eps=jitter if jitter > 0 else 1e-2,
        )
        return ModelConfig(
            **kwargs,
            moe=moe,
            moe_placement="all",
            norm_type="layernorm",
            norm_bias=True,
            lm_head_bias=bool(r.get("lm_head_bias")),
            aux_loss_coef=float(r.get("router_aux_loss_coef")),
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring."""
        moe = self.check_moe(cfg, allowed={"router_type"})
        self.check_attention(cfg, bias=None, sliding=True)
        if moe.router_type != "sparsemixer":
            raise refuse_export(
                self.model_type, "moe.router_type", moe.router_type, "PhiMoE uses sparsemixer"
            )
        if (cfg.norm_type, cfg.norm_bias) != ("layernorm", True):
            raise refuse_export(
                self.model_type, "norm_type", cfg.norm_type, "PhiMoE uses LayerNorms with biases"
            )
        if cfg.attention_out_bias != cfg.attention_bias:
            raise refuse_export(
                self.model_type,
                "attention_out_bias",
                cfg.attention_out_bias,
                "PhiMoE's attention_bias covers q/k/v and o_proj together",
            )
        if cfg.rope_scaling is not None:
            raise refuse_export(
                self.model_type, "rope_scaling", cfg.rope_type, "PhiMoE's scaled RoPE differs"
            )
        if cfg.num_moe_layers != cfg.num_layers:
            raise refuse_export(self.model_type, "moe_placement", cfg.dense_layer_indices, "no dense layers")
        return self.common_to_hf(cfg) | {
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": 2,
            "intermediate_size": moe.ffn_dim,
            "sliding_window": cfg.sliding_window,
            "attention_bias": cfg.attention_bias,
            "lm_head_bias": cfg.lm_head_bias,
            "router_jitter_noise": moe.sparsemixer_eps,
            "input_jitter_noise": moe.noise_eps if moe.noise == "jitter" else 0.0,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": False,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Sparsemixer routing."""
        return cfg.moe is not None and cfg.moe.router_type == "sparsemixer"

    def targets(self, cfg: ModelConfig) -> list[Target]:
        """Mixtral's targets plus the LayerNorm and LM-head biases."""
        out = super().targets(cfg)
        if cfg.norm_bias:
            for i in range(cfg.num_layers):
                src, dst = self.layer_prefix(i), f"layers.{i}."
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    out.append(Target.copy(f"{dst}{norm}.bias", f"{src}{norm}.bias"))
            out.append(Target.copy("norm.bias", "model.norm.bias"))
        if cfg.lm_head_bias:
            out.append(Target.copy("lm_head.bias", "lm_head.bias"))
        return out

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Mixtral's per-expert layout; in memory the router is ``mlp.router``."""
        moe = cfg.moe_config(i)
        old, new, dst = (
            self.layer_prefix(i) + "block_sparse_moe.",
            self.layer_prefix(i) + "mlp.",
            f"layers.{i}.mlp.",
        )
        n = moe.num_experts
        gate_up = [(f"{old}experts.{e}.w1.weight", f"{old}experts.{e}.w3.weight") for e in range(n)]
        return [
            Target.copy(f"{dst}router.weight", f"{old}gate.weight", f"{new}router.weight"),
            Target(
                f"{dst}experts.w_in", expert_in_layouts(gate_up, f"{new}experts.gate_up_proj", n, moe.ffn_dim)
            ),
            Target(
                f"{dst}experts.w_out",
                expert_out_layouts(
                    [f"{old}experts.{e}.w2.weight" for e in range(n)], f"{new}experts.down_proj"
                ),
            ),
        ]
