"""Online dynamic pruning (MC-MoE ODP): tokens whose later experts carry little weight skip them.

Shape legend: T = tokens, K = slots per token, E = experts scored by the router.

:func:`dynamic_prune` wraps each MoE layer's router in a :class:`PrunedRouter` that
post-processes the :class:`~moekit.layers.RouterOutput`: slot j is dropped (id -1, weight 0)
when ``w_j < threshold * max_k w_k``; the top slot always stays. ``choice_ids_TK`` keeps the
router's original choice, so ``RoutingInfo`` tells how many expert calls were saved
(:func:`expert_calls_saved`). Parameter names are unchanged, so a pruned model loads and saves
the same checkpoints.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import moe_layers
from moekit.compress.config import PruneConfig
from moekit.layers import Router, RouterOutput


class PrunedRouter(Router):
    """A :class:`Router` whose output drops low-weight non-top slots.

    Shares the wrapped router's parameters and buffers (same state-dict keys).

    Args:
        router: the router to wrap.
        threshold: relative weight below which a non-top slot is dropped (0: never).
        renormalize: rescale surviving weights so each token's weight sum is unchanged.
    """

    def __init__(self, router: Router, threshold: float, renormalize: bool = True) -> None:
        nn.Module.__init__(self)
        for key, value in router.__dict__.items():
            self.__dict__[key] = dict(value) if key.startswith("_") and isinstance(value, dict) else value
        self.threshold, self.renormalize = threshold, renormalize

    def forward(self, x_TD: Tensor, token_mask_T=None, prev_logits_TE=None, k=None) -> RouterOutput:
        """As :meth:`Router.forward`, then prunes (see the module docstring)."""
        out = super().forward(x_TD, token_mask_T, prev_logits_TE, k)
        if self.threshold <= 0 or out.expert_ids_TK.shape[-1] < 2:
            return out
        w_TK = out.weights_TK
        top_T1 = w_TK.max(dim=-1, keepdim=True).values
        is_top_TK = torch.zeros_like(w_TK, dtype=torch.bool).scatter_(-1, w_TK.argmax(-1, keepdim=True), True)
        keep_TK = (out.expert_ids_TK >= 0) & ((w_TK >= self.threshold * top_T1) | is_top_TK)
        new_w = torch.where(keep_TK, w_TK, torch.zeros_like(w_TK))
        if self.renormalize:
            new_w = new_w * (w_TK.sum(-1, keepdim=True) / new_w.sum(-1, keepdim=True).clamp_min(1e-12))
        new_ids = torch.where(keep_TK, out.expert_ids_TK, torch.full_like(out.expert_ids_TK, -1))
        return replace(out, expert_ids_TK=new_ids, weights_TK=new_w)


def dynamic_prune(model: nn.Module, config: PruneConfig) -> nn.Module:
    """Installs :class:`PrunedRouter` in the chosen MoE layers (in place) and returns the model.

    A model already pruned is re-pruned from its original routers, so calling this again with a
    new threshold replaces the old one.
    """
    layers = moe_layers(model)
    chosen = range(len(layers)) if config.layers is None else config.layers
    for index in chosen:
        if not 0 <= index < len(layers):
            raise ValueError(f"PruneConfig.layers has {index}; the model has MoE layers 0..{len(layers) - 1}")
        router = layers[index].router
        if isinstance(router, PrunedRouter):
            router.threshold, router.renormalize = config.threshold, config.renormalize
        else:
            layers[index].router = PrunedRouter(router, config.threshold, config.renormalize)
    return model


def expert_calls_saved(routing: list) -> float:
    """Share of the router's (token, expert) choices that were not computed, over all layers.

    Args:
        routing: the ``routing`` list of a model output (one :class:`RoutingInfo` per MoE layer).
    """
    chosen = sum(int((r.choice_ids >= 0).sum()) for r in routing)
    computed = sum(int((r.expert_ids >= 0).sum()) for r in routing)
    return 1.0 - computed / max(chosen, 1)
