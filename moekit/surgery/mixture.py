"""Mixture of dense models (mergekit-moe; Branch-Train-MiX, Sukhbaatar et al. 2024): several dense
fine-tunes of one base become one MoE whose experts are their FFNs.

Shape legend: D = model width, F = FFN width, H = FFN input rows, E = number of dense models
(experts), N = prompt tokens.

Attention, embeddings and norms are averaged over the fine-tunes (BTX) or taken from the base
(mergekit's usual choice). Router rows follow mergekit's ``gate_mode: hidden``: for each expert,
the mean hidden state of its positive prompts at each layer's FFN input (computed with the base
model), normalised to unit length, then scaled so the logits on all prompts have
``router_logit_std`` standard deviation. Differences from mergekit: no negative prompts, the
hidden state is the post-attention-norm FFN input (what the router sees) averaged over all prompt
tokens rather than the residual stream, and the scale is set by the logit std.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.config import JsonConfig, check_choice
from moekit.models import MoEForCausalLM
from moekit.surgery.common import (
    Batches,
    as_batches,
    build_model,
    collect_ffn_inputs,
    router_rows_from_directions,
)
from moekit.surgery.upcycle import LAYER_CHOICES, UpcycleConfig, upcycled_model_config

SHARED_POLICIES = ("average", "base")
MIX_ROUTER_INITS = ("hidden", "random", "zeros")


@dataclass(kw_only=True)
class MixtureConfig(JsonConfig):
    """How to combine dense fine-tunes.

    Attributes:
        layers: which FFNs become MoE: ``"all"``, ``"every_other"``, ``"explicit"``.
        layer_indices: for ``"explicit"``.
        top_k: experts per token (mergekit's ``experts_per_token``, default 2).
        shared: non-FFN weights (and FFNs of layers left dense): ``"average"`` of the fine-tunes or
            the ``"base"``'s.
        router_init: ``"hidden"`` (needs prompts per expert), ``"random"`` (N(0, 0.02)) or ``"zeros"``.
        router_logit_std: logit std on the prompts for ``"hidden"``.
        moe_overrides: other MoEConfig fields.
        aux_loss_coef: the merged model's load-balance coefficient.
        seed: for ``"random"``.
    """

    layers: str = "all"
    layer_indices: tuple[int, ...] | None = None
    top_k: int = 2
    shared: str = "average"
    router_init: str = "hidden"
    router_logit_std: float = 1.0
    moe_overrides: dict[str, Any] = field(default_factory=dict)
    aux_loss_coef: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        name = "MixtureConfig"
        check_choice(name, "layers", self.layers, LAYER_CHOICES)
        check_choice(name, "shared", self.shared, SHARED_POLICIES)
        check_choice(name, "router_init", self.router_init, MIX_ROUTER_INITS)
        if self.top_k < 1:
            raise ValueError(f"{name}.top_k must be >= 1, got {self.top_k}")
        if self.router_logit_std <= 0:
            raise ValueError(f"{name}.router_logit_std must be positive, got {self.router_logit_std}")

    def upcycle_config(self, num_experts: int) -> UpcycleConfig:
        """The equivalent :class:`UpcycleConfig` (placement and MoE fields)."""
        if self.top_k > num_experts:
            raise ValueError(f"MixtureConfig.top_k={self.top_k} exceeds the {num_experts} dense models")
        return UpcycleConfig(
            layers=self.layers,
            layer_indices=self.layer_indices,
            num_experts=num_experts,
            top_k=self.top_k,
            router_init="zeros",
            moe_overrides=self.moe_overrides,
            aux_loss_coef=self.aux_loss_coef,
            seed=self.seed,
        )


def check_same_shapes(base: MoEForCausalLM, models: Sequence[MoEForCausalLM]) -> None:
    """Raises ``ValueError`` naming the first tensor whose name set or shape differs from the base's."""
    ref = base.state_dict()
    for k, m in enumerate(models):
        other = m.state_dict()
        for name in sorted(set(ref) | set(other)):
            if name not in other or name not in ref:
                where = "missing from" if name not in other else "extra in"
                raise ValueError(f"moe-merge: tensor {name!r} is {where} model {k} compared with the base")
            if ref[name].shape != other[name].shape:
                raise ValueError(
                    f"moe-merge: tensor {name!r} has shape {tuple(other[name].shape)} in model {k} but "
                    f"{tuple(ref[name].shape)} in the base; models must share the base's shapes"
                )


@torch.no_grad()
def merge_dense_models(
    base: MoEForCausalLM,
    models: Sequence[MoEForCausalLM],
    config: MixtureConfig,
    prompts: Sequence[Batches] | None = None,
) -> MoEForCausalLM:
    """Builds an MoE whose experts are the FFNs of ``models`` (dense fine-tunes of ``base``).

    Args:
        base: the common dense base; not modified.
        models: E dense fine-tunes with the base's shapes; not modified.
        config: :class:`MixtureConfig`.
        prompts: for ``router_init="hidden"``, one entry per model: ``[B, S]`` batches of prompts
            that model should handle.

    Returns:
        An MoE with E experts per MoE layer; expert e of layer i is ``models[e]``'s FFN of layer i.
    """
    if not models:
        raise ValueError("moe-merge: give at least one dense model")
    for k, m in enumerate([base, *models]):
        if m.config.num_moe_layers:
            raise ValueError(f"moe-merge: model {k - 1 if k else 'base'} has MoE layers; give dense models")
    check_same_shapes(base, models)
    num_e = len(models)
    new_cfg = upcycled_model_config(base.config, config.upcycle_config(num_e))
    moe_ids = new_cfg.moe_layer_ids
    states = [m.state_dict() for m in models]
    state = {}
    for name, t in base.state_dict().items():
        if config.shared == "average":
            state[name] = torch.stack([s[name].to(torch.float64) for s in states]).mean(0)
        else:
            state[name] = t.detach().clone().to(torch.float64)
    rows: dict[int, torch.Tensor] = {}
    if config.router_init == "hidden":
        if prompts is None or len(prompts) != num_e or not all(as_batches(p) for p in prompts):
            raise ValueError(
                f"moe-merge: router_init='hidden' needs prompt batches for each of the {num_e} models"
            )
        per_expert = [collect_ffn_inputs(base, p, moe_ids) for p in prompts]
        for i in moe_ids:
            means = torch.stack([feats[i].to(torch.float64).mean(0) for feats in per_expert])
            all_x = torch.cat([feats[i] for feats in per_expert])
            rows[i] = router_rows_from_directions(means, all_x, config.router_logit_std)
    gen = torch.Generator().manual_seed(config.seed)
    for i in moe_ids:
        p = f"layers.{i}.mlp."
        state[p + "experts.w_in"] = torch.stack([s[p + "w_in.weight"] for s in states]).to(torch.float64)
        state[p + "experts.w_out"] = torch.stack([s[p + "w_out.weight"] for s in states]).to(torch.float64)
        for k in ("w_in.weight", "w_out.weight", "w_in.bias", "w_out.bias"):
            state.pop(p + k, None)
        if config.router_init == "hidden":
            state[p + "router.weight"] = rows[i]
        elif config.router_init == "random":
            state[p + "router.weight"] = (
                torch.randn(num_e, base.config.dim, generator=gen, dtype=torch.float64) * 0.02
            )
        else:
            state[p + "router.weight"] = torch.zeros(num_e, base.config.dim, dtype=torch.float64)
        moe = new_cfg.moe_config(i)
        if moe.router_bias:
            state[p + "router.bias"] = torch.zeros(num_e, dtype=torch.float64)
        if moe.use_expert_bias:
            state[p + "router.expert_bias"] = torch.zeros(num_e, dtype=torch.float64)
        if moe.gating_residual:
            state[p + "router.residual_weight"] = torch.zeros(num_e, num_e, dtype=torch.float64)
    return build_model(new_cfg, state, next(base.parameters()).dtype)
