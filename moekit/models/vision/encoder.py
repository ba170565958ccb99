"""The transformer encoder both vision towers share: pre-norm layers with dense or MoE FFNs.

Shape legend: B = batch, S = tokens (patches + CLS, or text), D = width, T = B * S.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.blocks import BidirectionalMamba, MambaMixer, SelfAttention
from moekit.layers import FeedForward, FFNConfig, MoELayer, RoutingInfo
from moekit.layers.experts import BiasedExpertWeights, StackedExpertWeights
from moekit.layers.moe import AuxLosses
from moekit.models.param_groups import module_param_names, moe_parameter_groups
from moekit.models.vision.config import EncoderConfig


class EncoderLayer(nn.Module):
    """``h = x + mixer(ln1(x))``, ``out = h + mlp(ln2(h))``; ``mlp`` is a biased FFN or an MoE layer.

    Submodules: ``ln1``, the mixer (``self_attn``, a :class:`~moekit.blocks.SelfAttention`, or
    ``mamba``, a :class:`~moekit.blocks.BidirectionalMamba`, as ``config.mixer`` says), ``ln2``, ``mlp``.
    """

    def __init__(self, config: EncoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ln1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        if config.mixer == "bimamba":
            self.mamba = BidirectionalMamba(config.mamba)
        else:
            self.self_attn = SelfAttention(config.dim, config.num_heads, bias=True)
        self.ln2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        if self.is_moe:
            self.mlp: nn.Module = MoELayer(config.moe_config(layer_idx))
        else:
            ffn = FFNConfig(dim=config.dim, ffn_dim=config.ffn_dim, activation=config.activation, bias=True)
            self.mlp = FeedForward(ffn)

    def forward(
        self,
        x_BSD: Tensor,
        key_mask_BS: Tensor | None,
        causal: bool,
        task_ids: Tensor | None,
        moe_k: int | None,
    ):
        """Returns ``(x_BSD, MoEOutput | None)``."""
        h_BSD = x_BSD + self.mix(self.ln1(x_BSD), key_mask_BS, causal)
        normed = self.ln2(h_BSD)
        if not self.is_moe:
            return h_BSD + self.mlp(normed), None
        token_mask = None if key_mask_BS is None else key_mask_BS.to(torch.bool)
        tasks = None
        if task_ids is not None and self.mlp.config.num_tasks:
            tasks = task_ids
        out = self.mlp(normed, token_mask=token_mask, k=moe_k, task_ids=tasks)
        return h_BSD + out.hidden, out

    def mix(self, x_BSD: Tensor, key_mask_BS: Tensor | None, causal: bool) -> Tensor:
        """The token mixer on normed states: ``[B, S, D] -> [B, S, D]``."""
        if hasattr(self, "self_attn"):
            return self.self_attn(x_BSD, key_mask_BS, causal)
        if causal:
            raise ValueError("a bidirectional Mamba encoder cannot run causally; use mixer='attention'")
        return self.mamba(x_BSD, key_mask_BS)

    @property
    def token_mixer(self) -> nn.Module:
        """``self_attn`` or ``mamba``, whichever this layer has."""
        return self.self_attn if hasattr(self, "self_attn") else self.mamba


@dataclass
class EncoderOutput:
    """What :class:`Encoder` returns.

    Attributes:
        hidden: ``[B, S, D]`` last hidden states (before any final norm).
        routing: one :class:`~moekit.layers.RoutingInfo` per MoE layer, in order.
        aux_losses: unweighted aux losses averaged over MoE layers (lazy), empty when dense.
    """

    hidden: Tensor
    routing: list[RoutingInfo] = field(default_factory=list)
    aux_losses: Mapping[str, Tensor] = field(default_factory=dict)


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` (``layers``) built from an :class:`EncoderConfig`."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_layers))

    def forward(
        self,
        x_BSD: Tensor,
        key_mask_BS: Tensor | None = None,
        causal: bool = False,
        task_ids: Tensor | None = None,
        moe_k: int | None = None,
        num_layers: int | None = None,
    ) -> EncoderOutput:
        """Runs the first ``num_layers`` layers (all for None); ``task_ids`` (int64 scalar)
        conditions task-level routers."""
        routing, layer_aux = [], []
        for layer in self.layers[:num_layers]:
            x_BSD, out = layer(x_BSD, key_mask_BS, causal, task_ids, moe_k)
            if out is not None:
                routing.append(out.routing)
                layer_aux.append(out.aux_losses)
        return EncoderOutput(x_BSD, routing, mean_aux_losses(layer_aux))


def mean_aux_losses(layer_aux: list[Mapping[str, Tensor]]) -> Mapping[str, Tensor]:
    """Per-layer aux losses averaged over layers, lazily (unread losses are never computed)."""
    if not layer_aux:
        return {}

    def mean_of(name: str):
        return lambda: torch.stack([aux[name].float() for aux in layer_aux]).mean()

    return AuxLosses({name: mean_of(name) for name in layer_aux[0]})


def merge_aux_losses(*parts: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The mean of several towers' aux losses, lazily (a tower without MoE contributes nothing)."""
    parts = tuple(p for p in parts if p)
    if len(parts) <= 1:
        return parts[0] if parts else {}

    def mean_of(name: str):
        return lambda: torch.stack([p[name].float() for p in parts if name in p]).mean()

    return AuxLosses({name: mean_of(name) for name in parts[0]})


