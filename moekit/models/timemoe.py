"""Time-MoE: a decoder-only forecaster over point-wise tokens with MoE FFNs and multi-horizon heads.

Shape legend: B = series in the batch, S = new time steps in this call, P = steps already in the
KV cache, K = P + S keys, L = context steps, D = model width, h = one head's horizon, H = the whole
forecast horizon, T = B * S tokens (flattened for the MoE layers).

The model (after Time-MoE, Shi et al. 2024):

- each time step is one token: a scalar ``x`` embedded by a SwiGLU ``silu(W_g x) * (W_e x)``
  (no bias, so a zero-valued padding step embeds to zero);
- pre-norm decoder layers (RMSNorm, RoPE causal attention from :mod:`moekit.blocks`), whose FFNs
  are :class:`~moekit.layers.MoELayer` s with a sigmoid-gated shared expert (``moe_placement``
  picks which layers, as the LM's does), or dense SwiGLU FFNs for the dense twin;
- one linear head per horizon ``h`` in ``horizons`` (any order): the head at position ``t``
  predicts steps ``t+1 .. t+h``.

Values are normalised per series by the caller of :meth:`TimeMoEForecaster.forward` (the data
module and :meth:`TimeMoEForecaster.forecast` do it); ``forecast`` takes raw values and returns
raw values. Pitfalls of the official code avoided here: the aux loss is moekit's balance loss over
the router's real assignments (any k, not a hard-coded 2); head selection works for unsorted
horizons (:func:`moekit.timeseries.plan_horizon`); labels are never modified in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.blocks import (
    Attention,
    AttentionConfig,
    KVCache,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
    build_attention_mask,
)
from moekit.config import JsonConfig, check_choice
from moekit.layers import FeedForward, FFNConfig, MoEConfig, MoELayer, MoEOutput, RoutingInfo
from moekit.layers.experts import StackedExpertWeights
from moekit.models.outputs import mean_aux_losses
from moekit.timeseries import fit_scale, plan_horizon

PLACEMENTS = ("all", "every_other", "none")
NORMALIZATIONS = ("std", "robust")


@dataclass(kw_only=True)
class TimeMoEConfig(JsonConfig):
    """A Time-MoE forecaster.

    Attributes:
        dim: model width D.
        num_layers: decoder layers.
        num_heads, num_kv_heads, head_dim: attention heads (GQA when ``num_kv_heads < num_heads``).
        ffn_dim: width of the dense FFN in dense layers (the dense twin's whole FFN).
        moe: the MoE FFN template (Time-MoE: 8 experts of width ``d_ff / k``, top-2 softmax
            without renormalisation, a sigmoid-gated shared expert of width ``d_ff``); None for a
            dense model.
        moe_placement: which layers are MoE: ``"all"``, ``"every_other"`` (odd layers) or
            ``"none"``; ``num_dense_first_layers`` keeps the first layers dense (as the LM's).
        horizons: the output heads' horizons, any order, distinct (Time-MoE: 1, 8, 32, 64).
        context_length: steps of history the model reads (longer inputs keep their last steps).
        normalization: per-series scaling of the context: ``"std"`` (z-score) or ``"robust"``.
        huber_delta: the Huber loss's delta on normalised values (Time-MoE: 2.0).
        aux_loss_coef, z_loss_coef: recommended aux-loss weights (the objective's defaults).
        rope_theta, max_position_embeddings, rms_norm_eps, initializer_range: as the LM's.
    """

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    ffn_dim: int = 256
    moe: MoEConfig | None = None
    moe_placement: str = "all"
    num_dense_first_layers: int = 0
    horizons: tuple[int, ...] = (1, 8, 32, 64)
    context_length: int = 512
    normalization: str = "std"
    huber_delta: float = 2.0
    aux_loss_coef: float = 0.02
    z_loss_coef: float = 0.0
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        name = "TimeMoEConfig"
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        self.horizons = tuple(int(h) for h in self.horizons)
        for f in ("dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "context_length"):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")
        if not self.horizons or min(self.horizons) < 1 or len(set(self.horizons)) != len(self.horizons):
            raise ValueError(f"{name}.horizons={list(self.horizons)} must be distinct positive integers")
        check_choice(name, "moe_placement", self.moe_placement, PLACEMENTS)
        check_choice(name, "normalization", self.normalization, NORMALIZATIONS)
        if self.moe is not None and self.moe.dim != self.dim:
            raise ValueError(f"{name}.moe.dim={self.moe.dim} must equal dim={self.dim}")
        if not 0 <= self.num_dense_first_layers <= self.num_layers:
            raise ValueError(f"{name}.num_dense_first_layers must be in [0, num_layers={self.num_layers}]")
        if self.huber_delta <= 0:
            raise ValueError(f"{name}.huber_delta must be positive, got {self.huber_delta}")
        # The blocks validate their own fields (heads divide, even head_dim) with their names.
        self.attention_config()
        self.rope_config()

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` has the MoE FFN (``moe`` set, placement selects it, not a dense-first layer)."""
        if self.moe is None or self.moe_placement == "none" or i < self.num_dense_first_layers:
            return False
        return self.moe_placement == "all" or i % 2 == 1

    def attention_config(self) -> AttentionConfig:
        """The attention block's config."""
        return AttentionConfig(
            dim=self.dim,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            norm_eps=self.rms_norm_eps,
        )

    def rope_config(self) -> RopeConfig:
        """The RoPE tables' config."""
        return RopeConfig(
            head_dim=self.head_dim,
            theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
        )

    @property
    def max_horizon(self) -> int:
        """The longest head."""
        return max(self.horizons)


class SwiGLUEmbedding(nn.Module):
    """Point-wise token embedding ``silu(W_g x) * (W_e x)``: ``[B, S] -> [B, S, D]`` (no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(1, dim, bias=False)
        self.proj = nn.Linear(1, dim, bias=False)

    def forward(self, x_BS: Tensor) -> Tensor:
        """Embeds scalar steps ``[B, S]`` into ``[B, S, D]``."""
        x_BS1 = x_BS.unsqueeze(-1).to(self.gate.weight.dtype)
        return F.silu(self.gate(x_BS1)) * self.proj(x_BS1)


class TimeMoELayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``h + ffn(norm(h))``; the FFN is MoE or dense."""

    def __init__(self, config: TimeMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        self.self_attn = Attention(config.attention_config(), layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.rms_norm_eps)
        if self.is_moe:
            assert config.moe is not None
            self.mlp: nn.Module = MoELayer(config.moe)
        else:
            self.mlp = FeedForward(FFNConfig(dim=config.dim, ffn_dim=config.ffn_dim))

    def forward(
        self,
        x_BSD: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask_B1SK: Tensor | None,
        token_mask_BS: Tensor | None,
        moe_k: int | None,
        cache: KVCache | None,
    ) -> tuple[Tensor, MoEOutput | None]:
        """Returns ``(x_BSD, moe_output)``; ``moe_output`` is None for a dense layer."""
        h_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin, mask_B1SK, cache)
        normed_BSD = self.post_attention_layernorm(h_BSD)
        if not self.is_moe:
            return h_BSD + self.mlp(normed_BSD), None
        out = self.mlp(normed_BSD, token_mask=token_mask_BS, k=moe_k)
        return h_BSD + out.hidden, out


@dataclass
class TimeMoEOutput:
    """What :meth:`TimeMoEForecaster.forward` returns.

    Attributes:
        predictions: one ``[B, S, h]`` tensor per head, in ``config.horizons`` order; entry
            ``[b, t, j]`` predicts the (normalised) value ``j + 1`` steps after position ``t``.
        aux_losses: unweighted aux losses averaged over MoE layers (lazy; empty when dense).
        routing: one :class:`~moekit.layers.RoutingInfo` per MoE layer, in layer order.
        past_key_values: the :class:`KVCache` when one was used, else None.
    """

    predictions: tuple[Tensor, ...]
    aux_losses: Mapping[str, Tensor] = field(default_factory=dict)
    routing: list[RoutingInfo] = field(default_factory=list)
    past_key_values: KVCache | None = None


class TimeMoEForecaster(nn.Module):
    """The Time-MoE model (see the module doc).

    Submodules: ``embed`` (:class:`SwiGLUEmbedding`), ``layers`` (:class:`TimeMoELayer` s),
    ``norm``, ``heads`` (one ``Linear(D, h)`` per horizon, in ``config.horizons`` order), ``rotary``.
    """

    def __init__(self, config: TimeMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # accepted for the engine; layers are small
        self.embed = SwiGLUEmbedding(config.dim)
        self.layers = nn.ModuleList(TimeMoELayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.heads = nn.ModuleList(nn.Linear(config.dim, h, bias=False) for h in config.horizons)
        self.rotary = RotaryEmbedding(config.rope_config())
        self.init_weights()

    def tied_weight_names(self) -> list[str]:
        """No weights are tied (the loader asks)."""
        return []

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs in layer order (what ``routing`` aligns with)."""
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names by role (the ``--freeze`` groups): the MoE groups plus ``attention``,
        ``embeddings`` (the input embedding), ``heads`` and ``dense_ffn``."""
        from moekit.models.param_groups import module_param_names, moe_parameter_groups

        groups = moe_parameter_groups(self)
        groups["attention"] = [
            n
            for i, layer in enumerate(self.layers)
            for n in module_param_names(layer.self_attn, f"layers.{i}.self_attn")
        ]
        groups["embeddings"] = module_param_names(self.embed, "embed")
        groups["heads"] = module_param_names(self.heads, "heads")
        groups["dense_ffn"] = [
            n
            for i, layer in enumerate(self.layers)
            if not layer.is_moe
            for n in module_param_names(layer.mlp, f"layers.{i}.mlp")
        ]
        return groups

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, initializer_range) for matrices, residual-writing projections scaled by
        1/sqrt(2 * num_layers) (as the LM); routers start near-uniform; norms at 1. The SwiGLU
        embedding's inputs are scalars of order 1, so its weights start at std 1 (a 0.02 start
        would give near-zero token states)."""
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
        nn.init.normal_(self.embed.gate.weight, std=1.0)
        nn.init.normal_(self.embed.proj.weight, std=1.0)
        for layer in self.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, std=out_std)
            mlp = layer.mlp
            if isinstance(mlp, FeedForward):
                nn.init.normal_(mlp.w_out.weight, std=out_std)
            elif mlp.config.shared_ffn_dim:
                nn.init.normal_(mlp.shared.w_out.weight, std=out_std)

    def forward(
        self,
        values_BS: Tensor,
        mask_BS: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        moe_k: int | None = None,
    ) -> TimeMoEOutput:
        """Runs the decoder on normalised steps.

        Args:
            values_BS: ``[B, S]`` normalised values (the new steps when a cache is given); padded
                steps should be 0.
            mask_BS: ``[B, P + S]`` bool/0-1, True for observed steps (left padding for short
                series); covers the cached steps too. None means all observed.
            past_key_values: a :class:`KVCache` from an earlier call (P cached steps).
            use_cache: return a cache (a new one when ``past_key_values`` is None).
            moe_k: experts per token for every MoE layer in this call.

        Returns:
            :class:`TimeMoEOutput`; predictions at padded positions are meaningless.
        """
        cfg = self.config
        batch, num_new = values_BS.shape
        device = values_BS.device
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(cfg.num_layers)
        num_past = cache.seq_len if cache is not None else 0
        attention_mask = None
        if mask_BS is not None:
            if tuple(mask_BS.shape) != (batch, num_past + num_new):
                raise ValueError(
                    f"mask has shape {tuple(mask_BS.shape)}, expected ({batch}, {num_past + num_new}) "
                    "= (series, cached + new steps)"
                )
            if not bool(mask_BS.all()):
                attention_mask = mask_BS.to(torch.bool)
        if attention_mask is not None:
            # Positions count observed steps, so left padding does not shift them.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, num_past:]
        else:
            position_ids = torch.arange(num_past, num_past + num_new, device=device).expand(batch, -1)
        token_mask_BS = None if attention_mask is None else attention_mask[:, num_past:]
        mask_B1SK = build_attention_mask(attention_mask, batch, num_new, num_past, None, device)
        cos, sin = self.rotary(position_ids, num_past + num_new)
        x_BSD = self.embed(values_BS)
        routing: list[RoutingInfo] = []
        layer_aux: list[Mapping[str, Tensor]] = []
        for layer in self.layers:
            x_BSD, moe_out = layer(x_BSD, cos, sin, mask_B1SK, token_mask_BS, moe_k, cache)
            if moe_out is not None:
                routing.append(moe_out.routing)
                layer_aux.append(moe_out.aux_losses)
        h_BSD = self.norm(x_BSD)
        predictions = tuple(head(h_BSD) for head in self.heads)
        return TimeMoEOutput(predictions, mean_aux_losses(layer_aux), routing, cache)

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; with ``active_only`` each MoE layer's experts count ``top_k / E``."""
        fractions = {}
        if active_only:
            for mlp in self.moe_layers:
                for p in mlp.experts.routed_parameters():
                    fractions[id(p)] = mlp.config.top_k / mlp.config.num_total_experts
        return round(sum(p.numel() * fractions.get(id(p), 1.0) for p in self.parameters()))

    @torch.no_grad()
    def forecast_normalized(
        self, z_BL: Tensor, mask_BL: Tensor | None, horizon: int, use_cache: bool = True
    ) -> tuple[Tensor, int]:
        """Forecasts ``horizon`` normalised steps after ``z_BL``: ``([B, horizon], forward calls)``.

        Each call takes the largest head that fits the remaining steps
        (:func:`~moekit.timeseries.plan_horizon`), keeps its predictions from the last position,
        appends them to the input and rolls on: with the KV cache only the appended steps are
        run; without it the whole sequence is recomputed (the reference the cache must match).
        """
        plan = plan_horizon(horizon, self.config.horizons)
        head_index = {h: i for i, h in enumerate(self.config.horizons)}
        batch = z_BL.shape[0]
        seq_BS = z_BL
        full_mask = (
            mask_BL.to(torch.bool)
            if mask_BL is not None
            else torch.ones(z_BL.shape, dtype=torch.bool, device=z_BL.device)
        )
        cache = KVCache(self.config.num_layers) if use_cache else None
        new_BS, out_parts = z_BL, []
        for n, (head, kept) in enumerate(plan):
            if use_cache:
                out = self(new_BS, full_mask, past_key_values=cache, use_cache=True)
            else:
                out = self(seq_BS, full_mask)
            step_Bh = out.predictions[head_index[head]][:, -1, :kept]
            out_parts.append(step_Bh)
            if n + 1 < len(plan):
                new_BS = step_Bh.to(z_BL.dtype)
                seq_BS = torch.cat([seq_BS, new_BS], dim=1)
                ones = torch.ones(batch, kept, dtype=torch.bool, device=z_BL.device)
                full_mask = torch.cat([full_mask, ones], dim=1)
        if not out_parts:
            return z_BL.new_zeros(batch, 0), 0
        return torch.cat(out_parts, dim=1), len(plan)

    @torch.no_grad()
    def forecast(
        self,
        context: Sequence[np.ndarray] | np.ndarray | Tensor,
        horizon: int,
        use_cache: bool = True,
    ) -> np.ndarray:
        """Point forecasts ``[N, horizon]`` (float64, raw units) for N raw histories.

        ``context`` is a list of 1-D arrays (any lengths; longer than ``context_length`` keeps the
        last steps) or an ``[N, L]`` array. Each history is normalised by its own scale
        (``config.normalization``), forecast, and the forecast inverse-transformed.
        """
        if horizon < 1:
            raise ValueError(f"horizon={horizon} must be at least 1")
        rows = [np.asarray(c, np.float64).reshape(-1) for c in _rows(context)]
        if not rows or any(r.shape[0] == 0 for r in rows):
            raise ValueError("forecast needs at least one non-empty history")
        if any(not np.all(np.isfinite(r)) for r in rows):
            raise ValueError("forecast: histories must be finite (fill missing values first)")
        length = min(self.config.context_length, max(r.shape[0] for r in rows))
        x_BL = np.zeros((len(rows), length))
        m_BL = np.zeros((len(rows), length), dtype=bool)
        for b, r in enumerate(rows):
            tail = r[-length:]
            x_BL[b, length - tail.shape[0] :] = tail
            m_BL[b, length - tail.shape[0] :] = True
        scale = fit_scale(x_BL, self.config.normalization, m_BL)
        z_BL = np.where(m_BL, scale.apply(x_BL), 0.0)
        param = next(self.parameters())
        z = torch.as_tensor(z_BL, dtype=param.dtype, device=param.device)
        mask = torch.as_tensor(m_BL, device=param.device)
        was_training = self.training
        self.eval()
        try:
            pred_BH, _ = self.forecast_normalized(z, mask, horizon, use_cache)
        finally:
            self.train(was_training)
        return scale.invert(pred_BH.double().cpu().numpy())

    def save_pretrained(self, path: str | Path) -> None:
        """Writes a moekit model folder (``config.json`` + ``model.safetensors``)."""
        from moekit.models.io import write_model_folder

        write_model_folder(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> TimeMoEForecaster:
        """Loads a folder written by :meth:`save_pretrained` (safetensors only)."""
        from moekit.models.io import load_pretrained

        return load_pretrained(cls, path, dtype=dtype)


def _rows(context: Sequence[np.ndarray] | np.ndarray | Tensor) -> list:
    if isinstance(context, Tensor):
        context = context.detach().cpu().double().numpy()
    if isinstance(context, np.ndarray):
        return list(context) if context.ndim == 2 else [context]
    return list(context)


def _timemoe(dim: int, num_layers: int, d_ff: int, horizons=(1, 8, 32, 64), **overrides) -> TimeMoEConfig:
    """Time-MoE's layout: 8 experts of width d_ff / 2, top-2 softmax without renormalisation, a
    sigmoid-gated shared expert of width d_ff, in every layer."""
    moe = MoEConfig(
        dim=dim,
        ffn_dim=d_ff // 2,
        num_experts=8,
        top_k=2,
        norm_topk_prob=False,
        shared_ffn_dim=d_ff,
        shared_expert_gate=True,
    )
    return TimeMoEConfig(
        dim=dim,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=4,
        head_dim=dim // 4,
        ffn_dim=2 * d_ff,
        moe=moe,
        horizons=tuple(horizons),
        **overrides,
    )


def dense_twin(config: TimeMoEConfig) -> TimeMoEConfig:
    """The dense forecaster with the MoE one's active FFN width: shared + top_k * expert width
    (the router and the shared gate, D * (E + 1) weights per layer, are the only difference)."""
    if config.moe is None:
        return config
    width = config.moe.shared_ffn_dim + config.moe.top_k * config.moe.ffn_dim
    return config.replace(moe=None, moe_placement="none", ffn_dim=width, aux_loss_coef=0.0)


def timemoe_tiny() -> TimeMoEConfig:
    """For tests: D=32, 2 layers, 8 experts of 32 top-2 + shared 64, heads {1, 4, 16}, context 64."""
    return _timemoe(32, 2, 64, horizons=(1, 4, 16), context_length=64, max_position_embeddings=256)


def timemoe_small() -> TimeMoEConfig:
    """``moekit ts-train``'s default: D=64, 3 layers, 8 experts of 64 top-2 + shared 128 (every
    layer), heads {1, 8, 32, 64}, context 128; sized to pretrain on two CPU cores in minutes
    (Time-MoE-base is D=384, 12 layers, context 4096)."""
    return _timemoe(64, 3, 128, context_length=128, max_position_embeddings=512)


def timemoe_small_dense() -> TimeMoEConfig:
    """The dense twin of ``timemoe-small`` (FFN width 128 + 2 * 64 = 256, same active parameters)."""
    return dense_twin(timemoe_small())


def timemoe_small_h1() -> TimeMoEConfig:
    """``timemoe-small`` with the single head {1} (the multi-resolution ablation)."""
    return timemoe_small().replace(horizons=(1,))


PRESETS = {
    "timemoe-tiny": timemoe_tiny,
    "timemoe-small": timemoe_small,
    "timemoe-small-dense": timemoe_small_dense,
    "timemoe-small-h1": timemoe_small_h1,
}
