"""transformers ``CLIPModel`` folders <-> moekit :class:`~moekit.models.vision.CLIPMoE`.

Import reads ``config.json`` (``model_type: "clip"`` with ``text_config``/``vision_config``) and the
safetensors weights into a dense CLIP-MoE; export writes the folder transformers'
``CLIPModel.from_pretrained`` loads. HF tensor names live only here. transformers has no MoE
CLIP, so a model with MoE layers is refused on export (export the dense parent, or use moekit
folders). Text pooling: transformers pools the first ``eos_token_id`` token, except for configs
with ``eos_token_id == 2``, which it pools by argmax of the ids; moekit's ``TextConfig.pooling``
records which (``"eos"`` / ``"argmax"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moekit.convert.checkpoint import checkpoint_dtype, hf_tensors, load_into, weight_map, write_shards
from moekit.convert.families.base import Target
from moekit.models.io import atomic_write, materialize
from moekit.models.vision import CLIPConfig, CLIPMoE, TextConfig, ViTConfig
from moekit.models.vision.config import EncoderConfig

HF_MODEL_TYPES = ("clip",)
_ACTS = ("gelu", "quick_gelu")
_LEGACY_EOS = 2  # transformers pools by argmax for this eos id


def _encoder_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("hidden_act", "quick_gelu")
    if act not in _ACTS:
        raise ValueError(f"{where}.hidden_act={act!r} is not supported; moekit's CLIP takes {list(_ACTS)}")
    return {
        "dim": int(hf.get("hidden_size", 512)),
        "num_layers": int(hf.get("num_hidden_layers", 12)),
        "num_heads": int(hf.get("num_attention_heads", 8)),
        "ffn_dim": int(hf.get("intermediate_size", 2048)),
        "activation": act,
        "norm_eps": float(hf.get("layer_norm_eps", 1e-5)),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
    }


def clip_config_from_hf(hf: dict[str, Any]) -> CLIPConfig:
    """A :class:`CLIPConfig` from an HF CLIP ``config.json`` dict (ValueError naming a bad key)."""
    if hf.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(f"model_type={hf.get('model_type')!r} is not a CLIP config")
    t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
    eos = t.get("eos_token_id", 49407)
    if isinstance(eos, list):
        eos = eos[0]
    text = TextConfig(
        **_encoder_fields(t, "text_config"),
        vocab_size=int(t.get("vocab_size", 49408)),
        max_position_embeddings=int(t.get("max_position_embeddings", 77)),
        eos_token_id=int(eos),
        pooling="argmax" if eos == _LEGACY_EOS else "eos",
        pad_token_id=int(t.get("pad_token_id", 1) or 0),
    )
    vision = ViTConfig(
        **_encoder_fields(v, "vision_config"),
        image_size=int(v.get("image_size", 224)),
        patch_size=int(v.get("patch_size", 32)),
        num_channels=int(v.get("num_channels", 3)),
        patch_bias=False,
        pre_norm=True,
    )
    return CLIPConfig(
        vision=vision,
        text=text,
        projection_dim=int(hf.get("projection_dim", 512)),
        logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)),
    )


def _encoder_to_hf(cfg: EncoderConfig, where: str) -> dict[str, Any]:
    if cfg.moe_layer_ids:
        raise ValueError(
            f"{where} has MoE layers {cfg.moe_layer_ids}; transformers' CLIPModel has none. Export the "
            "dense parent, or save a moekit folder"
        )
    if cfg.mixer != "attention":
        raise ValueError(f"{where}.mixer={cfg.mixer!r}; transformers' CLIPModel has attention only")
    if cfg.activation not in _ACTS:
        raise ValueError(
            f"{where}.activation={cfg.activation!r} has no CLIP hidden_act; use gelu or quick_gelu"
        )
    return {
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_dim,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.initializer_range,
    }


def clip_config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of a dense CLIP-MoE (ValueError naming what CLIP cannot express)."""
    v, t = cfg.vision, cfg.text
    if v.patch_bias or not v.pre_norm:
        raise ValueError("CLIPConfig.vision: CLIP needs patch_bias=False and pre_norm=True")
    if (t.pooling == "argmax") != (t.eos_token_id == _LEGACY_EOS):
        raise ValueError(
            f"TextConfig: pooling={t.pooling!r} with eos_token_id={t.eos_token_id}: transformers pools by "
            f"argmax exactly when eos_token_id == {_LEGACY_EOS}; change eos_token_id or pooling"
        )
    text = {
        **_encoder_to_hf(t, "CLIPConfig.text"),
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "bos_token_id": None,  # moekit does not use one; transformers' default is outside small vocabularies
        "projection_dim": cfg.projection_dim,
    }
    vision = {
        **_encoder_to_hf(v, "CLIPConfig.vision"),
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "projection_dim": cfg.projection_dim,
    }
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "text_config": {"model_type": "clip_text_model", **text},
        "vision_config": {"model_type": "clip_vision_model", **vision},
    }


