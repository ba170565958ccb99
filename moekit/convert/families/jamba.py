"""Jamba (``model_type: "jamba"``, ``JambaForCausalLM``): Mamba layers with attention every few
layers, and MoE FFNs every few layers.

Maps: layer i is attention iff ``i % attn_layer_period == attn_layer_offset``, else Mamba
(``layer_types``); its FFN is MoE iff ``i % expert_layer_period == expert_layer_offset`` and
``num_experts > 1`` (explicit ``moe_layer_indices``). Attention is GQA without RoPE
(``use_rope=False``) and without biases. The router is a softmax top-k whose weights are *not*
renormalised (``norm_topk_prob=False``); experts and the dense FFN share ``intermediate_size``.
``mamba_d_state``/``mamba_d_conv``/``mamba_expand``/``mamba_dt_rank``/``mamba_conv_bias``/
``mamba_proj_bias`` -> :class:`~moekit.blocks.MambaConfig` with Jamba's dt/B/C RMSNorms
(``dt_bc_norm=True``).

HF layout: ``model.layers.{i}.{input_layernorm,pre_ff_layernorm}``, ``...self_attn.{q,k,v,o}_proj``
or ``...mamba.*`` (the same names as :class:`~moekit.blocks.MambaMixer`), ``...feed_forward.
{gate,up,down}_proj`` or ``...feed_forward.router`` + ``...feed_forward.experts.{e}.*`` (or the
fused ``experts.gate_up_proj``/``down_proj``), ``model.final_layernorm``, ``lm_head``.

Refused: ``hidden_act`` other than SiLU; export of layouts that are not periodic, of MoE options
Jamba lacks, of RoPE, q/k norms, biases or sliding windows.
"""

from __future__ import annotations

import math
from typing import Any

from moekit.blocks import MambaConfig
from moekit.convert.families.base import (
    Target,
    expert_in_layouts,
    expert_out_layouts,
    refuse_export,
)
from moekit.convert.families.llama import LlamaAdapter
from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig
from moekit.models.layer_layouts import periodic_layer_ids, periodic_layer_types

_MAMBA_TENSORS = (
    "in_proj.weight",
    "conv1d.weight",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
)
_MAMBA_NORMS = ("dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight")


def find_period(num_layers: int, ids: list[int]) -> tuple[int, int] | None:
    """The smallest ``(period, offset)`` with ``ids == [i for i < num_layers if i % period == offset]``."""
    if not ids:
        return num_layers + 1, num_layers  # a period past the last layer selects none
    for period in range(1, num_layers + 1):
        offset = ids[0] % period
        if list(periodic_layer_ids(num_layers, period, offset)) == list(ids):
            return period, offset
    return None


