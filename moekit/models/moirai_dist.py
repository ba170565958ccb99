"""Mixture distribution heads for Moirai-MoE: Student-t, Normal and Laplace components.

Shape legend: ``...`` any leading shape (batch, patches, patch positions), C = mixture
components, K = raw parameters per value (``C`` mixture logits, then each component's own).

A head emits ``K`` raw numbers per predicted value. :func:`split_params` turns them into mixture
log-weights and constrained component parameters: ``loc`` as is, ``scale = softplus(raw) +
min_scale``, Student-t ``df = 2 + softplus(raw)`` (so the variance exists). The log-densities are
written out here (not taken from ``torch.distributions``, which the tests use as the oracle).
Moirai's released head also has negative-binomial and log-normal components for count and
positive data; they are not implemented (the built-in data is real-valued).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: Component name -> number of raw parameters (loc, scale[, df]).
COMPONENT_PARAMS = {"student_t": 3, "normal": 2, "laplace": 2}
COMPONENTS = tuple(COMPONENT_PARAMS)


def check_components(owner: str, components: tuple[str, ...]) -> None:
    """``ValueError`` naming ``owner.components`` unless it is a non-empty tuple of known names."""
    if not components:
        raise ValueError(f"{owner}.components must name at least one of {list(COMPONENTS)}")
    unknown = [c for c in components if c not in COMPONENT_PARAMS]
    if unknown:
        raise ValueError(f"{owner}.components: unknown {unknown}; choose from {list(COMPONENTS)}")


def num_raw_params(components: tuple[str, ...]) -> int:
    """K: raw numbers per value for a mixture of ``components`` (C logits + their parameters)."""
    return len(components) + sum(COMPONENT_PARAMS[c] for c in components)


@dataclass
class Mixture:
    """A mixture per value: ``log_weights`` ``[..., C]`` and, per component, ``loc``/``scale``
    (``[..., C]`` each, the component's column) and ``df`` (Student-t only, NaN elsewhere)."""

    components: tuple[str, ...]
    log_weights: Tensor
    loc: Tensor
    scale: Tensor
    df: Tensor


def split_params(raw: Tensor, components: tuple[str, ...], min_scale: float = 1e-3) -> Mixture:
    """Raw head outputs ``[..., K]`` -> a :class:`Mixture` (computed in at least float32)."""
    raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
    num_c = len(components)
    if raw.shape[-1] != num_raw_params(components):
        raise ValueError(f"raw parameters have {raw.shape[-1]} values, expected {num_raw_params(components)}")
    log_weights = torch.log_softmax(raw[..., :num_c], dim=-1)
    locs, scales, dfs = [], [], []
    start = num_c
    for name in components:
        locs.append(raw[..., start])
        scales.append(F.softplus(raw[..., start + 1]) + min_scale)
        if name == "student_t":
            dfs.append(2.0 + F.softplus(raw[..., start + 2]))
        else:
            dfs.append(torch.full_like(raw[..., start], float("nan")))
        start += COMPONENT_PARAMS[name]
    return Mixture(
        components, log_weights, torch.stack(locs, -1), torch.stack(scales, -1), torch.stack(dfs, -1)
    )


def component_log_prob(name: str, y: Tensor, loc: Tensor, scale: Tensor, df: Tensor | None = None) -> Tensor:
    """Log-density of one component at ``y`` (all broadcastable)."""
    z = (y - loc) / scale
    if name == "normal":
        return -0.5 * z.square() - scale.log() - 0.5 * math.log(2 * math.pi)
    if name == "laplace":
        return -z.abs() - scale.log() - math.log(2.0)
    if name == "student_t":
        assert df is not None
        half = 0.5 * (df + 1.0)
        return (
            torch.lgamma(half)
            - torch.lgamma(0.5 * df)
            - 0.5 * torch.log(df * math.pi)
            - scale.log()
            - half * torch.log1p(z.square() / df)
        )
    raise ValueError(f"unknown mixture component {name!r}; choose from {list(COMPONENTS)}")


def log_prob(mix: Mixture, y: Tensor) -> Tensor:
    """Mixture log-density ``log sum_c w_c p_c(y)`` for ``y`` ``[...]``: ``[...]``."""
    y = y.to(mix.loc.dtype)
    parts = [
        component_log_prob(name, y, mix.loc[..., c], mix.scale[..., c], mix.df[..., c])
        for c, name in enumerate(mix.components)
    ]
    return torch.logsumexp(mix.log_weights + torch.stack(parts, -1), dim=-1)


def nll(mix: Mixture, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean negative log-likelihood over mask, number of masked-in values)``; 0 when none."""
    mask = mask.to(torch.bool)
    count = mask.sum()
    total = torch.where(mask, -log_prob(mix, torch.where(mask, y, 0.0)), 0.0).sum()
    return total / count.clamp_min(1), count


def mean(mix: Mixture) -> Tensor:
    """The mixture mean ``[...]`` (every component's mean is its ``loc``; df > 2 keeps t's finite)."""
    return (mix.log_weights.exp() * mix.loc).sum(-1)


def sample(mix: Mixture) -> Tensor:
    """One draw per value ``[...]`` from the torch global RNG (callers seed it inside
    ``torch.random.fork_rng`` so forecasts are reproducible and the caller's RNG is untouched)."""
    choice = torch.distributions.Categorical(logits=mix.log_weights).sample()
    loc = mix.loc.gather(-1, choice[..., None]).squeeze(-1)
    scale = mix.scale.gather(-1, choice[..., None]).squeeze(-1)
    draws = torch.zeros_like(loc)
    for c, name in enumerate(mix.components):
        chosen = choice == c
        if not bool(chosen.any()):
            continue
        if name == "normal":
            eps = torch.randn_like(loc)
        elif name == "laplace":
            u = torch.rand_like(loc) - 0.5
            eps = -torch.sign(u) * torch.log1p(-2.0 * u.abs()).clamp_min(-80.0)
        else:
            df = torch.nan_to_num(mix.df[..., c], nan=3.0)
            eps = torch.distributions.StudentT(df).sample()
        draws = torch.where(chosen, eps, draws)
    return loc + scale * draws


__all__ = [
    "COMPONENTS",
    "COMPONENT_PARAMS",
    "Mixture",
    "check_components",
    "component_log_prob",
    "log_prob",
    "mean",
    "nll",
    "num_raw_params",
    "sample",
    "split_params",
]
