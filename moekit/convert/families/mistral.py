"""Mistral (``model_type: "mistral"``, ``MistralForCausalLM``): dense Llama layout plus a sliding window."""

from __future__ import annotations

from typing import Any

from moekit.convert.families.llama import LlamaAdapter
from moekit.models.config import ModelConfig


class MistralAdapter(LlamaAdapter):
    """Llama names; ``sliding_window`` (transformers' default 4096) maps to ``ModelConfig.sliding_window``."""

    model_type = "mistral"
    architecture = "MistralForCausalLM"
    defaults = LlamaAdapter.defaults | {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32}

    def attention_from_hf(self, r) -> dict[str, Any]:
        """No attention biases; the window applies to every layer."""
        if "layer_types" in r.hf:
            raise ValueError(
                "mistral config.json: unsupported option layer_types (per-layer attention types)"
            )
        window = r.hf.get("sliding_window", 4096)
        return {"sliding_window": window}

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """Dense, no biases, no q/k norm; ``sliding_window`` may be None."""
        self.check_dense(cfg)
        self.check_attention(cfg, sliding=True)
        return self.common_to_hf(cfg) | {
            "intermediate_size": cfg.ffn_dim,
            "sliding_window": cfg.sliding_window,
        }

    def matches(self, cfg: ModelConfig) -> bool:
        """Dense plain attention with a sliding window."""
        return (
            cfg.num_moe_layers == 0
            and cfg.attention_type == "mha"
            and cfg.qk_norm == "none"
            and not cfg.attention_bias
            and cfg.sliding_window is not None
        )