class JambaAdapter(LlamaAdapter):
    """Jamba: a hybrid of Mamba and NoPE attention layers with periodic MoE FFNs."""

    model_type = "jamba"
    architecture = "JambaForCausalLM"
    defaults = LlamaAdapter.defaults | {
        "max_position_embeddings": 262144,
        "num_experts": 16,
        "num_experts_per_tok": 2,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 8,
        "attn_layer_offset": 4,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_dt_rank": "auto",
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "router_aux_loss_coef": 0.001,
        "num_key_value_heads": 8,
    }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """See the module docstring."""
        r = self.reader(hf)
        r.refuse("hidden_act", "silu", "moekit's FFNs are SwiGLU and its Mamba conv uses SiLU")
        dim, num_layers = r.require("hidden_size"), r.require("num_hidden_layers")
        num_heads = r.require("num_attention_heads")
        dt_rank = r.get("mamba_dt_rank")
        try:
            layer_types = periodic_layer_types(
                num_layers, r.get("attn_layer_period"), r.get("attn_layer_offset")
            )
            num_experts = int(r.first("num_experts", "num_local_experts"))
            moe_ids = (
                periodic_layer_ids(num_layers, r.get("expert_layer_period"), r.get("expert_layer_offset"))
                if num_experts > 1
                else ()
            )
        except ValueError as err:
            raise ValueError(f"jamba config.json: {err}") from None
        ffn_dim = r.require("intermediate_size")
        moe = None
        if num_experts > 1:
            moe = MoEConfig(
                dim=dim,
                ffn_dim=ffn_dim,
                num_experts=num_experts,
                top_k=r.require("num_experts_per_tok"),
                norm_topk_prob=False,
            )
        mamba = MambaConfig(
            dim=dim,
            expand=r.get("mamba_expand"),
            state_dim=r.get("mamba_d_state"),
            conv_kernel=r.get("mamba_d_conv"),
            dt_rank=math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank),
            conv_bias=bool(r.get("mamba_conv_bias")),
            proj_bias=bool(r.get("mamba_proj_bias")),
            dt_bc_norm=True,
            norm_eps=float(r.get("rms_norm_eps")),
        )
        return ModelConfig(
            vocab_size=r.require("vocab_size"),
            dim=dim,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=r.get("num_key_value_heads", num_heads),
            head_dim=r.get("head_dim"),
            ffn_dim=ffn_dim,
            moe=moe,
            moe_placement="explicit" if moe is not None else "none",
            moe_layer_indices=moe_ids if moe is not None else None,
            rms_norm_eps=float(r.get("rms_norm_eps")),
            max_position_embeddings=r.get("max_position_embeddings"),
            tie_word_embeddings=bool(r.get("tie_word_embeddings")),
            initializer_range=float(r.get("initializer_range")),
            aux_loss_coef=float(r.get("router_aux_loss_coef", 0.0)),
            layer_types=layer_types,
            mamba=mamba,
            use_rope=False,
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """See the module docstring (ValueError naming what Jamba cannot express)."""
        if cfg.use_rope:
            raise refuse_export(self.model_type, "use_rope", True, "Jamba's attention has no RoPE")
        if cfg.attention_type != "mha" or cfg.qk_norm != "none" or cfg.attention_bias or cfg.sliding_window:
            raise refuse_export(
                self.model_type,
                "attention",
                cfg.attention_type,
                "Jamba uses plain GQA without biases or windows",
            )
        attn_ids = [i for i in range(cfg.num_layers) if cfg.layer_type(i) == "attention"]
        attn = find_period(cfg.num_layers, attn_ids)
        if attn is None:
            raise refuse_export(self.model_type, "layer_types", list(cfg.layer_types or ()), "not periodic")
        mamba = cfg.mamba or MambaConfig(dim=cfg.dim)
        if not mamba.dt_bc_norm or mamba.activation != "silu":
            raise refuse_export(
                self.model_type, "mamba.dt_bc_norm", mamba.dt_bc_norm, "Jamba always norms dt/B/C, with SiLU"
            )
        out = self.common_to_hf(cfg)
        for key in ("rope_parameters", "head_dim"):
            out.pop(key)
        if cfg.attn_head_dim != cfg.dim // cfg.num_heads:
            out["head_dim"] = cfg.attn_head_dim  # JambaAttention reads it when present
        out |= {
            "attn_layer_period": attn[0],
            "attn_layer_offset": attn[1],
            "intermediate_size": cfg.ffn_dim,
            "mamba_d_state": mamba.state_dim,
            "mamba_d_conv": mamba.conv_kernel,
            "mamba_expand": mamba.expand,
            "mamba_dt_rank": mamba.time_step_rank,
            "mamba_conv_bias": mamba.conv_bias,
            "mamba_proj_bias": mamba.proj_bias,
            "use_mamba_kernels": False,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": False,
        }
        if cfg.num_moe_layers == 0:
            return out | {
                "num_experts": 1,
                "num_experts_per_tok": 1,
                "expert_layer_period": 1,
                "expert_layer_offset": 0,
            }
        moe = self.check_moe(cfg, allowed={"norm_topk_prob"})
        if moe.norm_topk_prob and moe.top_k > 1:
            raise refuse_export(
                self.model_type, "moe.norm_topk_prob", True, "Jamba does not renormalise top-k"
            )
        if moe.ffn_dim != cfg.ffn_dim and cfg.num_moe_layers < cfg.num_layers:
            raise refuse_export(
                self.model_type,
                "moe.ffn_dim",
                moe.ffn_dim,
                f"Jamba's experts share intermediate_size={cfg.ffn_dim}",
            )
        experts = find_period(cfg.num_layers, cfg.moe_layer_ids)
        if experts is None or moe.num_experts < 2:
            raise refuse_export(self.model_type, "moe_layer_indices", cfg.moe_layer_ids, "not periodic")
        return out | {
            "intermediate_size": moe.ffn_dim,
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "expert_layer_period": experts[0],
            "expert_layer_offset": experts[1],
        }

    def check_mixers(self, cfg: ModelConfig) -> None:
        """Jamba expresses Mamba layers and attention without RoPE (checked in :meth:`config_to_hf`)."""

    def matches(self, cfg: ModelConfig) -> bool:
        """Any model with Mamba layers."""
        return bool(cfg.mamba_layer_ids)

    def targets(self, cfg: ModelConfig) -> list[Target]:
        """Embedding, per-layer norms, mixer (attention or Mamba) and FFN, final norm, lm_head."""
        out = [Target.copy("embed_tokens.weight", "model.embed_tokens.weight")]
        for i in range(cfg.num_layers):
            src, dst = self.layer_prefix(i), f"layers.{i}."
            out.append(Target.copy(f"{dst}input_layernorm.weight", f"{src}input_layernorm.weight"))
            out.append(Target.copy(f"{dst}post_attention_layernorm.weight", f"{src}pre_ff_layernorm.weight"))
            if cfg.layer_type(i) == "mamba":
                out += self.mamba_targets(cfg, i)
            else:
                out += self.attention_targets(cfg, i)
            if cfg.is_moe_layer(i):
                out += self.moe_targets(cfg, i)
            else:
                out += self.dense_mlp_targets(i, cfg.ffn_dim, f"{src}feed_forward.", f"{dst}mlp.")
        out.append(Target.copy("norm.weight", "model.final_layernorm.weight"))
        if not cfg.tie_word_embeddings:
            out.append(Target.copy("lm_head.weight", "lm_head.weight"))
        return out

    def mamba_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """The Mamba mixer's tensors, under the same names in both."""
        assert cfg.mamba is not None
        names = list(_MAMBA_TENSORS) + ["out_proj.weight"]
        names += ["conv1d.bias"] if cfg.mamba.conv_bias else []
        names += ["in_proj.bias", "out_proj.bias"] if cfg.mamba.proj_bias else []
        names += list(_MAMBA_NORMS) if cfg.mamba.dt_bc_norm else []
        src, dst = self.layer_prefix(i) + "mamba.", f"layers.{i}.mamba."
        return [Target.copy(dst + n, src + n) for n in names]

    def moe_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Router and experts (per-expert keys as saved, or the fused in-memory layout)."""
        moe = cfg.moe_config(i)
        src, dst = self.layer_prefix(i) + "feed_forward.", f"layers.{i}.mlp."
        gate_up = [
            (f"{src}experts.{e}.gate_proj.weight", f"{src}experts.{e}.up_proj.weight")
            for e in range(moe.num_experts)
        ]
        down = [f"{src}experts.{e}.down_proj.weight" for e in range(moe.num_experts)]
        return [
            Target.copy(f"{dst}router.weight", f"{src}router.weight"),
            Target(
                f"{dst}experts.w_in",
                expert_in_layouts(gate_up, f"{src}experts.gate_up_proj", moe.num_experts, moe.ffn_dim),
            ),
            Target(f"{dst}experts.w_out", expert_out_layouts(down, f"{src}experts.down_proj")),
        ]
