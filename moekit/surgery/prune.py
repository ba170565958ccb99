"""Expert pruning (Kim et al. 2021, "Scalable and Efficient MoE Training for Multitask Multilingual
Models", DeepSpeed): keep the M most-used experts of each MoE layer, slice the router to their rows,
and let the softmax re-normalise over the survivors.

Shape legend: E = experts before, M = experts kept, D = model width, H/F as in ``moekit.layers.experts``.

Usage is measured on a calibration set (held-out text, or one task's text for a task-specific
deployment): assignments per expert (``"tokens"``) or the gate weight each expert received
(``"gate_mass"``). ``"random"`` keeps M random experts, the baseline. Routing over survivors is
the original softmax restricted to their logits, i.e. re-normalised; with ``norm_topk_prob`` the
chosen weights are renormalised again as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import JsonConfig, check_choice
from moekit.models import MoEForCausalLM
from moekit.surgery.common import (
    Batches,
    as_batches,
    build_model,
    clone_state,
    expert_usage,
    require_plain_experts,
)

PRUNE_METRICS = ("tokens", "gate_mass", "random")


@dataclass(kw_only=True)
class PruneConfig(JsonConfig):
    """Which experts survive.

    Attributes:
        num_keep: M, experts kept in every MoE layer (must be >= the layer's top_k).
        metric: ``"tokens"``, ``"gate_mass"`` or ``"random"``.
        seed: for ``"random"``.
    """

    num_keep: int
    metric: str = "tokens"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("PruneConfig", "metric", self.metric, PRUNE_METRICS)
        if self.num_keep < 1:
            raise ValueError(f"PruneConfig.num_keep must be >= 1, got {self.num_keep}")


def slice_moe_state(state: dict[str, Tensor], prefix: str, keep: Tensor) -> None:
    """Keeps experts ``keep`` (sorted int64 ids) in the MoE layer under ``prefix`` (in place):
    router rows (and bias, expert bias, gating-residual rows and columns) and expert stacks."""
    for name in (
        "router.weight",
        "router.bias",
        "router.expert_bias",
        "experts.w_in",
        "experts.w_out",
        "experts.b_in",
        "experts.b_out",
    ):
        if prefix + name in state:
            state[prefix + name] = state[prefix + name][keep].clone()
    if prefix + "router.residual_weight" in state:
        state[prefix + "router.residual_weight"] = state[prefix + "router.residual_weight"][keep][
            :, keep
        ].clone()


def choose_survivors(
    usage: list[Tensor] | None,
    num_experts: list[int],
    config: PruneConfig,
    num_groups: list[int] | None = None,
) -> list[Tensor]:
    """The sorted expert ids kept in each MoE layer: the ``num_keep`` largest usages (ties -> lower id),
    or random ones. With ``num_groups[j] = G > 1`` (group-limited routing, groups are contiguous id
    blocks) each group keeps its own ``num_keep / G`` best, so the groups survive intact."""
    out = []
    gen = torch.Generator().manual_seed(config.seed)
    for j, num_e in enumerate(num_experts):
        num_g = num_groups[j] if num_groups else 1
        size, per_group = num_e // num_g, config.num_keep // num_g
        kept = []
        for g in range(num_g):
            if config.metric == "random":
                local = torch.randperm(size, generator=gen)[:per_group]
            else:
                assert usage is not None
                # Stable sort on -usage: among equal usages the lower id wins, so results are reproducible.
                local = torch.sort(-usage[j][g * size : (g + 1) * size], stable=True).indices[:per_group]
            kept.append(local + g * size)
        out.append(torch.cat(kept).sort().values)
    return out


@torch.no_grad()
def prune_experts(
    model: MoEForCausalLM,
    config: PruneConfig,
    calibration: Batches | None = None,
    usage: list[Tensor] | None = None,
) -> MoEForCausalLM:
    """Keeps the ``num_keep`` most-used experts of every MoE layer.

    Args:
        model: a moekit MoE model (FFN experts only); not modified.
        config: :class:`PruneConfig`.
        calibration: ``[B, S]`` batches to measure usage on (not needed for ``"random"`` or when
            ``usage`` is given).
        usage: precomputed per-layer ``[E]`` usage (e.g. from a routing trace's ``load()``).

    Returns:
        A new model with ``experts_per_layer = (M, ...)``; router ``[M, D]``, experts
        ``[M, H, D]`` / ``[M, D, F]``.

    Raises:
        ValueError: ``num_keep`` exceeds a layer's experts or is below its ``top_k``.
    """
    require_plain_experts(model, "prune")
    cfg = model.config
    ids = cfg.moe_layer_ids
    if not ids:
        raise ValueError("prune: the model has no MoE layer")
    num_experts = [cfg.moe_config(i).num_experts for i in ids]
    for i, num_e in zip(ids, num_experts):
        moe = cfg.moe_config(i)
        if config.num_keep > num_e:
            raise ValueError(
                f"PruneConfig.num_keep={config.num_keep} exceeds the {num_e} experts of layer {i}"
            )
        if moe.num_expert_groups > 1 and config.num_keep % moe.num_expert_groups:
            raise ValueError(
                f"PruneConfig.num_keep={config.num_keep} is not a multiple of layer {i}'s "
                f"num_expert_groups={moe.num_expert_groups}: group-limited routing needs equal groups"
            )
        if moe.router_type != "expert_choice" and config.num_keep < moe.top_k:
            raise ValueError(
                f"PruneConfig.num_keep={config.num_keep} leaves fewer experts than top_k={moe.top_k} in layer {i}; "
                f"keep at least {moe.top_k} or lower moe.top_k first"
            )
    if config.metric != "random" and usage is None:
        if not as_batches(calibration):
            raise ValueError(f"prune: metric={config.metric!r} needs calibration batches (or usage)")
        usage = expert_usage(model, calibration, config.metric)
    num_groups = [cfg.moe_config(i).num_expert_groups for i in ids]
    survivors = choose_survivors(usage, num_experts, config, num_groups)
    state = clone_state(model)
    for i, keep in zip(ids, survivors):
        slice_moe_state(state, f"layers.{i}.mlp.", keep)
    try:
        new_cfg = cfg.replace(experts_per_layer=tuple(int(k.numel()) for k in survivors))
    except ValueError as err:
        raise ValueError(f"prune: the pruned config is invalid: {err}") from err
    out = build_model(new_cfg, state, next(model.parameters()).dtype)
    out.pruned_experts = [k.tolist() for k in survivors]
    return out