@torch.no_grad()
def init_encoder_weights(root: nn.Module, std: float, num_layers: int) -> None:
    """Normal(0, std) linears/embeddings/experts, zero biases, unit LayerNorms; residual-stream
    outputs (``o_proj``, FFN/expert ``w_out``) scaled by ``1 / sqrt(2 L)`` (GPT-2); routers N(0, std);
    task logits N(0, 1), so each task starts with its own expert preference (M3ViT's task embedding)."""
    out_std = std / math.sqrt(2 * max(num_layers, 1))
    for name, module in root.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=out_std if name.endswith(("o_proj", "w_out")) else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, StackedExpertWeights):
            nn.init.normal_(module.w_in, std=std)
            nn.init.normal_(module.w_out, std=out_std)
            if isinstance(module, BiasedExpertWeights):
                nn.init.zeros_(module.b_in)
                nn.init.zeros_(module.b_out)
        elif isinstance(module, MoELayer):
            router = module.router
            if router.weight.requires_grad:
                nn.init.normal_(router.weight, std=std)
            if router.task_logits is not None:
                nn.init.normal_(router.task_logits, std=1.0)
            if router.task_weight is not None:
                nn.init.normal_(router.task_weight, std=std)
    # A second pass: the loop above visits a mixer's Linears after the mixer itself.
    for module in root.modules():
        if isinstance(module, MambaMixer):
            nn.init.normal_(module.out_proj.weight, std=out_std)
            module.reset_ssm_parameters()


def encoder_groups(model: nn.Module, encoders: dict[str, Encoder]) -> dict[str, list[str]]:
    """The shared parameter groups plus ``attention`` (the token mixers, Mamba ones included) and
    ``dense_ffn`` of the given encoders (prefix -> encoder, prefixes as in ``model.named_parameters()``)."""
    groups = moe_parameter_groups(model)
    groups["attention"], groups["dense_ffn"] = [], []
    for prefix, enc in encoders.items():
        for i, layer in enumerate(enc.layers):
            mixer = "self_attn" if hasattr(layer, "self_attn") else "mamba"
            groups["attention"] += module_param_names(layer.token_mixer, f"{prefix}.layers.{i}.{mixer}")
            if not layer.is_moe:
                groups["dense_ffn"] += module_param_names(layer.mlp, f"{prefix}.layers.{i}.mlp")
    return groups
