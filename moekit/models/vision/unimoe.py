"""Uni-MoE's model: one encoder and one connector per modality (images through a ViT, 1-D signals
through a small patch encoder) feeding a moekit LM whose FFNs become LoRA-expert MoE layers.

Shape legend: B = texts, S = text length, N = items of one modality in the batch, P = features
per item, L = signal length, p = signal patch length, Dv/Ds = encoder widths, D = LM width.

Each modality has its placeholder token; the k-th run of P placeholders gets item k's projected
features (:func:`~moekit.models.vision.llava.splice_image_features`, used once per modality).
The progressive recipe's freezes are :data:`UNIMOE_STAGE_FREEZE`; the recipe itself (upcycling
to LoRA experts, the three stages through ``fit``) is :mod:`moekit.surgery.unimoe`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn

from moekit.config import JsonConfig
from moekit.models.config import ModelConfig
from moekit.models.decoder import CausalLMOutput, MoEForCausalLM
from moekit.models.param_groups import module_param_names, moe_parameter_groups
from moekit.models.vision.config import EncoderConfig, ViTConfig
from moekit.models.vision.encoder import Encoder, init_encoder_weights
from moekit.models.vision.llava import MultiModalProjector, splice_image_features
from moekit.models.vision.vit import ViTMoE


@dataclass(kw_only=True)
class SignalEncoderConfig(EncoderConfig):
    """A 1-D signal encoder: non-overlapping patches of ``patch_len`` samples, a linear patch
    embedding, learned positions, the shared transformer encoder and a final LayerNorm.

    Attributes:
        length: L, samples per signal (``patch_len`` divides it).
        patch_len: p.
    """

    length: int = 32
    patch_len: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.length <= 0 or self.patch_len <= 0 or self.length % self.patch_len:
            raise ValueError(
                f"SignalEncoderConfig.patch_len={self.patch_len} must be positive and divide length={self.length}"
            )

    @property
    def num_patches(self) -> int:
        """P = L / p."""
        return self.length // self.patch_len


class SignalEncoder(nn.Module):
    """``[N, L] -> [N, P, Ds]``: patches, linear embedding + positions, encoder, LayerNorm."""

    def __init__(self, config: SignalEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_len, config.dim)
        self.pos_embed = nn.Embedding(config.num_patches, config.dim)
        self.encoder = Encoder(config)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        init_encoder_weights(self, config.initializer_range, config.num_layers)

    def forward(self, signal_values: Tensor) -> Tensor:
        """Encodes signals ``[N, L]``; ValueError (one line) for another length."""
        cfg = self.config
        if signal_values.dim() != 2 or signal_values.shape[1] != cfg.length:
            raise ValueError(
                f"signal_values has shape {tuple(signal_values.shape)}, this model expects [N, {cfg.length}]"
            )
        x_NPp = signal_values.reshape(signal_values.shape[0], cfg.num_patches, cfg.patch_len)
        x_NPD = self.patch_embed(x_NPp.to(self.patch_embed.weight.dtype)) + self.pos_embed.weight
        return self.norm(self.encoder(x_NPD).hidden)


@dataclass(kw_only=True)
class UniMoEConfig(JsonConfig):
    """Uni-MoE: encoders and connectors per modality, and a moekit LM.

    Attributes:
        vision: the image tower (no head); its last layer's patch features (CLS dropped) are used.
        signal: the 1-D signal encoder.
        text: the LM (dense before upcycling; LoRA-expert MoE after).
        image_token_id, signal_token_id: the placeholders (inside the LM vocabulary, distinct).
    """

    vision: ViTConfig
    signal: SignalEncoderConfig
    text: ModelConfig
    image_token_id: int
    signal_token_id: int

    def __post_init__(self) -> None:
        for f in ("image_token_id", "signal_token_id"):
            if not 0 <= getattr(self, f) < self.text.vocab_size:
                raise ValueError(f"UniMoEConfig.{f}={getattr(self, f)} is outside the LM vocabulary")
        if self.image_token_id == self.signal_token_id:
            raise ValueError("UniMoEConfig.image_token_id and signal_token_id must differ")
        if self.vision.num_classes or self.vision.task_num_classes:
            raise ValueError("UniMoEConfig.vision must have no classification head")

    @property
    def num_placeholders(self) -> dict[str, int]:
        """P per modality: ``{"image": patches, "signal": signal patches}``."""
        return {"image": self.vision.num_patches, "signal": self.signal.num_patches}


class UniMoE(nn.Module):
    """Encoders, one connector per modality (LLaVA's ``mlp2x_gelu``) and a moekit LM.

    Submodules: ``vision_tower`` (:class:`ViTMoE`), ``signal_encoder`` (:class:`SignalEncoder`),
    ``connectors`` (``{"image", "signal"}`` :class:`MultiModalProjector` s), ``language_model``.
    """

    def __init__(self, config: UniMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = ViTMoE(config.vision)
        self.signal_encoder = SignalEncoder(config.signal)
        d = config.text.dim
        self.connectors = nn.ModuleDict(
            {
                "image": MultiModalProjector(config.vision.dim, d),
                "signal": MultiModalProjector(config.signal.dim, d),
            }
        )
        self.language_model = MoEForCausalLM(config.text)

    def save_pretrained(self, path, format: str = "moekit") -> None:
        """Writes ``config.json`` + ``model.safetensors`` (:mod:`moekit.models.io`)."""
        from moekit.models.io import save_pretrained

        save_pretrained(self, path, format=format)

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> UniMoE:
        """Loads a folder written by :meth:`save_pretrained`."""
        from moekit.models.io import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)

    def tied_weight_names(self) -> list[str]:
        """The LM's tied names, prefixed."""
        return [f"language_model.{n}" for n in self.language_model.tied_weight_names()]

    def parameter_groups(self) -> dict[str, list[str]]:
        """The MoE groups (``router``, ``experts``, ``lora_experts``, ...) plus ``vision_tower``,
        ``signal_encoder``, ``encoders`` (both), ``connectors``, ``language_model``."""
        groups = moe_parameter_groups(self)
        groups["vision_tower"] = module_param_names(self.vision_tower, "vision_tower")
        groups["signal_encoder"] = module_param_names(self.signal_encoder, "signal_encoder")
        groups["encoders"] = groups["vision_tower"] + groups["signal_encoder"]
        groups["connectors"] = module_param_names(self.connectors, "connectors")
        groups["language_model"] = module_param_names(self.language_model, "language_model")
        return groups

    def modality_features(
        self, pixel_values: Tensor | None, signal_values: Tensor | None
    ) -> dict[str, Tensor]:
        """``{"image": [N, P, D], "signal": [N, P, D]}`` for the modalities given."""
        feats = {}
        if pixel_values is not None:
            hidden = self.vision_tower.hidden_state(pixel_values, -1).hidden[:, 1:]
            feats["image"] = self.connectors["image"](self.vision_tower.norm(hidden))
        if signal_values is not None:
            feats["signal"] = self.connectors["signal"](self.signal_encoder(signal_values))
        return feats

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        signal_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        moe_k: int | None = None,
    ) -> CausalLMOutput:
        """HF-style: ``model(input_ids=..., pixel_values=..., signal_values=...)`` -> ``.logits [B, S, V]``."""
        embeds = self.language_model.embed_tokens(input_ids)
        feats = self.modality_features(pixel_values, signal_values)
        embeds = splice_image_features(embeds, input_ids, feats.get("image"), self.config.image_token_id)
        embeds = splice_image_features(embeds, input_ids, feats.get("signal"), self.config.signal_token_id)
        return self.language_model(
            input_ids, attention_mask=attention_mask, labels=labels, moe_k=moe_k, inputs_embeds=embeds
        )


