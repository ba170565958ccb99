"""What the causal LM returns (:class:`CausalLMOutput`) and the per-layer aux-loss average it carries.

Shape legend: B = batch, S = positions, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.blocks import KVCache
from moekit.layers import RoutingInfo
from moekit.layers.moe import AuxLosses


@dataclass
class CausalLMOutput:
    """What :meth:`MoEForCausalLM.forward` returns.

    Attributes:
        loss: scalar ``lm_loss + aux_loss``, or None without labels (Hugging Face convention: the
            aux losses weighted by the ModelConfig's recommended coefficients, as transformers does
            with ``router_aux_loss_coef``). Training uses an objective's own weights instead.
        lm_loss: scalar mean next-token cross-entropy over non-ignored labels, or None.
        logits: ``[B, S, V]``, or None when ``forward(return_logits=False)`` computed the loss
            without them (:mod:`moekit.kernels.linear_ce`).
        aux_losses: unweighted aux losses averaged over MoE layers (``load_balance``,
            ``load_balance_first``, ``seq_balance``, ``z_loss``, ``entropy``), each computed on
            first access; empty for dense models.
        routing: one :class:`~moekit.layers.RoutingInfo` per MoE layer, in layer order.
        past_key_values: the :class:`KVCache` when ``use_cache``, else None.
        aux_loss: (property) float32 scalar, the coefficient-weighted aux total (0 for dense
            models). Computed on first access, so decoding, which never reads it, never pays for it.
    """

    loss: Tensor | None
    lm_loss: Tensor | None
    logits: Tensor | None
    aux_losses: Mapping[str, Tensor] = field(default_factory=dict)
    routing: list[RoutingInfo] = field(default_factory=list)
    past_key_values: KVCache | None = None
    aux_loss_fn: Callable[[], Tensor] | None = field(default=None, repr=False)

    @property
    def aux_loss(self) -> Tensor:
        """Scalar float32: the weighted aux-loss total (computed once, on first access)."""
        if "_aux_loss" not in self.__dict__:
            fn = self.aux_loss_fn
            self.__dict__["_aux_loss"] = fn() if fn is not None else torch.zeros((), dtype=torch.float32)
        return self.__dict__["_aux_loss"]


def mean_aux_losses(layer_aux: list[Mapping[str, Tensor]]) -> Mapping[str, Tensor]:
    """Averages per-layer aux losses lazily: a loss no one reads is never computed."""
    if not layer_aux:
        return {}
    names = list(layer_aux[0])

    def mean_of(name: str):
        return lambda: torch.stack([aux[name].float() for aux in layer_aux]).mean()

    return AuxLosses({name: mean_of(name) for name in names})
