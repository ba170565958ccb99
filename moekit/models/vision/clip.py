"""CLIP-MoE: a ViT image tower and a causal text tower, each with dense or MoE FFNs, projected
into one space and compared by cosine similarity times a learned temperature.

Shape legend: B = images, A = texts, S = text length, D = tower width, J = projection width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers import MoELayer, RoutingInfo
from moekit.models.param_groups import module_param_names
from moekit.models.vision.config import CLIPConfig, TextConfig
from moekit.models.vision.encoder import (
    Encoder,
    encoder_groups,
    init_encoder_weights,
    merge_aux_losses,
)
from moekit.models.vision.vit import ViTMoE


def contrastive_loss(logits_per_image_BA: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE on a square ``[B, B]`` similarity matrix (pair i matches pair i):
    ``(CE(rows, arange) + CE(columns, arange)) / 2``, in float32 or wider."""
    logits = logits_per_image_BA.to(torch.promote_types(logits_per_image_BA.dtype, torch.float32))
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"contrastive_loss needs a square [B, B] matrix, got {tuple(logits.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class TextTower(nn.Module):
    """CLIP's text encoder: embeddings, causal encoder, ``final_norm``, pooled at the EOS token.

    Submodules: ``token_embed`` ``[V, D]``, ``pos_embed`` ``[max_positions, D]``, ``encoder``,
    ``final_norm``.
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_position_embeddings, config.dim)
        self.encoder = Encoder(config)
        self.final_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, moe_k: int | None = None):
        """``(pooled [A, D], EncoderOutput)`` for ``input_ids [A, S]`` (``attention_mask`` 1 = real)."""
        cfg = self.config
        num_a, seq = input_ids.shape
        if seq > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {seq} tokens; this text tower takes at most {cfg.max_position_embeddings}"
            )
        x = self.token_embed(input_ids) + self.pos_embed.weight[:seq]
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        enc = self.encoder(x, mask, True, None, moe_k)
        hidden = self.final_norm(enc.hidden)
        if cfg.pooling == "argmax":
            pos = input_ids.argmax(-1)
        else:
            pos = (input_ids == cfg.eos_token_id).int().argmax(-1)
        return hidden[torch.arange(num_a, device=hidden.device), pos], enc


@dataclass
class CLIPOutput:
    """What :meth:`CLIPMoE.forward` returns (transformers' names).

    Attributes:
        logits_per_image: ``[B, A]`` scaled cosine similarities (None unless both inputs given).
        logits_per_text: ``[A, B]``, its transpose.
        image_embeds: ``[B, J]`` normalised image embeddings (or None).
        text_embeds: ``[A, J]`` normalised text embeddings (or None).
        loss: the symmetric contrastive loss when ``return_loss`` (no aux), else None.
        aux_losses: unweighted aux losses, the mean of the towers' (each averaged over its MoE layers).
        routing: :class:`~moekit.layers.RoutingInfo` of every MoE layer, image tower first.
    """

    logits_per_image: Tensor | None
    logits_per_text: Tensor | None
    image_embeds: Tensor | None
    text_embeds: Tensor | None
    loss: Tensor | None = None
    aux_losses: Mapping[str, Tensor] = field(default_factory=dict)
    routing: list[RoutingInfo] = field(default_factory=list)


class CLIPMoE(nn.Module):
    """CLIP dual encoder with optional MoE FFNs in either tower.

    Submodules: ``vision`` (:class:`~moekit.models.vision.ViTMoE` without a head), ``text``
    (:class:`TextTower`), ``visual_projection`` ``[J, Dv]`` and ``text_projection`` ``[J, Dt]``
    (no bias), ``logit_scale`` (scalar, the log temperature).
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = ViTMoE(config.vision)
        self.text = TextTower(config.text)
        self.visual_projection = nn.Linear(config.vision.dim, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.dim, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.init_weights()

    def init_weights(self) -> None:
        """Both towers as :meth:`ViTMoE.init_weights`; the temperature at ``logit_scale_init``."""
        self.vision.init_weights()
        init_encoder_weights(self.text, self.config.text.initializer_range, self.config.text.num_layers)
        with torch.no_grad():
            nn.init.normal_(self.visual_projection.weight, std=self.config.vision.initializer_range)
            nn.init.normal_(self.text_projection.weight, std=self.config.text.initializer_range)
            self.logit_scale.fill_(self.config.logit_scale_init)

    def tied_weight_names(self) -> list[str]:
        """No tied weights."""
        return []

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs, image tower first (what ``routing`` aligns with)."""
        return self.vision.moe_layers + [layer.mlp for layer in self.text.encoder.layers if layer.is_moe]

    def parameter_groups(self) -> dict[str, list[str]]:
        """The MoE groups plus ``attention``, ``dense_ffn``, ``embeddings``, ``projections``
        (both projections and ``logit_scale``), ``vision_tower`` and ``text_tower``."""
        groups = encoder_groups(
            self, {"vision.encoder": self.vision.encoder, "text.encoder": self.text.encoder}
        )
        v, t = self.vision, self.text
        groups["embeddings"] = (
            module_param_names(v.patch_embed, "vision.patch_embed")
            + ["vision.cls_token"]
            + module_param_names(v.pos_embed, "vision.pos_embed")
            + module_param_names(t.token_embed, "text.token_embed")
            + module_param_names(t.pos_embed, "text.pos_embed")
        )
        groups["projections"] = ["visual_projection.weight", "text_projection.weight", "logit_scale"]
        groups["vision_tower"] = module_param_names(v, "vision")
        groups["text_tower"] = module_param_names(t, "text")
        return groups

    def get_image_features(self, pixel_values: Tensor, moe_k: int | None = None):
        """``(image embeddings [B, J] before normalising, the tower's ViTOutput)``."""
        out = self.vision(pixel_values, moe_k=moe_k)
        return self.visual_projection(out.pooled), out

    def get_text_features(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, moe_k: int | None = None
    ):
        """``(text embeddings [A, J] before normalising, the tower's EncoderOutput)``."""
        pooled, enc = self.text(input_ids, attention_mask, moe_k)
        return self.text_projection(pooled), enc

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        return_loss: bool = False,
        moe_k: int | None = None,
    ) -> CLIPOutput:
        """Embeds images and/or texts; with both, the similarity logits (transformers' CLIPModel).

        Args:
            input_ids: ``[A, S]`` token ids, each row holding its EOS token.
            pixel_values: ``[B, C, H, W]`` preprocessed images.
            attention_mask: ``[A, S]``, 1 for real tokens.
            return_loss: compute the symmetric contrastive loss (needs A == B, pair i = pair i).
            moe_k: experts per token in every MoE layer.
        """
        img = txt = None
        routing, aux = [], []
        if pixel_values is not None:
            img, vout = self.get_image_features(pixel_values, moe_k)
            img = img / img.norm(p=2, dim=-1, keepdim=True)
            routing += vout.routing
            aux.append(vout.aux_losses)
        if input_ids is not None:
            txt, tout = self.get_text_features(input_ids, attention_mask, moe_k)
            txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
            routing += tout.routing
            aux.append(tout.aux_losses)
        per_image = per_text = loss = None
        if img is not None and txt is not None:
            per_text = (txt @ img.t()) * self.logit_scale.exp().to(txt.dtype)
            per_image = per_text.t()
            if return_loss:
                loss = contrastive_loss(per_image)
        return CLIPOutput(per_image, per_text, img, txt, loss, merge_aux_losses(*aux), routing)

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; with ``active_only`` each MoE layer's experts count ``k / E``."""
        frac = {}
        if active_only:
            for mlp in self.moe_layers:
                for p in mlp.experts.routed_parameters():
                    frac[id(p)] = mlp.config.top_k / mlp.config.num_total_experts
        return round(sum(p.numel() * frac.get(id(p), 1.0) for p in self.parameters()))

    def save_pretrained(self, path: str | Path, format: str = "moekit") -> None:
        """Writes a moekit folder, or (``format="hf"``) a transformers ``CLIPModel`` folder."""
        from moekit.models.io import save_pretrained

        save_pretrained(self, path, format=format)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> CLIPMoE:
        """Loads a folder written by :meth:`save_pretrained`."""
        from moekit.models.io import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)