def _layer_targets(ours: str, theirs: str, num_layers: int) -> list[Target]:
    parts = {
        "ln1": "layer_norm1",
        "ln2": "layer_norm2",
        "self_attn.q_proj": "self_attn.q_proj",
        "self_attn.k_proj": "self_attn.k_proj",
        "self_attn.v_proj": "self_attn.v_proj",
        "self_attn.o_proj": "self_attn.out_proj",
        "mlp.w_in": "mlp.fc1",
        "mlp.w_out": "mlp.fc2",
    }
    out = []
    for i in range(num_layers):
        for mine, hf in parts.items():
            for p in ("weight", "bias"):
                out.append(Target.copy(f"{ours}.layers.{i}.{mine}.{p}", f"{theirs}.layers.{i}.{hf}.{p}"))
    return out


def clip_targets(cfg: CLIPConfig) -> list[Target]:
    """Where every moekit tensor of a dense CLIP-MoE lives in an HF ``CLIPModel`` checkpoint."""
    targets = [
        Target.copy("vision.patch_embed.weight", "vision_model.embeddings.patch_embedding.weight"),
        Target.copy("vision.cls_token", "vision_model.embeddings.class_embedding"),
        Target.copy("vision.pos_embed.weight", "vision_model.embeddings.position_embedding.weight"),
        Target.copy("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
        Target.copy("text.pos_embed.weight", "text_model.embeddings.position_embedding.weight"),
        Target.copy("visual_projection.weight", "visual_projection.weight"),
        Target.copy("text_projection.weight", "text_projection.weight"),
        Target.copy("logit_scale", "logit_scale"),
    ]
    for p in ("weight", "bias"):
        targets.append(Target.copy(f"vision.pre_norm.{p}", f"vision_model.pre_layrnorm.{p}"))
        targets.append(Target.copy(f"vision.norm.{p}", f"vision_model.post_layernorm.{p}"))
        targets.append(Target.copy(f"text.final_norm.{p}", f"text_model.final_layer_norm.{p}"))
    targets += _layer_targets("vision.encoder", "vision_model.encoder", cfg.vision.num_layers)
    targets += _layer_targets("text.encoder", "text_model.encoder", cfg.text.num_layers)
    return targets


def load_dual_encoder_hf(path: str | Path, dtype, config_from_hf, model_cls, targets_fn, family: str):
    """Imports a transformers dual-encoder folder (CLIP, SigLIP) as a dense moekit model (eval).

    ``config_from_hf(hf_dict)`` gives the moekit config, ``targets_fn(config)`` every moekit
    tensor's source; a moekit tensor without one is a ValueError naming ``family``.
    """
    folder = Path(path)
    hf = json.loads((folder / "config.json").read_text())
    try:
        config = config_from_hf(hf)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / 'config.json'}: {err}") from None
    mapping = weight_map(folder)
    with torch.device("meta"):
        model = model_cls(config)
    materialize(model, dtype or checkpoint_dtype(mapping))
    state = model.state_dict()
    targets = targets_fn(config)
    unmapped = sorted(set(state) - {t.name for t in targets})
    if unmapped:
        raise ValueError(f"{family} adapter does not map moekit tensor(s) {unmapped[:5]}")
    load_into(state, targets, mapping)
    model.eval()
    return model


def load_clip_hf(path: str | Path, dtype: torch.dtype | None = None) -> CLIPMoE:
    """Imports a transformers ``CLIPModel`` folder as a dense :class:`CLIPMoE` (eval mode).

    Args:
        path: the folder (``config.json`` + safetensors; pickles are refused).
        dtype: run dtype; None keeps the checkpoint's.
    """
    return load_dual_encoder_hf(path, dtype, clip_config_from_hf, CLIPMoE, clip_targets, "clip")


def save_clip_hf(model: CLIPMoE, path: str | Path) -> Path:
    """Writes a dense :class:`CLIPMoE` as a folder ``transformers.CLIPModel.from_pretrained`` loads."""
    hf = clip_config_to_hf(model.config)
    hf["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}.get(
        next(model.parameters()).dtype, "float32"
    )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(hf_tensors(model.state_dict(), clip_targets(model.config)), folder, 5 * 1024**3)
    text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))
    return folder
