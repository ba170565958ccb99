"""moekit.layers: the one MoE layer that every model family uses.

Contract:
    ``MoELayer(MoEConfig)(x, token_mask=None, prev_logits=None, k=None) -> MoEOutput(hidden,
    routing, aux_losses, backend)``. ``x`` is ``[..., D]``. ``aux_losses`` holds unweighted
    scalars; the trainer applies coefficients. ``routing`` is a :class:`RoutingInfo` of tensors
    only; ``backend`` names the expert compute path that ran.

    A layer is three parts: ``router`` (parameters + a registered routing strategy),
    ``experts`` (storage: tensors, stacked views, the sorted forward) and ``dispatcher`` (how
    rows reach the storage: locally, over all-to-all, from an offload cache). Storage and
    dispatch are swapped independently; ``routing_override`` replaces routing for a while
    (SCMoE's weak pass) through :meth:`MoELayer.override_routing`.

Layout:
    config.py    MoEConfig / FFNConfig dataclasses (validated, JSON round-trip)
    strategies.py  router strategies, one class per router_type (top-k softmax/sigmoid with
                 groups and bias, top-k after-softmax, random-fixed, top-p, expert-choice,
                 centroid), each validating its fields; RouterOutput
    centroids.py kmeans (k-means++), fit_centroids: token-cluster gating's centroids from a
                 (dense) model's FFN inputs
    router.py    Router: parameters, logits (noise, gating residual), route_small for decode;
                 capacity with score/position/RTS drops
    experts.py   storage: ExpertWeights interface, stacked default, biased experts (ViT/CLIP),
                 sorted forward, FeedForward
    lora.py      LoRA experts (Uni-MoE, ``expert_kind="lora"``): one frozen base FFN, per-expert
                 adapters on every projection; merge_lora_experts
    dispatch.py  Dispatcher, LocalDispatcher: permute -> expert_compute -> combine, backends
                 eager/sorted/grouped_mm (imports experts.py, never the reverse)
    losses.py    balance (all / first choice / sequence-wise, heterogeneous tau), z-loss, entropy
    balance.py   aux-loss-free expert-bias updates, applied as an optimizer-step hook
    moe.py       MoELayer, RoutingInfo, MoEOutput

This package imports nothing else from moekit except ``moekit.config``. To add a router, write a
``strategies.RouterStrategy`` subclass (``check`` its fields, ``route``, and ``select`` when every
token gets exactly k experts), register it in ``strategies.ROUTER_STRATEGIES``, and add an oracle
case to ``tests/test_layers_oracle.py``. To add an expert storage (quantized, sharded), subclass
``ExpertWeights`` and assign it to ``layer.experts``; task-level MoE (M3ViT) is
``MoEConfig.num_tasks`` plus ``task_ids`` in the forward; to change how rows reach it (all-to-all,
prefetch), subclass ``dispatch.Dispatcher`` and assign it to ``layer.dispatcher``.
"""

from moekit.layers.balance import ExpertBiasBalancer, update_expert_bias
from moekit.layers.centroids import fit_centroids, kmeans
from moekit.layers.config import FFNConfig, MoEConfig
from moekit.layers.dispatch import (
    Dispatcher,
    LocalDispatcher,
    combine,
    expert_compute,
    permute,
    routed_experts,
)
from moekit.layers.experts import BiasedExpertWeights, ExpertWeights, FeedForward, StackedExpertWeights
from moekit.layers.lora import LoRAExpertWeights, merge_lora_experts
from moekit.layers.moe import (
    MoELayer,
    MoEOutput,
    RoutingInfo,
    RoutingOverride,
    build_expert_storage,
    dense_equivalent,
    require_plain_expert_math,
)
from moekit.layers.router import Router, apply_capacity
from moekit.layers.strategies import ROUTER_STRATEGIES, RouterOutput, RouterStrategy

__all__ = [
    "ROUTER_STRATEGIES",
    "BiasedExpertWeights",
    "Dispatcher",
    "ExpertBiasBalancer",
    "ExpertWeights",
    "FFNConfig",
    "FeedForward",
    "LoRAExpertWeights",
    "LocalDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Router",
    "RouterOutput",
    "RouterStrategy",
    "RoutingOverride",
    "RoutingInfo",
    "StackedExpertWeights",
    "apply_capacity",
    "build_expert_storage",
    "combine",
    "dense_equivalent",
    "require_plain_expert_math",
    "expert_compute",
    "fit_centroids",
    "kmeans",
    "merge_lora_experts",
    "permute",
    "routed_experts",
    "update_expert_bias",
]
