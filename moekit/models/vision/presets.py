"""Named vision configs, sized to train in a minute or two on two CPU cores.

``vit-digits``: 8x8 digits, 2x2 patches, 4 layers, MoE (4 experts, top-2) in every other layer.
``clip-shapes``: 16x16 scenes and their captions, 2-layer towers, MoE in every other layer of both.
``multitask-shapes``: task-level MoE (8 experts, top-2, task-embedding router, each task limited
to its 3 best experts) on the shape, colour and count tasks. A ``-dense`` suffix gives the same model without MoE (``moe=None``).
``vit-digits-mamba``: ``vit-digits`` with Vision Mamba mixers (``mixer="bimamba"``: a forward and a
backward scan over the patches, ``expand=1``, ``state_dim=8``) instead of attention.
"""

from __future__ import annotations

from moekit.blocks.ssm import MambaConfig
from moekit.config import JsonConfig
from moekit.data.images import CAPTION_LEN, EOS_ID, VOCAB_SIZE
from moekit.layers import MoEConfig
from moekit.models.vision.config import CLIPConfig, TextConfig, ViTConfig


def _moe(dim: int, ffn: int, num_experts: int = 4, num_tasks: int = 0, budget: int = 0) -> MoEConfig:
    return MoEConfig(
        dim=dim, ffn_dim=ffn, num_experts=num_experts, top_k=2, activation="gelu", ffn_bias=True,
        num_tasks=num_tasks, task_num_experts=budget,
    )  # fmt: skip


def _vit_digits() -> ViTConfig:
    return ViTConfig(
        dim=48, num_layers=4, num_heads=4, ffn_dim=96, image_size=8, patch_size=2, num_channels=1,
        num_classes=10, moe=_moe(48, 96), moe_placement="every_other",
    )  # fmt: skip


def _vit_digits_mamba() -> ViTConfig:
    return _vit_digits().replace(mixer="bimamba", mamba=MambaConfig(dim=48, expand=1, state_dim=8))


def _clip_shapes() -> CLIPConfig:
    vision = ViTConfig(
        dim=48, num_layers=2, num_heads=4, ffn_dim=96, image_size=16, patch_size=4, num_channels=3,
        patch_bias=False, pre_norm=True, moe=_moe(48, 96), moe_placement="every_other",
    )  # fmt: skip
    text = TextConfig(
        dim=48, num_layers=2, num_heads=4, ffn_dim=96, vocab_size=VOCAB_SIZE,
        max_position_embeddings=CAPTION_LEN, eos_token_id=EOS_ID, moe=_moe(48, 96), moe_placement="every_other",
    )  # fmt: skip
    return CLIPConfig(vision=vision, text=text, projection_dim=32)


def _multitask_shapes() -> ViTConfig:
    return ViTConfig(
        dim=48, num_layers=4, num_heads=4, ffn_dim=96, image_size=16, patch_size=4, num_channels=3,
        task_num_classes=(3, 3, 3), moe=_moe(48, 96, num_experts=8, num_tasks=3, budget=3), moe_placement="every_other",
    )  # fmt: skip


_PRESETS = {
    "vit-digits": _vit_digits,
    "vit-digits-mamba": _vit_digits_mamba,
    "clip-shapes": _clip_shapes,
    "multitask-shapes": _multitask_shapes,
}
TASK_PRESETS = {"vit": "vit-digits", "clip": "clip-shapes", "multitask": "multitask-shapes"}


def list_vision_presets() -> list[str]:
    """Every preset name, MoE and dense."""
    return sorted(list(_PRESETS) + [f"{n}-dense" for n in _PRESETS])


def vision_preset(name: str) -> JsonConfig:
    """The config called ``name`` (ValueError listing the presets otherwise)."""
    dense = name.endswith("-dense")
    base = name[: -len("-dense")] if dense else name
    if base not in _PRESETS:
        raise ValueError(f"unknown vision preset {name!r}; choose one of {list_vision_presets()}")
    cfg = _PRESETS[base]()
    if not dense:
        return cfg
    if isinstance(cfg, CLIPConfig):
        return cfg.replace(vision=cfg.vision.replace(moe=None), text=cfg.text.replace(moe=None))
    return cfg.replace(moe=None)
