"""Diversified multiplet upcycling (CLIP-MoE DMU, Zhang et al. 2024) for a decoder LM.

Shape legend: B = sequences, S = tokens per sequence, D = model width, E = experts = clusters.

Steps, following CLIP-MoE's one-stage form:

1. Cluster the training *sequences* (CLIP-MoE clusters whole samples) with spherical k-means on the
   mean FFN input of the middle upcycled layer, computed with the dense model: E clusters.
2. For each cluster c, fine-tune a copy of the dense model on cluster c's sequences with the LM loss,
   only the FFNs of the layers to upcycle trainable (CLIP-MoE's ``--lock-except-mlp``).
3. Assemble the MoE: experts of layer i are the E fine-tuned FFNs of layer i; everything else comes
   from the dense model; router row c of layer i = the centroid (mean FFN input of cluster c's
   tokens at layer i, dense model), normalised and scaled to ``router_logit_std``.
4. Train only the routers (``FREEZE_GROUPS["all_but_router"]``) on all sequences.

Step 2 above is ``recipe="per_cluster_only"`` (the default, what this module always did). The
paper's recipe is ``recipe="multiplet"``: the dense model is expert 0, and stage s = 1 .. E-1
fine-tunes a copy on *all* sequences with every batch drawn from one cluster (clusters in turn),
then re-clusters with the stage model and refines the labels (``label * E + new``); the stage
models' FFNs are the experts. For CLIP itself see :mod:`moekit.surgery.multiplet`.

Differences from CLIP-MoE: the LM loss instead of InfoNCE, one feature space (the middle layer's
FFN input) instead of separate image/text clusterings, and centroid-initialised instead of random
routers (under ``"multiplet"`` the centroids of the first clustering, so rows are spread but not
tied to an expert). The cheaper alternative the paper does not use (regressing each FFN copy on its
cluster's hidden states alone) is not implemented.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from moekit.config import JsonConfig, check_choice
from moekit.models import MoEForCausalLM
from moekit.surgery.common import (
    Batches,
    as_batches,
    collect_ffn_inputs,
    kmeans,
    router_rows_from_directions,
    train_steps,
)
from moekit.surgery.multiplet import cluster_batches
from moekit.surgery.upcycle import UpcycleConfig, upcycle, upcycle_layer_ids

DMU_RECIPES = ("per_cluster_only", "multiplet")


@dataclass(kw_only=True)
class DMUConfig(JsonConfig):
    """Diversified multiplet upcycling.

    Attributes:
        upcycle: placement, E (``num_experts``) and k; ``expert_init``/``router_init`` are replaced.
        ffn_steps: fine-tuning steps of each FFN copy on its cluster.
        ffn_lr: their learning rate.
        router_steps: router-only training steps after assembly (0 to skip).
        router_lr: their learning rate.
        router_logit_std: logit std of the centroid router rows on the calibration tokens.
        batch_size: sequences per step.
        seed: seeds k-means and training.
        recipe: ``"per_cluster_only"`` (expert c fine-tuned on cluster c only) or ``"multiplet"``
            (the paper: the dense model plus E-1 stages on all data, batches one cluster at a time).
    """

    upcycle: UpcycleConfig = field(default_factory=lambda: UpcycleConfig(num_experts=4, top_k=2))
    ffn_steps: int = 30
    ffn_lr: float = 1e-3
    router_steps: int = 30
    router_lr: float = 1e-2
    router_logit_std: float = 1.0
    batch_size: int = 8
    seed: int = 0
    recipe: str = "per_cluster_only"

    def __post_init__(self) -> None:
        name = "DMUConfig"
        check_choice(name, "recipe", self.recipe, DMU_RECIPES)
        if isinstance(self.upcycle, dict):
            self.upcycle = UpcycleConfig.from_dict(self.upcycle)
        for f in ("ffn_steps", "router_steps", "batch_size"):
            if getattr(self, f) < (1 if f == "batch_size" else 0):
                raise ValueError(
                    f"{name}.{f} must be >= {1 if f == 'batch_size' else 0}, got {getattr(self, f)}"
                )
        for f in ("ffn_lr", "router_lr", "router_logit_std"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{name}.{f} must be positive, got {getattr(self, f)}")


def dmu_upcycle(dense_model: MoEForCausalLM, config: DMUConfig, sequences: Batches) -> MoEForCausalLM:
    """Diversified multiplet upcycling of a dense model.

    Args:
        dense_model: dense moekit model; not modified.
        config: :class:`DMUConfig`.
        sequences: ``[B, S + 1]`` training windows (inputs ``[:, :-1]``, targets ``[:, 1:]``); at
            least E of them.

    Returns:
        The MoE (eval mode). ``model.dmu_clusters`` holds the cluster id of each input sequence.
    """
    rows_BS = torch.cat(as_batches(sequences))
    num_e = config.upcycle.num_experts
    if rows_BS.shape[0] < num_e:
        raise ValueError(f"dmu: {rows_BS.shape[0]} sequences cannot form {num_e} clusters")
    layer_ids = upcycle_layer_ids(dense_model.config, config.upcycle)
    mid = layer_ids[len(layer_ids) // 2]
    inputs = rows_BS[:, :-1]
    feats = collect_ffn_inputs(dense_model, list(inputs.split(config.batch_size)), layer_ids)
    seq_len = inputs.shape[1]
    seq_feat = feats[mid].reshape(rows_BS.shape[0], seq_len, -1).mean(1)
    _, assign = kmeans(seq_feat, num_e, seed=config.seed)
    ffn_regex = "|".join(str(i) for i in layer_ids)
    freeze = [rf"re:^(?!layers\.({ffn_regex})\.mlp\.w_)"]
    if config.recipe == "multiplet":
        experts = _multiplet_stages(dense_model, config, rows_BS, assign, layer_ids, mid, freeze)
    else:
        experts = _per_cluster_stages(dense_model, config, rows_BS, assign, freeze)
    moe = upcycle(dense_model, config.upcycle.replace(expert_init="copy", router_init="zeros"))
    with torch.no_grad():
        for i in layer_ids:
            mlp = moe.layers[i].mlp
            mlp.experts.w_in.copy_(torch.stack([m.layers[i].mlp.w_in.weight for m in experts]))
            mlp.experts.w_out.copy_(torch.stack([m.layers[i].mlp.w_out.weight for m in experts]))
            x_TD = feats[i].reshape(rows_BS.shape[0], seq_len, -1)
            cents = torch.stack(
                [
                    x_TD[assign == c].reshape(-1, x_TD.shape[-1]).to(torch.float64).mean(0)
                    for c in range(num_e)
                ]
            )
            rows = router_rows_from_directions(cents, feats[i], config.router_logit_std)
            mlp.router.weight.copy_(rows.to(mlp.router.weight.dtype))
    if config.router_steps:
        train_steps(
            moe,
            list(rows_BS.split(config.batch_size)),
            config.router_steps,
            config.router_lr,
            ["all_but_router"],
            seed=config.seed,
        )
    moe.eval()
    moe.dmu_clusters = assign
    return moe


def _per_cluster_stages(dense_model, config: DMUConfig, rows_BS, assign, freeze) -> list[MoEForCausalLM]:
    """Expert c = the dense model fine-tuned on cluster c's sequences only."""
    experts = []
    for c in range(config.upcycle.num_experts):
        member = rows_BS[assign == c]
        tuned = copy.deepcopy(dense_model)
        if config.ffn_steps:
            train_steps(
                tuned,
                list(member.split(config.batch_size)),
                config.ffn_steps,
                config.ffn_lr,
                freeze,
                seed=config.seed + c,
            )
        experts.append(tuned)
    return experts


def _multiplet_stages(
    dense_model, config: DMUConfig, rows_BS, assign, layer_ids, mid, freeze
) -> list[MoEForCausalLM]:
    """Expert 0 = the dense model; stage s fine-tunes on all sequences, batches one cluster at a time."""
    num_e = config.upcycle.num_experts
    inputs = rows_BS[:, :-1]
    labels = assign
    experts = [dense_model]
    for s in range(1, num_e):
        tuned = copy.deepcopy(dense_model)
        if config.ffn_steps:
            idx = cluster_batches(labels, config.batch_size, config.seed + s)
            train_steps(
                tuned,
                [rows_BS[i] for i in idx],
                config.ffn_steps,
                config.ffn_lr,
                freeze,
                seed=config.seed + s,
            )
        experts.append(tuned)
        feats = collect_ffn_inputs(tuned, list(inputs.split(config.batch_size)), [mid])[mid]
        _, new = kmeans(
            feats.reshape(rows_BS.shape[0], inputs.shape[1], -1).mean(1), num_e, seed=config.seed + s
        )
        _, labels = torch.unique(labels * num_e + new, return_inverse=True)
    return experts
