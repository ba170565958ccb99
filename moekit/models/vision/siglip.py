"""SigLIP as a moekit dual encoder: a ViT tower without CLS, pooled by multihead attention
(MAP), and a bidirectional text tower pooled at its last position, compared by cosine similarity
times ``exp(logit_scale)`` plus ``logit_bias`` (trained with a sigmoid loss, not a softmax).

Shape legend: B = images, A = texts, S = text length, P = patches, D = tower width.

Both towers use the shared encoder (:mod:`moekit.models.vision.encoder`), so either can carry
MoE FFNs; transformers' ``SiglipModel`` folders import with :func:`moekit.convert.families.siglip.load_siglip_hf`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.config import JsonConfig
from moekit.layers import FeedForward, FFNConfig
from moekit.models.vision.config import EncoderConfig
from moekit.models.vision.encoder import Encoder, init_encoder_weights


@dataclass(kw_only=True)
class SigLIPVisionConfig(EncoderConfig):
    """SigLIP's image tower: patch embedding (with bias), learned positions, encoder, a final
    LayerNorm, and the MAP head (a learned probe attending over the patches, then an MLP)."""

    image_size: int = 16
    patch_size: int = 4
    num_channels: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.image_size, self.patch_size, self.num_channels) <= 0 or self.image_size % self.patch_size:
            raise ValueError(
                f"SigLIPVisionConfig.patch_size={self.patch_size} must divide image_size={self.image_size}"
            )

    @property
    def num_patches(self) -> int:
        """P."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(kw_only=True)
class SigLIPTextConfig(EncoderConfig):
    """SigLIP's text tower: embeddings, a bidirectional encoder, a final LayerNorm, the last
    position pooled and projected by ``head`` to ``projection_size``."""

    vocab_size: int = 64
    max_position_embeddings: int = 16
    projection_size: int = 32


def _default_vision() -> SigLIPVisionConfig:
    return SigLIPVisionConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, activation="gelu_tanh")


def _default_text() -> SigLIPTextConfig:
    return SigLIPTextConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, activation="gelu_tanh")


@dataclass(kw_only=True)
class SigLIPConfig(JsonConfig):
    """A SigLIP dual encoder. ``text.projection_size`` must equal ``vision.dim`` (the image
    embedding is the MAP head's output)."""

    vision: SigLIPVisionConfig = field(default_factory=_default_vision)
    text: SigLIPTextConfig = field(default_factory=_default_text)

    def __post_init__(self) -> None:
        if self.text.projection_size != self.vision.dim:
            raise ValueError(
                f"SigLIPConfig: text.projection_size={self.text.projection_size} must equal vision.dim="
                f"{self.vision.dim}"
            )


class MAPHead(nn.Module):
    """Multihead attention pooling: ``probe`` attends over ``[B, P, D]``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: SigLIPVisionConfig) -> None:
        super().__init__()
        d = config.dim
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.attention = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(d, eps=config.norm_eps)
        self.mlp = FeedForward(
            FFNConfig(dim=d, ffn_dim=config.ffn_dim, activation=config.activation, bias=True)
        )

    def forward(self, x_BPD: Tensor) -> Tensor:
        """``[B, P, D] -> [B, D]``."""
        probe = self.probe.to(x_BPD.dtype).expand(x_BPD.shape[0], 1, -1)
        h = self.attention(probe, x_BPD, x_BPD, need_weights=False)[0]
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class SigLIPVisionTower(nn.Module):
    """``pixel_values [B, C, H, W] -> (pooled [B, D], EncoderOutput)``."""

    def __init__(self, config: SigLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.dim, config.patch_size, stride=config.patch_size
        )
        self.pos_embed = nn.Embedding(config.num_patches, config.dim)
        self.encoder = Encoder(config)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = MAPHead(config)

    def forward(self, pixel_values: Tensor, moe_k: int | None = None):
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, this model expects [B, {want[0]}, {want[1]}, {want[2]}]"
            )
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        enc = self.encoder(x + self.pos_embed.weight, None, False, None, moe_k)
        return self.head(self.norm(enc.hidden)), enc


class SigLIPTextTower(nn.Module):
    """``input_ids [A, S] -> (pooled [A, projection_size], EncoderOutput)``: last position pooled."""

    def __init__(self, config: SigLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_position_embeddings, config.dim)
        self.encoder = Encoder(config)
        self.final_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.projection_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, moe_k: int | None = None):
        seq = input_ids.shape[1]
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {seq} tokens; this text tower takes at most {self.config.max_position_embeddings}"
            )
        x = self.token_embed(input_ids) + self.pos_embed.weight[:seq]
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        enc = self.encoder(x, mask, False, None, moe_k)
        # SigLIP pools the last position, padding or not (it is trained with max-length padding).
        return self.head(self.final_norm(enc.hidden)[:, -1]), enc


@dataclass
class SigLIPOutput:
    """``logits_per_image [B, A]``, ``logits_per_text [A, B]``, normalised embeddings."""

    logits_per_image: Tensor | None
    logits_per_text: Tensor | None
    image_embeds: Tensor | None
    text_embeds: Tensor | None


class SigLIPMoE(nn.Module):
    """SigLIP: ``vision`` (:class:`SigLIPVisionTower`), ``text`` (:class:`SigLIPTextTower`),
    ``logit_scale`` and ``logit_bias`` (scalars ``[1]``)."""

    def __init__(self, config: SigLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = SigLIPVisionTower(config.vision)
        self.text = SigLIPTextTower(config.text)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))
        init_encoder_weights(self, config.vision.initializer_range, config.vision.num_layers)

    def save_pretrained(self, path, format: str = "moekit") -> None:
        """Writes ``config.json`` + ``model.safetensors`` (:mod:`moekit.models.io`)."""
        from moekit.models.io import save_pretrained

        save_pretrained(self, path, format=format)

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> SigLIPMoE:
        """Loads a folder written by :meth:`save_pretrained`."""
        from moekit.models.io import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)

    def tied_weight_names(self) -> list[str]:
        """No tied weights."""
        return []

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> SigLIPOutput:
        """HF-style: ``model(input_ids=..., pixel_values=...)`` -> ``.logits_per_image [B, A]``."""
        img = txt = None
        if pixel_values is not None:
            img = self.vision(pixel_values)[0]
            img = img / img.norm(dim=-1, keepdim=True)
        if input_ids is not None:
            txt = self.text(input_ids, attention_mask)[0]
            txt = txt / txt.norm(dim=-1, keepdim=True)
        if img is None or txt is None:
            return SigLIPOutput(None, None, img, txt)
        per_text = txt @ img.t() * self.logit_scale.exp() + self.logit_bias
        return SigLIPOutput(per_text.t(), per_text, img, txt)
