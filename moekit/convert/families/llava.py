"""transformers ``LlavaForConditionalGeneration`` folders <-> moekit :class:`~moekit.models.vision.llava.MoELLaVA`.

The vision tower is a CLIP vision model (``moekit.convert.families.clip`` maps its tensors), the
projector LLaVA's two linears, and the text model any family ``moekit.convert`` exports (a MoE
one such as Mixtral or Qwen3-MoE after MoE-LLaVA's stage 3). HF tensor names live only here and
in the family adapters: the LM's keys get the ``language_model.`` prefix LLaVA saves them under.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moekit.convert import config_from_hf, hf_config_for
from moekit.convert.checkpoint import checkpoint_dtype, hf_tensors, load_into, weight_map, write_shards
from moekit.convert.families import get_family
from moekit.convert.families.base import Piece, Target
from moekit.convert.families.clip import _encoder_fields, _encoder_to_hf, _layer_targets
from moekit.models.io import atomic_write, materialize
from moekit.models.vision.config import ViTConfig
from moekit.models.vision.llava import MoELLaVA, VLMConfig

HF_MODEL_TYPES = ("llava",)
_LM = "language_model."


def vlm_config_from_hf(hf: dict[str, Any]) -> VLMConfig:
    """A :class:`VLMConfig` from an HF LLaVA ``config.json`` dict (ValueError naming a bad key)."""
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(
            f"vision_config.model_type={v.get('model_type')!r}: moekit imports CLIP vision towers"
        )
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(
            f"projector_hidden_act={hf.get('projector_hidden_act')!r}: moekit's projector uses gelu"
        )
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: moekit takes one layer index")
    vision = ViTConfig(
        **_encoder_fields(v, "vision_config"),
        image_size=int(v.get("image_size", 224)),
        patch_size=int(v.get("patch_size", 32)),
        num_channels=int(v.get("num_channels", 3)),
        patch_bias=False,
        pre_norm=True,
    )
    text = config_from_hf(t)
    return VLMConfig(
        vision=vision,
        text=text,
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
        vision_feature_layer=layer,
        vision_feature_select_strategy=str(hf.get("vision_feature_select_strategy", "default")),
        projector_bias=bool(hf.get("multimodal_projector_bias", True)),
    )


def _targets(cfg: VLMConfig, text_type: str) -> list[Target]:
    out = [
        Target.copy("vision_tower.patch_embed.weight", "vision_tower.embeddings.patch_embedding.weight"),
        Target.copy("vision_tower.cls_token", "vision_tower.embeddings.class_embedding"),
        Target.copy("vision_tower.pos_embed.weight", "vision_tower.embeddings.position_embedding.weight"),
    ]
    for p in ("weight", "bias"):
        out.append(Target.copy(f"vision_tower.pre_norm.{p}", f"vision_tower.pre_layrnorm.{p}"))
        out.append(Target.copy(f"vision_tower.norm.{p}", f"vision_tower.post_layernorm.{p}"))
    out += _layer_targets("vision_tower.encoder", "vision_tower.encoder", cfg.vision.num_layers)
    for lin in ("linear_1", "linear_2"):
        for p in ("weight", "bias") if cfg.projector_bias else ("weight",):
            out.append(Target.copy(f"projector.{lin}.{p}", f"multi_modal_projector.{lin}.{p}"))
    for t in get_family(text_type).targets(cfg.text):
        layouts = [[Piece(_LM + pc.key, pc.index) for pc in lay] for lay in t.layouts]
        out.append(Target("language_model." + t.name, layouts))
    return out


def load_llava_hf(path: str | Path, dtype: torch.dtype | None = None) -> MoELLaVA:
    """Imports a transformers LLaVA folder as a :class:`MoELLaVA` (eval mode)."""
    folder = Path(path)
    hf = json.loads((folder / "config.json").read_text())
    try:
        config = vlm_config_from_hf(hf)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / 'config.json'}: {err}") from None
    mapping = weight_map(folder)
    with torch.device("meta"):
        model = MoELLaVA(config)
    materialize(model, dtype or checkpoint_dtype(mapping))
    state = model.state_dict()
    skip = set(model.tied_weight_names())
    targets = [t for t in _targets(config, str(hf["text_config"]["model_type"])) if t.name not in skip]
    unmapped = sorted(set(state) - skip - {t.name for t in targets})
    if unmapped:
        raise ValueError(f"llava adapter does not map moekit tensor(s) {unmapped[:5]}")
    load_into(state, targets, mapping)
    return model.eval()


def save_llava_hf(model: MoELLaVA, path: str | Path, family: str | None = None) -> Path:
    """Writes a :class:`MoELLaVA` as a folder ``transformers.LlavaForConditionalGeneration`` loads.

    ``family`` is the text model's HF ``model_type`` (None: chosen from its config, e.g. Mixtral or
    Qwen3-MoE for an upcycled LM). Raises ValueError naming what LLaVA cannot express.
    """
    cfg = model.config
    if cfg.vision.patch_bias or not cfg.vision.pre_norm:
        raise ValueError("VLMConfig.vision: a CLIP vision tower needs patch_bias=False and pre_norm=True")
    adapter, text = hf_config_for(model.language_model, family)
    vision = {
        **_encoder_to_hf(cfg.vision, "VLMConfig.vision"),
        "model_type": "clip_vision_model",
        "image_size": cfg.vision.image_size,
        "patch_size": cfg.vision.patch_size,
        "num_channels": cfg.vision.num_channels,
    }
    hf = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": vision,
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_seq_length,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": bool(cfg.text.tie_word_embeddings),
        "dtype": text.get("dtype", "float32"),
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    skip = set(model.tied_weight_names())
    targets = [t for t in _targets(cfg, adapter.model_type) if t.name not in skip]
    write_shards(hf_tensors(model.state_dict(), targets), folder, 5 * 1024**3)
    text_json = json.dumps(hf, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text_json))
    return folder
