"""Aux-loss-free load balancing (DeepSeek-V3): nudge a per-expert selection bias after each step.

The bias lives in each router's ``expert_bias`` buffer and affects only which experts are chosen.
Counts come from the forward's :class:`~moekit.layers.moe.RoutingInfo` (padding already
excluded), so nothing is accumulated inside the layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def update_expert_bias(
    bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float, recenter: bool = True
) -> None:
    """In place: ``b_e += rate * sign(mean(c) - c_e)``; optionally recentred to mean 0.

    Args:
        bias_E: ``[E]`` the router's ``expert_bias`` buffer.
        tokens_per_expert_E: ``[E]`` assignment counts since the last update.
        rate: the bias update speed (DeepSeek-V3 uses 1e-3).
        recenter: subtract the mean so the bias does not drift as a whole (torchtitan does this).
    """
    counts = tokens_per_expert_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(counts.mean() - counts))
    if recenter:
        bias_E.sub_(bias_E.mean())


class ExpertBiasBalancer:
    """Collects per-layer counts from forwards and updates every router's expert bias on step.

    Usage::

        balancer = ExpertBiasBalancer(model, rate=1e-3)
        balancer.attach(optimizer)          # updates after every optimizer.step()
        out = model(...); balancer.observe(out.routing)   # list of RoutingInfo, one per MoE layer

    Args:
        model: any module; its MoE layers with ``use_expert_bias`` are found in module order.
        rate: bias update speed.
    """

    def __init__(self, model: nn.Module, rate: float = 1e-3, recenter: bool = True) -> None:
        from moekit.layers.moe import MoELayer

        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.rate, self.recenter = rate, recenter
        self._counts: list[Tensor | None] = [None] * len(self.layers)

    def observe(self, routing: Sequence) -> None:
        """Adds one forward's ``tokens_per_expert`` (a list aligned with the MoE layers)."""
        if len(routing) != len(self.layers):
            raise ValueError(
                f"got routing for {len(routing)} layers, the model has {len(self.layers)} MoE layers"
            )
        for i, info in enumerate(routing):
            c = info.tokens_per_expert.detach()
            self._counts[i] = c if self._counts[i] is None else self._counts[i] + c

    def step(self) -> None:
        """Applies the update to every layer that has an expert bias, then clears the counts."""
        for layer, counts in zip(self.layers, self._counts):
            bias = layer.router.expert_bias
            if bias is not None and counts is not None:
                if layer.stats_reduce is not None:  # expert/data parallel: count the global batch
                    counts = layer.stats_reduce(counts)
                update_expert_bias(bias, counts, self.rate, self.recenter)
        self._counts = [None] * len(self.layers)

    def attach(self, optimizer: torch.optim.Optimizer):
        """Registers :meth:`step` as an optimizer step post-hook; returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.step())