# What each stage of the progressive recipe freezes (specs on UniMoE.parameter_groups()).
UNIMOE_STAGE_FREEZE: dict[int, list[str]] = {
    1: ["encoders", "language_model"],  # the connectors only (cross-modality alignment)
    # The routed experts only: LoRA adapters (their base is frozen by the layer itself), or full
    # experts in the "ffn" control; the shared expert holding the dense FFN stays frozen.
    2: ["encoders", "connectors", "re:^language_model\\.(?!layers\\.\\d+\\.mlp\\.experts\\.)"],
    3: ["encoders", "re:^language_model\\.(?!layers\\.\\d+\\.mlp\\.(router|experts)\\.)"],
}


def unimoe_stage_trainable(model: UniMoE, stage: int) -> list[str]:
    """The parameter names Uni-MoE's ``stage`` trains: 1 the connectors; 2 the LoRA experts (each
    on its own modality, see :mod:`moekit.surgery.unimoe`); 3 the LoRA experts, the routers and the
    connectors. Parameters the model itself freezes (the experts' shared base) never train."""
    if stage not in UNIMOE_STAGE_FREEZE:
        raise ValueError(f"Uni-MoE has stages 1, 2, 3; got {stage}")
    groups = model.parameter_groups()
    frozen: set[str] = set()
    named = dict(model.named_parameters())
    for spec in UNIMOE_STAGE_FREEZE[stage]:
        if spec.startswith("re:"):
            frozen |= {n for n in named if re.search(spec[3:], n)}
        else:
            frozen |= set(groups[spec])
    return [n for n, p in named.items() if n not in frozen and p.requires_grad]
