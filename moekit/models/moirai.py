"""Moirai-MoE: a decoder-only patch forecaster with MoE FFNs and a mixture-distribution head.

Shape legend: B = series (rows), L = values per row, P = patch size, N = patches (tokens) per row
(``L = N * P``), D = model width, K = raw mixture parameters per value, S = sample paths,
H = forecast horizon.

Each row's values are cut into patches of P (left-padded to a multiple of P, padding unobserved).
A patch is embedded from its values and its observed mask (``[2P]``): ``Linear(SiLU(Linear(x))) +
Linear(x)`` as the released model's input block. Pre-norm layers of causal attention
(:mod:`moekit.blocks`, RoPE over patch index, per-head q/k norm) and an FFN that is an
:class:`~moekit.layers.MoELayer` (token-cluster gating ``router_type="centroid"`` or a learned
router) or dense. Token ``n`` predicts the distribution of every value of patch ``n + 1``: a
mixture (:mod:`moekit.models.moirai_dist`) trained by NLL. Values are per-series normalised
outside the model (:func:`moekit.timeseries.fit_scale`); the model works in normalised units.

Forecasting (:func:`sample_paths`) draws S sample paths: each step samples the next patch from
the last token's mixture, appends it as observed, and runs the model again (no KV cache, as the
released code), until H values exist. Quantiles come from the samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from moekit.blocks import (
    Attention,
    AttentionConfig,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
    build_attention_mask,
)
from moekit.config import JsonConfig, check_choice
from moekit.layers import FeedForward, FFNConfig, MoEConfig, MoELayer, RoutingInfo
from moekit.layers.experts import StackedExpertWeights
from moekit.models import moirai_dist as dist
from moekit.models.outputs import mean_aux_losses
from moekit.timeseries import fit_scale

SCALE_METHODS = ("std", "robust")


@dataclass(kw_only=True)
class MoiraiMoEConfig(JsonConfig):
    """A Moirai-MoE model.

    Attributes:
        patch_size: P, values per token (the released model: 16).
        dim: model width D.
        num_layers, num_heads, head_dim: the transformer (``num_heads * head_dim`` need not be D).
        ffn_dim: width of the dense FFN when ``moe`` is None (a dense twin: ``top_k * moe.ffn_dim``).
        moe: the MoE FFN of every layer, or None for a dense model. ``router_type="centroid"`` is
            token-cluster gating (fit its centroids with :func:`moekit.layers.fit_centroids`).
        max_patches: context tokens the forecaster keeps (the released model: 512).
        components: mixture components, from ``student_t``, ``normal``, ``laplace``.
        min_scale: lower bound added to every component scale (normalised units).
        scale_method: per-series normalisation, ``"std"`` or ``"robust"`` (median / MAD).
        rope_theta, norm_eps, initializer_range: as in the decoder LM.
        aux_loss_coef, z_loss_coef: recommended aux-loss weights (the released model trains with
            none: centroid routing has nothing to balance by gradient).
    """

    patch_size: int = 16
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 16
    ffn_dim: int = 256
    moe: MoEConfig | None = None
    max_patches: int = 64
    components: tuple[str, ...] = ("student_t", "normal", "laplace")
    min_scale: float = 1e-3
    scale_method: str = "std"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        name = "MoiraiMoEConfig"
        for f in ("patch_size", "dim", "num_layers", "num_heads", "head_dim", "ffn_dim", "max_patches"):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be at least 1, got {getattr(self, f)}")
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim must be even (RoPE), got {self.head_dim}")
        self.components = tuple(self.components)
        dist.check_components(name, self.components)
        check_choice(name, "scale_method", self.scale_method, SCALE_METHODS)
        if self.min_scale <= 0:
            raise ValueError(f"{name}.min_scale must be positive, got {self.min_scale}")
        if self.moe is not None and self.moe.dim != self.dim:
            raise ValueError(f"{name}.moe.dim={self.moe.dim} must equal dim={self.dim}")
        for f in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, f) < 0:
                raise ValueError(f"{name}.{f} must be >= 0, got {getattr(self, f)}")

    @property
    def context_length(self) -> int:
        """Values of context the forecaster keeps (``max_patches * patch_size``)."""
        return self.max_patches * self.patch_size

    @property
    def num_raw_params(self) -> int:
        """K: raw head outputs per predicted value."""
        return dist.num_raw_params(self.components)

    def dense_twin(self) -> MoiraiMoEConfig:
        """The dense model with this model's active FFN width (``top_k * moe.ffn_dim``)."""
        if self.moe is None:
            return self
        return self.replace(moe=None, ffn_dim=self.moe.top_k * self.moe.ffn_dim, aux_loss_coef=0.0)


