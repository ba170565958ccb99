"""Qwen2 (``model_type: "qwen2"``, ``Qwen2ForCausalLM``): dense Llama layout with q/k/v biases.

Sliding windows in the Qwen family are per layer (``layer_types``, from ``use_sliding_window`` and
``max_window_layers``); moekit has one window for all layers, so only "all full" or "all sliding"
import, and a mix raises ``ValueError`` naming ``layer_types``.
"""

from __future__ import annotations

from typing import Any

from moekit.convert.families.base import HFConfigReader
from moekit.convert.families.llama import LlamaAdapter
from moekit.models.config import ModelConfig


def qwen_sliding_window(r: HFConfigReader, num_layers: int) -> int | None:
    """The single window of a Qwen config, None when every layer is full attention."""
    window = r.hf.get("sliding_window")
    types = r.hf.get("layer_types")
    if types is None:
        use = bool(r.hf.get("use_sliding_window", False)) and window
        start = r.hf.get("max_window_layers", 28)
        types = ["sliding_attention" if use and i >= start else "full_attention" for i in range(num_layers)]
    kinds = set(types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window:
        return int(window)
    raise ValueError(
        f"{r.model_type} config.json: unsupported option layer_types={types} (moekit has one sliding window for "
        "all layers; per-layer windows from use_sliding_window/max_window_layers are not modelled)"
    )


def qwen_sliding_to_hf(cfg: ModelConfig, disabled: Any = None) -> dict[str, Any]:
    """``use_sliding_window``/``sliding_window``/``max_window_layers``/``layer_types`` for one window."""
    if cfg.sliding_window is None:
        return {
            "use_sliding_window": False,
            "sliding_window": disabled,
            "max_window_layers": cfg.num_layers,
            "layer_types": ["full_attention"] * cfg.num_layers,
        }
    return {
        "use_sliding_window": True,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": 0,
        "layer_types": ["sliding_attention"] * cfg.num_layers,
    }


class Qwen2Adapter(LlamaAdapter):
    """Llama names plus ``self_attn.{q,k,v}_proj.bias`` (always present in Qwen2)."""

    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    defaults = LlamaAdapter.defaults | {"max_position_embeddings": 32768}

    def attention_from_hf(self, r: HFConfigReader) -> dict[str, Any]:
        """q/k/v biases; one sliding window at most."""
        return {
            "attention_bias": True,
            "sliding_window": qwen_sliding_window(r, r.require("num_hidden_layers")),
        }

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """Dense with q/k/v biases (Qwen2 always has them)."""
        self.check_dense(cfg)
        self.check_attention(cfg, bias=True, sliding=True)
        return self.common_to_hf(cfg) | {"intermediate_size": cfg.ffn_dim} | qwen_sliding_to_hf(cfg)

    def matches(self, cfg: ModelConfig) -> bool:
        """Dense plain attention with q/k/v biases."""
        return (
            cfg.num_moe_layers == 0
            and cfg.attention_type == "mha"
            and cfg.qk_norm == "none"
            and cfg.attention_bias
        )
