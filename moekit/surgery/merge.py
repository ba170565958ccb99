"""Expert merging: fold similar experts of each MoE layer into fewer experts (agglomerative pairing,
weight averaging), in the spirit of MC-SMoE / HC-SMoE style merging.

Shape legend: E = experts before, M = experts after, D = model width, H/F as in
``moekit.layers.experts``, N = calibration tokens of one layer.

Router rows: the routing mass of a merged group under softmax is ``sum_i exp(w_i . x)``, i.e. the
exact merged logit is ``logsumexp_i(w_i . x)``, which no single linear row can produce. We use the
(usage-weighted) mean row, the first-order approximation for rows that are close. With
``router_merge="mean_logn_bias"`` a bias of ``log(group size)`` is added (turning ``router_bias`` on),
which makes the approximation exact when the member logits are equal: the merged expert then keeps
the group's total prior mass rather than one member's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import JsonConfig, check_choice
from moekit.layers.experts import activate
from moekit.models import MoEForCausalLM
from moekit.surgery.common import (
    Batches,
    as_batches,
    build_model,
    clone_state,
    collect_ffn_inputs,
    expert_usage,
    require_plain_experts,
)

SIMILARITIES = ("weight", "output")
ROUTER_MERGES = ("mean", "mean_logn_bias")


@dataclass(kw_only=True)
class MergeConfig(JsonConfig):
    """How to merge experts.

    Attributes:
        num_experts: M, experts left in every MoE layer (>= top_k).
        similarity: ``"weight"`` (cosine of the flattened expert weights) or ``"output"`` (cosine
            of the experts' outputs on calibration FFN inputs).
        usage_weighted: average weights (and router rows) weighted by calibration token counts.
        router_merge: ``"mean"`` or ``"mean_logn_bias"`` (see the module doc).
        max_tokens: calibration tokens per layer used for output similarity.
    """

    num_experts: int
    similarity: str = "weight"
    usage_weighted: bool = False
    router_merge: str = "mean"
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        check_choice("MergeConfig", "similarity", self.similarity, SIMILARITIES)
        check_choice("MergeConfig", "router_merge", self.router_merge, ROUTER_MERGES)
        if self.num_experts < 1:
            raise ValueError(f"MergeConfig.num_experts must be >= 1, got {self.num_experts}")
        if self.max_tokens < 1:
            raise ValueError(f"MergeConfig.max_tokens must be >= 1, got {self.max_tokens}")


def agglomerate(sim_EE: Tensor, num_groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering on a similarity matrix ``[E, E]``: repeatedly merges
    the two most similar groups until ``num_groups`` remain. Groups are sorted by their first id."""
    groups = [[e] for e in range(sim_EE.shape[0])]
    sim = sim_EE.to(torch.float64)
    while len(groups) > num_groups:
        best, pair = -math.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = float(sim[groups[a]][:, groups[b]].mean())
                if s > best:
                    best, pair = s, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return sorted(groups)


def expert_similarity(w_in_EHD: Tensor, w_out_EDF: Tensor, activation: str, x_ND: Tensor | None) -> Tensor:
    """Cosine similarity ``[E, E]`` of experts: of their weights, or (with ``x_ND``) their outputs."""
    num_e = w_in_EHD.shape[0]
    if x_ND is None:
        flat = torch.cat([w_in_EHD.reshape(num_e, -1), w_out_EDF.reshape(num_e, -1)], 1)
    else:
        x = x_ND.to(w_in_EHD.dtype)
        flat = torch.stack(
            [(activate(x @ w_in_EHD[e].t(), activation) @ w_out_EDF[e].t()).reshape(-1) for e in range(num_e)]
        )
    flat = flat.to(torch.float64)
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return flat @ flat.t()


@torch.no_grad()
def merge_experts(
    model: MoEForCausalLM, config: MergeConfig, calibration: Batches | None = None
) -> MoEForCausalLM:
    """Merges each MoE layer's experts into ``config.num_experts`` groups.

    Args:
        model: a moekit MoE model (FFN experts, no gating residual); not modified.
        config: :class:`MergeConfig`.
        calibration: ``[B, S]`` batches, needed for ``similarity="output"`` or ``usage_weighted``.

    Returns:
        A new model with ``experts_per_layer = (M, ...)``. The groups are stored as
        ``model.merged_groups`` (per MoE layer, lists of old expert ids).
    """
    require_plain_experts(model, "merge")
    cfg = model.config
    ids = cfg.moe_layer_ids
    if not ids:
        raise ValueError("merge: the model has no MoE layer")
    for i in ids:
        moe = cfg.moe_config(i)
        if config.num_experts > moe.num_experts:
            raise ValueError(
                f"MergeConfig.num_experts={config.num_experts} exceeds the {moe.num_experts} experts of layer {i}"
            )
        if config.num_experts < moe.top_k:
            raise ValueError(
                f"MergeConfig.num_experts={config.num_experts} is below top_k={moe.top_k} of layer {i}"
            )
        if moe.gating_residual:
            raise ValueError(f"merge: layer {i} uses a gating residual, which merging does not support")
    needs_data = config.similarity == "output" or config.usage_weighted
    if needs_data and not as_batches(calibration):
        raise ValueError("merge: similarity='output' and usage_weighted need calibration batches")
    usage = expert_usage(model, calibration, "tokens") if config.usage_weighted else None
    feats = (
        collect_ffn_inputs(model, calibration, ids, config.max_tokens)
        if config.similarity == "output"
        else {}
    )
    state = clone_state(model)
    all_groups = []
    add_bias = config.router_merge == "mean_logn_bias"
    for j, i in enumerate(ids):
        p = f"layers.{i}.mlp."
        w_in, w_out = state[p + "experts.w_in"], state[p + "experts.w_out"]
        moe = cfg.moe_config(i)
        sim = expert_similarity(w_in, w_out, moe.activation, feats.get(i))
        groups = agglomerate(sim, config.num_experts)
        all_groups.append(groups)
        weight = (
            usage[j].clamp_min(1e-6)
            if usage is not None
            else torch.ones(moe.num_experts, dtype=torch.float64)
        )
        new = {
            k: []
            for k in ("experts.w_in", "experts.w_out", "router.weight", "router.bias", "router.expert_bias")
        }
        for g in groups:
            a = weight[g] / weight[g].sum()
            for k in new:
                if p + k in state:
                    t = state[p + k][g]
                    coef = a.to(t.dtype).reshape(-1, *([1] * (t.ndim - 1)))
                    new[k].append((t * coef).sum(0))
        for k, rows in new.items():
            if rows:
                state[p + k] = torch.stack(rows)
        if add_bias:
            logn = torch.tensor([math.log(len(g)) for g in groups], dtype=state[p + "router.weight"].dtype)
            state[p + "router.bias"] = state.get(p + "router.bias", torch.zeros_like(logn)) + logn
    moe_t = cfg.moe
    assert moe_t is not None
    if add_bias:
        moe_t = moe_t.replace(router_bias=True)
    new_cfg = cfg.replace(moe=moe_t, experts_per_layer=tuple(config.num_experts for _ in ids))
    out = build_model(new_cfg, state, next(model.parameters()).dtype)
    out.merged_groups = all_groups
    return out
