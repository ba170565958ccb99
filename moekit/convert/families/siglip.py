"""transformers ``SiglipModel`` folders -> moekit :class:`~moekit.models.vision.siglip.SigLIPMoE`.

Import reads ``config.json`` (``model_type: "siglip"``) and the safetensors weights into a dense
SigLIP dual encoder. HF tensor names live only here. Supported: ``vision_use_head=True`` (the MAP
head) and the ``gelu_pytorch_tanh`` / ``gelu`` activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.convert.families.base import Target
from moekit.convert.families.clip import _layer_targets, load_dual_encoder_hf
from moekit.models.vision.siglip import SigLIPConfig, SigLIPMoE, SigLIPTextConfig, SigLIPVisionConfig

HF_MODEL_TYPES = ("siglip",)
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _encoder_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _ACTS:
        raise ValueError(
            f"{where}.hidden_act={act!r} is not supported; moekit's SigLIP takes {sorted(_ACTS)}"
        )
    return {
        "dim": int(hf.get("hidden_size", 768)),
        "num_layers": int(hf.get("num_hidden_layers", 12)),
        "num_heads": int(hf.get("num_attention_heads", 12)),
        "ffn_dim": int(hf.get("intermediate_size", 3072)),
        "activation": _ACTS[act],
        "norm_eps": float(hf.get("layer_norm_eps", 1e-6)),
    }


def siglip_config_from_hf(hf: dict[str, Any]) -> SigLIPConfig:
    """A :class:`SigLIPConfig` from an HF SigLIP ``config.json`` dict (ValueError naming a bad key)."""
    if hf.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(f"model_type={hf.get('model_type')!r} is not a SigLIP config")
    t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
    if not v.get("vision_use_head", True):
        raise ValueError(
            "vision_config.vision_use_head=False: a SiglipModel without its MAP head is not supported"
        )
    vision = SigLIPVisionConfig(
        **_encoder_fields(v, "vision_config"),
        image_size=int(v.get("image_size", 224)),
        patch_size=int(v.get("patch_size", 16)),
        num_channels=int(v.get("num_channels", 3)),
    )
    text_fields = _encoder_fields(t, "text_config")
    text = SigLIPTextConfig(
        **text_fields,
        vocab_size=int(t.get("vocab_size", 32000)),
        max_position_embeddings=int(t.get("max_position_embeddings", 64)),
        projection_size=int(t.get("projection_size") or text_fields["dim"]),
    )
    return SigLIPConfig(vision=vision, text=text)


def siglip_targets(cfg: SigLIPConfig) -> list[Target]:
    """Where every moekit tensor of a dense SigLIP lives in an HF ``SiglipModel`` checkpoint."""
    targets = [
        Target.copy("vision.pos_embed.weight", "vision_model.embeddings.position_embedding.weight"),
        Target.copy("vision.head.probe", "vision_model.head.probe"),
        Target.copy("vision.head.attention.in_proj_weight", "vision_model.head.attention.in_proj_weight"),
        Target.copy("vision.head.attention.in_proj_bias", "vision_model.head.attention.in_proj_bias"),
        Target.copy("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
        Target.copy("text.pos_embed.weight", "text_model.embeddings.position_embedding.weight"),
        Target.copy("logit_scale", "logit_scale"),
        Target.copy("logit_bias", "logit_bias"),
    ]
    for p in ("weight", "bias"):
        targets += [
            Target.copy(f"vision.patch_embed.{p}", f"vision_model.embeddings.patch_embedding.{p}"),
            Target.copy(f"vision.norm.{p}", f"vision_model.post_layernorm.{p}"),
            Target.copy(f"vision.head.attention.out_proj.{p}", f"vision_model.head.attention.out_proj.{p}"),
            Target.copy(f"vision.head.layernorm.{p}", f"vision_model.head.layernorm.{p}"),
            Target.copy(f"vision.head.mlp.w_in.{p}", f"vision_model.head.mlp.fc1.{p}"),
            Target.copy(f"vision.head.mlp.w_out.{p}", f"vision_model.head.mlp.fc2.{p}"),
            Target.copy(f"text.final_norm.{p}", f"text_model.final_layer_norm.{p}"),
            Target.copy(f"text.head.{p}", f"text_model.head.{p}"),
        ]
    targets += _layer_targets("vision.encoder", "vision_model.encoder", cfg.vision.num_layers)
    targets += _layer_targets("text.encoder", "text_model.encoder", cfg.text.num_layers)
    return targets


def load_siglip_hf(path: str | Path, dtype: torch.dtype | None = None) -> SigLIPMoE:
    """Imports a transformers ``SiglipModel`` folder as a dense :class:`SigLIPMoE` (eval mode).

    Args:
        path: the folder (``config.json`` + safetensors; pickles are refused).
        dtype: run dtype; None keeps the checkpoint's.
    """
    return load_dual_encoder_hf(path, dtype, siglip_config_from_hf, SigLIPMoE, siglip_targets, "siglip")
