"""ViT with dense or MoE FFNs, a classification head or per-task heads (task-level MoE, M3ViT).

Shape legend: B = batch, C = channels, H = W = image side, P = patches, S = P + 1 (CLS first),
D = width, N = classes.
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
from moekit.models.vision.config import ViTConfig
from moekit.models.vision.encoder import (
    Encoder,
    encoder_groups,
    init_encoder_weights,
)


@dataclass
class ViTOutput:
    """What :meth:`ViTMoE.forward` returns.

    Attributes:
        logits: ``[B, N]`` class logits of the chosen task's head (None without a head).
        pooled: ``[B, D]`` the normed CLS state.
        hidden: ``[B, S, D]`` last hidden states (CLS first), before the final norm.
        loss: scalar cross-entropy with ``labels`` (no aux), or None.
        aux_losses: unweighted aux losses averaged over MoE layers.
        routing: one :class:`~moekit.layers.RoutingInfo` per MoE layer.
    """

    logits: Tensor | None
    pooled: Tensor
    hidden: Tensor
    loss: Tensor | None = None
    aux_losses: Mapping[str, Tensor] = field(default_factory=dict)
    routing: list[RoutingInfo] = field(default_factory=list)


class ViTMoE(nn.Module):
    """Vision transformer whose FFNs are dense or MoE per the config's placement rule.

    Submodules: ``patch_embed`` (``Conv2d(C, D, patch, stride=patch)``), ``cls_token`` ``[D]``,
    ``pos_embed`` (``Embedding(P + 1, D)``), ``pre_norm`` (CLIP's, optional), ``encoder``,
    ``norm`` (on the CLS state), ``head`` (``Linear(D, N)``, when ``num_classes``) or ``heads``
    (one per task, when ``task_num_classes``).

    Attributes:
        config: the :class:`ViTConfig`.
        task_names: optional names of the tasks (data modules set them; not saved).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.task_names: list[str] | None = None
        d = config.dim
        self.patch_embed = nn.Conv2d(
            config.num_channels, d, config.patch_size, stride=config.patch_size, bias=config.patch_bias
        )
        self.cls_token = nn.Parameter(torch.zeros(d))
        self.pos_embed = nn.Embedding(config.num_patches + 1, d)
        self.pre_norm = nn.LayerNorm(d, eps=config.norm_eps) if config.pre_norm else None
        self.encoder = Encoder(config)
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.head = nn.Linear(d, config.num_classes) if config.num_classes else None
        self.heads = (
            nn.ModuleList(nn.Linear(d, n) for n in config.task_num_classes)
            if config.task_num_classes
            else None
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Every weight (see :func:`~moekit.models.vision.encoder.init_encoder_weights`)."""
        init_encoder_weights(self, self.config.initializer_range, self.config.num_layers)
        with torch.no_grad():
            nn.init.normal_(self.cls_token, std=self.config.initializer_range)

    def tied_weight_names(self) -> list[str]:
        """No tied weights."""
        return []

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs in layer order (what ``routing`` aligns with)."""
        return [layer.mlp for layer in self.encoder.layers if layer.is_moe]

    def parameter_groups(self) -> dict[str, list[str]]:
        """``router``, ``experts``, ``shared``, ``norms``, ``attention``, ``dense_ffn``,
        ``embeddings`` (patch, CLS, positions), ``heads`` and the complements (``--freeze`` groups)."""
        groups = encoder_groups(self, {"encoder": self.encoder})
        groups["embeddings"] = (
            module_param_names(self.patch_embed, "patch_embed")
            + ["cls_token"]
            + module_param_names(self.pos_embed, "pos_embed")
        )
        groups["heads"] = module_param_names(self.head, "head") + module_param_names(self.heads, "heads")
        return groups

    def check_pixels(self, pixel_values: Tensor) -> None:
        """ValueError (one line) unless ``pixel_values`` is ``[B, C, H, W]`` with this model's C, H, W."""
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, this model expects [B, {want[0]}, "
                f"{want[1]}, {want[2]}]; preprocess images with moekit.data.images.preprocess_images"
            )

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Patch + CLS + position embeddings (then ``pre_norm``): ``[B, C, H, W] -> [B, S, D]``."""
        x_BPD = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls_B1D = self.cls_token.to(x_BPD.dtype).expand(x_BPD.shape[0], 1, -1)
        x_BSD = torch.cat([cls_B1D, x_BPD], dim=1) + self.pos_embed.weight.to(x_BPD.dtype)
        return x_BSD if self.pre_norm is None else self.pre_norm(x_BSD)

    def hidden_state(self, pixel_values: Tensor, layer: int = -1, moe_k: int | None = None):
        """transformers' ``hidden_states[layer]``: index 0 is the embeddings, i the output of layer i
        (negative counts from the end, -1 = the last layer, before the final norm). Returns the
        :class:`~moekit.models.vision.encoder.EncoderOutput` of the layers that ran."""
        self.check_pixels(pixel_values)
        num = self.config.num_layers
        upto = layer if layer >= 0 else num + 1 + layer
        if not 0 <= upto <= num:
            raise ValueError(f"vision feature layer {layer} is outside [-{num + 1}, {num}]")
        return self.encoder(self.embed(pixel_values), None, False, None, moe_k, num_layers=upto)

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        task: int | None = None,
        moe_k: int | None = None,
    ) -> ViTOutput:
        """Classifies a batch of images (one task per call).

        Args:
            pixel_values: ``[B, C, H, W]`` preprocessed images.
            labels: int64 ``[B]`` class ids for ``loss``.
            task: which task's routing and head (required with per-task heads; M3ViT runs one
                task per batch).
            moe_k: experts per token for every MoE layer in this call.
        """
        cfg = self.config
        self.check_pixels(pixel_values)
        if self.heads is not None and task is None:
            raise ValueError(f"this ViT has {len(self.heads)} task heads; pass task=0..{len(self.heads) - 1}")
        if task is not None and not 0 <= task < cfg.num_tasks:
            raise ValueError(f"task={task} is outside [0, {cfg.num_tasks})")
        x_BSD = self.embed(pixel_values)
        task_ids = None if task is None else torch.tensor(task, device=x_BSD.device)
        enc = self.encoder(x_BSD, None, False, task_ids, moe_k)
        pooled_BD = self.norm(enc.hidden[:, 0])
        logits = None
        if self.head is not None:
            logits = self.head(pooled_BD)
        elif self.heads is not None:
            logits = self.heads[task](pooled_BD)
        loss = None
        if labels is not None and logits is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return ViTOutput(logits, pooled_BD, enc.hidden, loss, enc.aux_losses, enc.routing)

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; with ``active_only`` each MoE layer's experts count ``k / E``."""
        frac = {}
        if active_only:
            for mlp in self.moe_layers:
                for p in mlp.experts.routed_parameters():
                    frac[id(p)] = mlp.config.top_k / mlp.config.num_total_experts
        return round(sum(p.numel() * frac.get(id(p), 1.0) for p in self.parameters()))

    def save_pretrained(self, path: str | Path, format: str = "moekit") -> None:
        """Writes ``config.json`` + ``model.safetensors`` (:mod:`moekit.models.io`)."""
        from moekit.models.io import save_pretrained

        save_pretrained(self, path, format=format)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> ViTMoE:
        """Loads a folder written by :meth:`save_pretrained`."""
        from moekit.models.io import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)