def patchify(values_BL: Tensor, observed_BL: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
    """Left-pads rows to a multiple of P (padding unobserved, value 0) and cuts them into patches.

    Returns ``(x_BNP, observed_BNP)``; unobserved values are zeroed.
    """
    num_l = values_BL.shape[-1]
    pad = (-num_l) % patch_size
    observed_BL = observed_BL.to(torch.bool)
    values_BL = torch.where(observed_BL, values_BL, 0.0)
    if pad:
        values_BL = nn.functional.pad(values_BL, (pad, 0))
        observed_BL = nn.functional.pad(observed_BL, (pad, 0), value=False)
    b = values_BL.shape[0]
    return values_BL.view(b, -1, patch_size), observed_BL.view(b, -1, patch_size)


def unpatchify(x_BNP: Tensor, length: int | None = None) -> Tensor:
    """``[B, N, P] -> [B, L]``, keeping the last ``length`` values (dropping :func:`patchify`'s pad)."""
    flat = x_BNP.reshape(x_BNP.shape[0], -1)
    return flat if length is None else flat[:, flat.shape[1] - length :]


class DenseFFN(FeedForward):
    """A dense FFN called like an MoE layer (``token_mask`` accepted and unused), so
    :func:`~moekit.layers.fit_centroids` sees the same call, padding mask included, at ``ffn``."""

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:  # noqa: D102
        del token_mask
        return super().forward(x)


class MoiraiLayer(nn.Module):
    """``x + attn(attn_norm(x))``, then ``h + ffn(ffn_norm(h))``; ``ffn`` is MoE or :class:`DenseFFN`."""

    def __init__(self, config: MoiraiMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        attn = AttentionConfig(
            dim=config.dim,
            num_heads=config.num_heads,
            num_kv_heads=config.num_heads,
            head_dim=config.head_dim,
            qk_norm="per_head",
            norm_eps=config.norm_eps,
        )
        self.attn = Attention(attn, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.is_moe = config.moe is not None
        if config.moe is not None:
            self.ffn: nn.Module = MoELayer(config.moe)
        else:
            self.ffn = DenseFFN(FFNConfig(dim=config.dim, ffn_dim=config.ffn_dim))

    def forward(self, x_BND, cos, sin, mask_B1NN, token_mask_BN, moe_k=None):
        """Returns ``(x_BND, MoEOutput | None)``."""
        h_BND = x_BND + self.attn(self.attn_norm(x_BND), cos, sin, mask_B1NN)
        normed = self.ffn_norm(h_BND)
        if not self.is_moe:
            return h_BND + self.ffn(normed, token_mask=token_mask_BN), None
        out = self.ffn(normed, token_mask=token_mask_BN, k=moe_k)
        return h_BND + out.hidden, out


@dataclass
class MoiraiOutput:
    """What :meth:`MoiraiMoEModel.forward` returns.

    Attributes:
        params: raw mixture parameters ``[B, N, P, K]``: token n's distribution of patch n + 1.
        token_mask: ``[B, N]`` bool, True for patches with at least one observed value.
        aux_losses: unweighted aux losses averaged over MoE layers (empty for dense).
        routing: one :class:`~moekit.layers.RoutingInfo` per MoE layer.
        patches, observed: the input as patches ``[B, N, P]`` (unobserved zeroed) and its mask.
        components, min_scale: the head's mixture, for :meth:`mixture`.
    """

    params: Tensor
    token_mask: Tensor
    patches: Tensor
    observed: Tensor
    components: tuple[str, ...]
    min_scale: float
    aux_losses: dict = field(default_factory=dict)
    routing: list[RoutingInfo] = field(default_factory=list)

    def mixture(self, params: Tensor | None = None) -> dist.Mixture:
        """The mixture of ``params`` (default: all of this output's)."""
        return dist.split_params(self.params if params is None else params, self.components, self.min_scale)

    def nll(self) -> tuple[Tensor, Tensor]:
        """``(mean next-patch NLL, number of scored values)``: token n scored on patch n + 1."""
        targets, mask = next_patch_targets(self.patches, self.observed, self.token_mask)
        return dist.nll(self.mixture(self.params[:, :-1]), targets, mask)


class MoiraiMoEModel(nn.Module):
    """The Moirai-MoE network (see the module docstring).

    Submodules: ``in_proj``, ``in_hidden``, ``in_out`` (input block), ``layers``, ``norm``,
    ``head`` (``Linear(D, P * K)``), ``rotary``.
    """

    def __init__(self, config: MoiraiMoEConfig) -> None:
        super().__init__()
        self.config = config
        p, d = config.patch_size, config.dim
        self.in_proj = nn.Linear(2 * p, d)
        self.in_hidden = nn.Linear(2 * p, d)
        self.in_out = nn.Linear(d, d)
        self.layers = nn.ModuleList(MoiraiLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(d, config.norm_eps)
        self.head = nn.Linear(d, p * config.num_raw_params)
        rope = RopeConfig(
            head_dim=config.head_dim, theta=config.rope_theta, max_position_embeddings=config.max_patches
        )
        self.rotary = RotaryEmbedding(rope)
        self.init_weights()

    def tied_weight_names(self) -> list[str]:
        """No tied weights."""
        return []

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs in layer order (what ``routing`` aligns with)."""
        return [layer.ffn for layer in self.layers if layer.is_moe]

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by role: the shared MoE groups plus ``attention``, ``embeddings``
        (input block), ``head`` and ``dense_ffn``."""
        from moekit.models.param_groups import module_param_names, moe_parameter_groups

        groups = moe_parameter_groups(self)
        groups["attention"] = [
            n
            for i, layer in enumerate(self.layers)
            for n in module_param_names(layer.attn, f"layers.{i}.attn")
        ]
        groups["embeddings"] = [
            n for m in ("in_proj", "in_hidden", "in_out") for n in module_param_names(getattr(self, m), m)
        ]
        groups["head"] = module_param_names(self.head, "head")
        groups["dense_ffn"] = [
            n
            for i, layer in enumerate(self.layers)
            if not layer.is_moe
            for n in module_param_names(layer.ffn, f"layers.{i}.ffn")
        ]
        return groups

    @torch.no_grad()
    def init_weights(self) -> None:
        """Linear weights ~ N(0, initializer_range), biases 0, norms 1; residual-stream outputs
        (``o_proj``, FFN ``w_out``) scaled by ``1 / sqrt(2 * num_layers)``; centroids N(0, 1)
        until :func:`~moekit.layers.fit_centroids` sets them."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, StackedExpertWeights):
                nn.init.normal_(module.w_in, std=std)
                nn.init.normal_(module.w_out, std=out_std)
        for layer in self.layers:
            nn.init.normal_(layer.attn.o_proj.weight, std=out_std)
            if not layer.is_moe:
                nn.init.normal_(layer.ffn.w_out.weight, std=out_std)
                continue
            router = layer.ffn.router
            if router.weight is not None and router.weight.requires_grad:
                nn.init.normal_(router.weight, std=std)
            else:
                router.reset_parameters()
            if router.expert_bias is not None:
                router.expert_bias.zero_()

    def embed(self, x_BNP: Tensor, observed_BNP: Tensor) -> Tensor:
        """Patch embedding ``[B, N, P] x2 -> [B, N, D]`` from values and their observed mask."""
        feats = torch.cat([x_BNP * observed_BNP, observed_BNP.to(x_BNP.dtype)], dim=-1)
        return self.in_out(nn.functional.silu(self.in_proj(feats))) + self.in_hidden(feats)

    def forward(
        self, values: Tensor, observed: Tensor | None = None, moe_k: int | None = None
    ) -> MoiraiOutput:
        """Runs the model on normalised values.

        Args:
            values: ``[B, L]`` (left-padded to a multiple of P inside) or patches ``[B, N, P]``.
            observed: the same shape, True where a value is real; None means all are.
            moe_k: experts per token for every MoE layer in this call.
        """
        if observed is None:
            observed = torch.ones_like(values, dtype=torch.bool)
        if values.ndim == 2:
            x_BNP, obs_BNP = patchify(values, observed, self.config.patch_size)
        else:
            obs_BNP = observed.to(torch.bool)
            x_BNP = torch.where(obs_BNP, values, 0.0)
        x_BNP = x_BNP.to(self.head.weight.dtype)
        b, n, p = x_BNP.shape
        token_mask_BN = obs_BNP.any(-1)
        all_real = bool(token_mask_BN.all())
        mask = None if all_real else build_attention_mask(token_mask_BN.long(), b, n, 0, None, x_BNP.device)
        positions = torch.arange(n, device=x_BNP.device).expand(b, n)
        cos, sin = self.rotary(positions, n)
        h_BND = self.embed(x_BNP, obs_BNP)
        routing, layer_aux = [], []
        for layer in self.layers:
            h_BND, moe_out = layer(h_BND, cos, sin, mask, None if all_real else token_mask_BN, moe_k)
            if moe_out is not None:
                routing.append(moe_out.routing)
                layer_aux.append(moe_out.aux_losses)
        params = self.head(self.norm(h_BND)).view(b, n, p, self.config.num_raw_params)
        return MoiraiOutput(
            params,
            token_mask_BN,
            x_BNP,
            obs_BNP,
            self.config.components,
            self.config.min_scale,
            mean_aux_losses(layer_aux),
            routing,
        )

    def mixture(self, params: Tensor) -> dist.Mixture:
        """The :class:`~moekit.models.moirai_dist.Mixture` of raw ``params`` ``[..., K]``."""
        return dist.split_params(params, self.config.components, self.config.min_scale)

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; with ``active_only`` expert weights count ``top_k / E`` of their size."""
        total = 0.0
        frac = {}
        if active_only:
            for moe in self.moe_layers:
                for prm in moe.experts.routed_parameters():
                    frac[id(prm)] = moe.config.top_k / moe.config.num_total_experts
        for prm in self.parameters():
            total += prm.numel() * frac.get(id(prm), 1.0)
        return round(total)

    def forecast_samples(
        self, histories: Sequence[np.ndarray], horizon: int, num_samples: int = 100, seed: int = 0
    ) -> np.ndarray:
        """Sample paths ``[N, S, H]`` in each history's own units (raw values in, raw values out).

        The last ``context_length`` values of each of the N histories are normalised by their
        own observed values (``config.scale_method``), :func:`sample_paths` continues them, and
        the paths are de-normalised. Seeded by ``seed``; runs in eval mode.
        """
        cfg = self.config
        arrays = [np.asarray(h, dtype=np.float64).reshape(-1) for h in histories]
        empty = [i for i, a in enumerate(arrays) if a.shape[0] < 1]
        if not arrays or empty:
            raise ValueError(f"forecast_samples: histories {empty or '[]'} are empty; each needs a value")
        ctx = min(cfg.context_length, max(a.shape[0] for a in arrays))
        values = np.zeros((len(arrays), ctx))
        observed = np.zeros((len(arrays), ctx), dtype=bool)
        for row, x in enumerate(arrays):
            piece = x[-ctx:]
            values[row, ctx - piece.shape[0] :] = piece
            observed[row, ctx - piece.shape[0] :] = True
        scale = fit_scale(values, cfg.scale_method, observed)
        normed = np.where(observed, scale.apply(values), 0.0)
        device = self.head.weight.device
        was_training = self.training
        self.eval()
        try:
            paths = sample_paths(
                self,
                torch.as_tensor(normed, dtype=self.head.weight.dtype, device=device),
                torch.as_tensor(observed, device=device),
                int(horizon),
                int(num_samples),
                seed,
            )
        finally:
            self.train(was_training)
        return scale.expand().invert(paths.double().cpu().numpy())

    def forecast(self, histories: Sequence[np.ndarray], horizon: int, num_samples: int = 100) -> np.ndarray:
        """Point forecasts ``[N, H]``: the mean of :meth:`forecast_samples`' paths."""
        return self.forecast_samples(histories, horizon, num_samples).mean(axis=1)

    def save_pretrained(self, path: str | Path) -> None:
        """Writes ``config.json`` and ``model.safetensors`` (:mod:`moekit.models.io`)."""
        from moekit.models.io import save_pretrained

        save_pretrained(self, path)


def next_patch_targets(x_BNP: Tensor, observed_BNP: Tensor, token_mask_BN: Tensor) -> tuple[Tensor, Tensor]:
    """Targets for token n: patch n + 1's values ``[B, N-1, P]`` and their mask (observed, and
    token n itself real)."""
    mask = observed_BNP[:, 1:] & token_mask_BN[:, :-1, None]
    return x_BNP[:, 1:], mask


@torch.no_grad()
def sample_paths(
    model: MoiraiMoEModel,
    context_BL: Tensor,
    observed_BL: Tensor,
    horizon: int,
    num_samples: int = 100,
    seed: int = 0,
) -> Tensor:
    """Sample paths ``[B, S, H]`` (normalised units) continuing each row of ``context_BL``.

    Each row is repeated S times; every step samples the next patch from the last token's
    mixture and appends it (observed). Only the last ``max_patches`` patches are fed back.
    Seeded: the draws come from a forked RNG seeded with ``seed``, so the same call gives the
    same paths and the caller's RNG state is untouched.
    """
    if horizon < 1 or num_samples < 1:
        raise ValueError(f"horizon={horizon} and num_samples={num_samples} must be at least 1")
    cfg = model.config
    b = context_BL.shape[0]
    x_BNP, obs_BNP = patchify(context_BL, observed_BL, cfg.patch_size)
    x = x_BNP.repeat_interleave(num_samples, 0).to(model.head.weight.dtype)
    obs = obs_BNP.repeat_interleave(num_samples, 0)
    num_steps = -(-horizon // cfg.patch_size)
    device = x.device
    out = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for _ in range(num_steps):
            x, obs = x[:, -cfg.max_patches :], obs[:, -cfg.max_patches :]
            params = model(x, obs).params[:, -1]
            patch = dist.sample(model.mixture(params)).to(x.dtype)
            out.append(patch)
            x = torch.cat([x, patch[:, None]], 1)
            obs = torch.cat([obs, torch.ones_like(obs[:, :1])], 1)
    paths = torch.cat(out, -1)[:, :horizon]
    return paths.view(b, num_samples, horizon)


def moirai_moe_small() -> MoiraiMoEConfig:
    """Small Moirai-MoE for this machine: P=16, D=128, 4 layers, 8 heads of 16, 8 experts top-2
    (F=128) with token-cluster gating, 32 context patches (512 values)."""
    moe = MoEConfig(dim=128, ffn_dim=128, num_experts=8, top_k=2, router_type="centroid")
    return MoiraiMoEConfig(
        patch_size=16, dim=128, num_layers=4, num_heads=8, head_dim=16, ffn_dim=256, moe=moe, max_patches=32
    )


def moirai_dense_small() -> MoiraiMoEConfig:
    """The dense twin of ``moirai-moe-small`` (FFN width 256 = 2 x 128: the same active parameters)."""
    return moirai_moe_small().dense_twin()


def moirai_moe_small_learned() -> MoiraiMoEConfig:
    """``moirai-moe-small`` with a learned linear router (top-2 softmax over the chosen logits)."""
    cfg = moirai_moe_small()
    assert cfg.moe is not None
    return cfg.replace(moe=cfg.moe.replace(router_type="topk", softmax_order="after_topk"))


def moirai_moe_tiny() -> MoiraiMoEConfig:
    """For tests: P=8, D=32, 2 layers, 4 heads of 8, 4 experts top-2 (F=32), centroid gating."""
    moe = MoEConfig(dim=32, ffn_dim=32, num_experts=4, top_k=2, router_type="centroid")
    return MoiraiMoEConfig(
        patch_size=8, dim=32, num_layers=2, num_heads=4, head_dim=8, ffn_dim=64, moe=moe, max_patches=16
    )


#: Named Moirai-MoE configs (``moekit.models.presets`` holds the LM's).
MOIRAI_PRESETS = {
    "moirai-moe-small": moirai_moe_small,
    "moirai-dense-small": moirai_dense_small,
    "moirai-moe-small-learned": moirai_moe_small_learned,
    "moirai-moe-tiny": moirai_moe_tiny,
}


#: The forecast-family presets ``moekit ts-train`` reads (the same dict).
PRESETS = MOIRAI_PRESETS


def get_moirai_preset(name: str) -> MoiraiMoEConfig:
    """A fresh config for preset ``name``; ValueError listing the names otherwise."""
    if name not in MOIRAI_PRESETS:
        raise ValueError(f"unknown Moirai-MoE preset {name!r}; available: {sorted(MOIRAI_PRESETS)}")
    return MOIRAI_PRESETS[name]()


__all__ = [
    "MOIRAI_PRESETS",
    "PRESETS",
    "DenseFFN",
    "MoiraiLayer",
    "MoiraiMoEConfig",
    "MoiraiMoEModel",
    "MoiraiOutput",
    "get_moirai_preset",
    "next_patch_targets",
    "patchify",
    "sample_paths",
    "unpatchify",
]
