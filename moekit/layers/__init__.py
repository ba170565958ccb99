"""moekit.layers: the one MoE layer that every model family uses.

Contract:
    ``MoELayer(MoEConfig)(x, token_mask=None, prev_logits=None, k=None) -> MoEOutput(hidden,
    routing, aux_losses)``. ``x`` is ``[..., D]``. ``aux_losses`` holds unweighted scalars; the
    trainer applies coefficients. ``routing`` is a :class:`RoutingInfo` of tensors only.

Layout:
    config.py    MoEConfig / FFNConfig dataclasses (validated, JSON round-trip)
    router.py    routers (top-k softmax/sigmoid with groups and bias, top-p, random-fixed,
                 expert-choice), noise, gating residual, capacity with score/position/RTS drops
    experts.py   ExpertWeights interface, stacked default, dense FeedForward
    dispatch.py  permute -> expert_compute -> combine, backends eager/sorted/grouped_mm
    losses.py    balance (all / first choice / sequence-wise, heterogeneous tau), z-loss, entropy
    balance.py   aux-loss-free expert-bias updates, applied as an optimizer-step hook
    moe.py       MoELayer, RoutingInfo, MoEOutput

This package imports nothing else from moekit except ``moekit.config``. To add a router, add a
branch in ``Router.forward`` returning a ``RouterOutput`` with -1/0 padding, a choice in
``config.ROUTER_TYPES``, and an oracle test in ``tests/test_layers_oracle.py``. To add an expert
storage (offload, quantized, sharded), subclass ``ExpertWeights`` and assign it to
``layer.experts``.
"""

from moekit.layers.balance import ExpertBiasBalancer, update_expert_bias
from moekit.layers.config import FFNConfig, MoEConfig
from moekit.layers.dispatch import combine, expert_compute, permute, routed_experts
from moekit.layers.experts import ExpertWeights, FeedForward, StackedExpertWeights
from moekit.layers.moe import MoELayer, MoEOutput, RoutingInfo, dense_equivalent
from moekit.layers.router import Router, RouterOutput, apply_capacity

__all__ = [
    "ExpertBiasBalancer",
    "ExpertWeights",
    "FFNConfig",
    "FeedForward",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Router",
    "RouterOutput",
    "RoutingInfo",
    "StackedExpertWeights",
    "apply_capacity",
    "combine",
    "dense_equivalent",
    "expert_compute",
    "permute",
    "routed_experts",
    "update_expert_bias",
]
