"""MiniMax (``model_type: "minimax"``, ``MiniMaxForCausalLM``; MiniMax-Text-01).

``layer_types`` mixes ``"full_attention"`` (GQA with Llama names, RoPE, ``sliding_window``) and
``"linear_attention"``: lightning attention (``self_attn.qkv_proj``/``output_gate``/``norm``/
``out_proj`` and the ``slope_rate`` buffer, :class:`~moekit.blocks.LightningAttention`), a
decayed linear attention whose cache is one ``[Dh, Dh]`` state per head. Every layer's residual is
its *normed* input, scaled: ``a * norm(x) + b * f(norm(x))`` with ``full_attn_``/
``linear_attn_``/``mlp_`` ``alpha_factor``/``beta_factor`` (``norm_placement="normed_residual"``,
``residual_scales``). The FFN is Mixtral's (``block_sparse_moe``, renormalised softmax top-k).
The derived decay tables ``query_decay``/``key_decay``/``diagonal_decay`` are not read (moekit
computes the same decays from ``slope_rate``) and are written back on export.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.convert.families.base import HFConfigReader, Target, refuse_export
from moekit.convert.families.mixtral import MixtralAdapter
from moekit.models.config import ModelConfig

_HF_TO_LAYER = {"full_attention": "attention", "linear_attention": "linear"}
_LAYER_TO_HF = {v: k for k, v in _HF_TO_LAYER.items()}
_FACTORS = (
    "full_attn_alpha_factor",
    "full_attn_beta_factor",
    "linear_attn_alpha_factor",
    "linear_attn_beta_factor",
    "mlp_alpha_factor",
    "mlp_beta_factor",
)
DERIVED_BUFFERS = ("query_decay", "key_decay", "diagonal_decay")


def lightning_decay_tables(slope_H11: torch.Tensor, block_size: int) -> dict[str, torch.Tensor]:
    """transformers' derived decay buffers of one lightning layer (written on export only)."""
    idx_b1 = torch.arange(1, block_size + 1, dtype=slope_H11.dtype)[:, None]
    dist = (idx_b1 - idx_b1.T)[None, None]
    diagonal = torch.exp(torch.where(dist >= 0, -(slope_H11 * dist), float("-inf")))
    return {
        "query_decay": torch.exp(-slope_H11 * idx_b1),
        "key_decay": torch.exp(-slope_H11 * (block_size - idx_b1)),
        "diagonal_decay": diagonal,
    }


class MiniMaxAdapter(MixtralAdapter):
    """MiniMax: lightning-attention layers beside softmax attention, scaled normed residuals."""

    model_type = "minimax"
    architecture = "MiniMaxForCausalLM"
    linear_layers = True
    model_features = frozenset({"norm_placement", "residual_scales"})
    defaults = MixtralAdapter.defaults | dict.fromkeys(_FACTORS, 1.0) | {"block_size": 256}

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """One sliding window (or None) for the softmax layers; the layer list."""
        num_layers = r.require("num_hidden_layers")
        hf_types = r.get("layer_types") or [
            "full_attention" if (i + 1) % 2 else "linear_attention" for i in range(num_layers)
        ]
        unknown = sorted(set(hf_types) - set(_HF_TO_LAYER))
        if unknown:
            raise ValueError(
                f"minimax config.json: unsupported option layer_types={unknown} "
                "(moekit reads full_attention and linear_attention)"
            )
        return {
            "sliding_window": r.hf.get("sliding_window"),
            "layer_types": tuple(_HF_TO_LAYER[t] for t in hf_types),
            "linear_block_size": int(r.get("block_size")),
            "norm_placement": "normed_residual",
            "residual_scales": tuple(float(r.get(k)) for k in _FACTORS),
        }

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """Mixtral's fields plus the layer list, block size and residual factors."""
        if cfg.norm_placement != "normed_residual":
            raise refuse_export(
                self.model_type,
                "norm_placement",
                cfg.norm_placement,
                "MiniMax's residual is the normed input",
            )
        out = super().config_to_hf(cfg)
        scales = cfg.residual_scales or (1.0,) * 6
        return out | {
            "layer_types": [_LAYER_TO_HF[cfg.layer_type(i)] for i in range(cfg.num_layers)],
            "block_size": cfg.linear_block_size,
            **dict(zip(_FACTORS, scales, strict=True)),
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Lightning-attention layers."""
        return "linear" in (cfg.layer_types or ())

    def attention_targets(self, cfg: ModelConfig, i: int) -> list[Target]:
        """Softmax layers as Mixtral; lightning layers' projections, norm and ``slope_rate``."""
        if cfg.layer_type(i) != "linear":
            return super().attention_targets(cfg, i)
        src, dst = self.layer_prefix(i) + "self_attn.", f"layers.{i}.self_attn."
        names = ("qkv_proj.weight", "output_gate.weight", "out_proj.weight", "norm.weight", "slope_rate")
        return [Target.copy(dst + n, src + n) for n in names]

    def derived_tensor(self, key: str) -> bool:
        """The decay tables of lightning layers (recomputed from ``slope_rate``)."""
        return key.rsplit(".", 1)[-1] in DERIVED_BUFFERS

    def derived_tensors(self, cfg: ModelConfig, state: dict[str, Any]) -> list[tuple[str, Any]]:
        """transformers' decay tables for every lightning layer, from its ``slope_rate``."""
        out = []
        block = cfg.linear_block_size
        for name, slope in state.items():
            if name.endswith("self_attn.slope_rate"):
                i = int(name.split(".")[1])
                tables = lightning_decay_tables(slope.detach().float().cpu(), block)
                out += [
                    (f"{self.layer_prefix(i)}self_attn.{k}", v.to(slope.dtype)) for k, v in tables.items()
                ]
        return out
