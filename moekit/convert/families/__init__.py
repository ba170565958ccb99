"""Family adapters, one file per Hugging Face ``model_type``, and the registry that picks them.

To add a family: write ``families/<model_type>.py`` with a :class:`~moekit.convert.families.base.FamilyAdapter`
subclass (usually of :class:`~moekit.convert.families.llama.LlamaAdapter`, overriding the hooks whose
names differ), register an instance in :data:`FAMILIES` (order matters for automatic export
choice: the first whose ``matches(cfg)`` is true wins), and add a round-trip test in
``tests/test_convert.py`` built from transformers' own config class.
"""

from __future__ import annotations

from moekit.convert.families.base import FamilyAdapter, Piece, Target
from moekit.convert.families.dbrx import DbrxAdapter
from moekit.convert.families.deepseek_v2 import DeepseekV2Adapter
from moekit.convert.families.deepseek_v3 import DeepseekV3Adapter
from moekit.convert.families.dots1 import Dots1Adapter
from moekit.convert.families.ernie4_5_moe import Ernie45MoeAdapter
from moekit.convert.families.flex_olmo import FlexOlmoAdapter
from moekit.convert.families.glm4_moe import Glm4MoeAdapter
from moekit.convert.families.gpt_oss import GptOssAdapter
from moekit.convert.families.granitemoe import GraniteMoeAdapter, GraniteMoeSharedAdapter
from moekit.convert.families.hunyuan_v1_moe import HunyuanV1MoeAdapter
from moekit.convert.families.jamba import JambaAdapter
from moekit.convert.families.jetmoe import JetMoeAdapter
from moekit.convert.families.llama import LlamaAdapter
from moekit.convert.families.llama4 import Llama4TextAdapter
from moekit.convert.families.minimax import MiniMaxAdapter
from moekit.convert.families.mistral import MistralAdapter
from moekit.convert.families.mixtral import MixtralAdapter
from moekit.convert.families.olmoe import OlmoeAdapter
from moekit.convert.families.phimoe import PhimoeAdapter
from moekit.convert.families.qwen2 import Qwen2Adapter
from moekit.convert.families.qwen2_moe import Qwen2MoeAdapter
from moekit.convert.families.qwen3 import Qwen3Adapter
from moekit.convert.families.qwen3_moe import Qwen3MoeAdapter
from moekit.models.config import ModelConfig

# Export preference order: the most specific families first.
FAMILIES: dict[str, FamilyAdapter] = {
    a.model_type: a
    for a in (
        GptOssAdapter(),
        Llama4TextAdapter(),
        JetMoeAdapter(),
        MiniMaxAdapter(),
        Glm4MoeAdapter(),
        Dots1Adapter(),
        JambaAdapter(),
        DeepseekV3Adapter(),
        DeepseekV2Adapter(),
        GraniteMoeSharedAdapter(),
        GraniteMoeAdapter(),
        Ernie45MoeAdapter(),
        PhimoeAdapter(),
        DbrxAdapter(),
        HunyuanV1MoeAdapter(),
        FlexOlmoAdapter(),
        Qwen2MoeAdapter(),
        OlmoeAdapter(),
        Qwen3MoeAdapter(),
        MixtralAdapter(),
        Qwen3Adapter(),
        Qwen2Adapter(),
        MistralAdapter(),
        LlamaAdapter(),
    )
}


# MoE families transformers ships that moekit knows it cannot run yet, and why (the error says so).
NOT_MODELLED = {
    "llama4": "multimodal wrapper (vision tower and language_model.* names; text-only llama4_text folders load)",
    "qwen3_next": "gated DeltaNet linear-attention layers",
    "granitemoehybrid": "Mamba2 mixers",
}


def get_family(model_type: str) -> FamilyAdapter:
    """The adapter for an HF ``model_type``; ValueError naming it and the supported ones if unknown."""
    if model_type in NOT_MODELLED and model_type not in FAMILIES:
        raise ValueError(
            f"Hugging Face model_type {model_type!r} is not supported: moekit does not model its "
            f"{NOT_MODELLED[model_type]}; moekit.convert supports {sorted(FAMILIES)}"
        )
    if model_type not in FAMILIES:
        raise ValueError(
            f"unknown Hugging Face model_type {model_type!r}; moekit.convert supports {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def family_for(config: ModelConfig) -> FamilyAdapter:
    """The HF family a moekit config exports to: the first adapter that matches and accepts it.

    Raises:
        ValueError: naming the option that blocks export (from the best-matching family).
    """
    first_error: ValueError | None = None
    for adapter in FAMILIES.values():
        if not adapter.matches(config):
            continue
        try:
            adapter.config_to_hf(config)
        except ValueError as err:
            first_error = first_error or err
            continue
        return adapter
    if first_error is not None:
        raise first_error
    # No family matched the shape; report why the closest generic family refuses it.
    fallback = FAMILIES["qwen3_moe"] if config.num_moe_layers else FAMILIES["llama"]
    fallback.config_to_hf(config)
    raise ValueError("no Hugging Face family can express this model config")  # pragma: no cover


__all__ = ["FAMILIES", "FamilyAdapter", "Piece", "Target", "family_for", "get_family"]
