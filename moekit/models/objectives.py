"""Training objectives: how a model family turns a batch into a loss (floor 3).

An :class:`Objective` runs the model its own way (:meth:`Objective.forward`) and scores the output
(:meth:`Objective.loss`): the task loss plus the MoE aux losses weighted by its
:class:`LossWeights`. The weights belong to the objective (set from the training config), not to
the model. The training engine (:func:`moekit.train.fit`) calls only these methods, so a new family
(time series, vision, distillation) trains through the same loop by bringing its own objective and
data module.

The causal-LM cross-entropy is written once, here (:func:`token_cross_entropy`); the model's
``forward(labels=...)``, the LM objective and surgery's helpers all call it.

Shape legend: B = batch, S = sequence length, V = vocabulary, N = scored positions.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import JsonConfig

# The aux losses an objective can weight, in the (fixed) order they are summed.
AUX_LOSS_NAMES = ("load_balance", "z_loss", "seq_balance", "entropy")
# Where a model config keeps its recommended weight for each (the Hugging Face convention:
# ``router_aux_loss_coef`` lives in the model config there too).
MODEL_CONFIG_COEFS = {
    "load_balance": "aux_loss_coef",
    "z_loss": "z_loss_coef",
    "seq_balance": "seq_balance_coef",
    "entropy": "entropy_loss_coef",
}


def token_cross_entropy(logits_BSV: Tensor, targets_BS: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of aligned logits and targets, in float32 (float64 for a float64 model); targets
    of -100 are ignored.

    At least fp32 because a bf16 log-softmax over a large vocabulary loses about two digits of the loss.
    ``"mean"`` is sum / count, so a batch with no targets gives 0 rather than NaN; ``"sum"`` is the sum.
    """
    logits_NV = logits_BSV.reshape(-1, logits_BSV.shape[-1]).to(_loss_dtype(logits_BSV))
    targets_N = targets_BS.reshape(-1).to(logits_NV.device)
    total = F.cross_entropy(logits_NV, targets_N, ignore_index=-100, reduction="sum")
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"token_cross_entropy: reduction={reduction!r}; use 'mean' or 'sum'")
    return total / (targets_N != -100).sum().clamp_min(1)


def _loss_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def causal_lm_loss(logits_BSV: Tensor, labels_BS: Tensor) -> Tensor:
    """Mean next-token cross-entropy, Hugging Face convention: position t predicts ``labels[t + 1]``.

    The labels shift, not the logits: the last position gets target -100 (ignored), so the same
    terms are summed without copying ``logits[:, :-1]`` in the forward and zero-filling a full
    ``[B, S, V]`` gradient to scatter it back in the backward (transformers does the same).
    """
    return token_cross_entropy(logits_BSV, shifted_labels(labels_BS))


def shifted_labels(labels_BS: Tensor) -> Tensor:
    """Hugging Face's shift as targets aligned with the positions: ``[B, S]``, position t gets
    ``labels[t + 1]`` and the last position -100 (ignored)."""
    return F.pad(labels_BS[:, 1:], (0, 1), value=-100)


@dataclass(kw_only=True)
class LossWeights(JsonConfig):
    """Coefficients of the MoE aux losses (each averaged over MoE layers by the model).

    Attributes:
        load_balance: Switch-style load-balance loss.
        z_loss: router z-loss.
        seq_balance: DeepSeek-V3 sequence-wise balance loss.
        entropy: top-p routing's dynamic (entropy) loss.
    """

    load_balance: float = 0.0
    z_loss: float = 0.0
    seq_balance: float = 0.0
    entropy: float = 0.0

    def __post_init__(self) -> None:
        for name in AUX_LOSS_NAMES:
            if getattr(self, name) < 0:
                raise ValueError(f"LossWeights.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_model_config(cls, config: Any, **overrides: float | None) -> LossWeights:
        """The model config's recommended coefficients, with any non-None ``overrides`` (by aux name)."""
        values = {name: float(getattr(config, attr, 0.0) or 0.0) for name, attr in MODEL_CONFIG_COEFS.items()}
        values.update({k: float(v) for k, v in overrides.items() if v is not None})
        return cls(**values)

    def weighted(self, aux_losses: Mapping[str, Tensor], like: Tensor) -> Tensor:
        """Scalar ``sum(weight * aux)`` (float32, or float64 when ``like`` is) over the losses present with a non-zero weight.

        Only those losses are read, so lazily computed ones nobody weights are never computed.
        """
        dtype = _loss_dtype(like)
        total = like.new_zeros((), dtype=dtype)
        for name in AUX_LOSS_NAMES:
            coef = getattr(self, name)
            if coef and name in aux_losses:
                total = total + coef * aux_losses[name].to(dtype)
        return total


@dataclass
class ObjectiveOutput:
    """What :meth:`Objective.loss` returns for one micro-batch.

    Attributes:
        loss: scalar to backpropagate (task loss + weighted aux).
        metrics: scalar tensors to log (averaged over micro-batches and log windows), e.g. ``lm_loss``.
        aux_losses: the unweighted aux losses (logged under ``aux_losses``).
        routing: one :class:`~moekit.layers.RoutingInfo` per MoE layer (expert load statistics and
            the aux-loss-free bias update); empty for dense models.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    aux_losses: Mapping[str, Tensor] = field(default_factory=dict)
    routing: list[Any] = field(default_factory=list)


class Objective(ABC):
    """A training objective: ``forward(model, batch)`` then ``loss(output, batch)``.

    The engine runs :meth:`forward` under autocast and :meth:`loss` outside it, divides the loss by
    the number of micro-batches and backpropagates. :meth:`evaluate` is the validation score.

    Attributes:
        weights: the aux-loss coefficients.
    """

    weights: LossWeights

    @abstractmethod
    def forward(self, model: nn.Module, batch: Any, moe_k: int | None = None) -> Any:
        """Runs ``model`` on ``batch`` (``moe_k``: experts per token from the k schedule, or None)."""

    @abstractmethod
    def loss(self, output: Any, batch: Any) -> ObjectiveOutput:
        """The training loss of one micro-batch: task loss plus weighted aux losses."""

    @abstractmethod
    def eval_loss(self, output: Any, batch: Any) -> tuple[Tensor, int]:
        """``(mean task loss, number of items it averages)`` of one validation batch."""

    def __call__(self, model: nn.Module, batch: Any, moe_k: int | None = None) -> ObjectiveOutput:
        """``loss(forward(model, batch, moe_k), batch)``, for callers that need no autocast split."""
        return self.loss(self.forward(model, batch, moe_k), batch)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: list[Any], moe_k: int | None = None, autocast=contextlib.nullcontext
    ) -> float:
        """Item-weighted mean task loss over ``batches``, in eval mode (no router noise)."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for batch in batches:
                with autocast():
                    out = self.forward(model, batch, moe_k)
                loss, n = self.eval_loss(out, batch)
                total += float(loss) * n
                count += n
        finally:
            model.train(was_training)
        return total / max(count, 1)


class CausalLMObjective(Objective):
    """Next-token cross-entropy plus weighted aux losses, for ``[B, S + 1]`` token batches.

    The model sees ``batch[:, :-1]`` and is scored on ``batch[:, 1:]``. Logged metrics: ``lm_loss``
    and ``aux_loss`` (the weighted aux total).

    Args:
        weights: aux-loss coefficients (:meth:`LossWeights.from_model_config` gives a model's own).
    """

    def __init__(self, weights: LossWeights) -> None:
        self.weights = weights

    def forward(self, model: nn.Module, batch: Tensor, moe_k: int | None = None) -> Any:
        """``model(batch[:, :-1], moe_k=moe_k)``; a model with ``supports_fused_loss`` scores
        ``batch[:, 1:]`` itself, chunk by chunk, without the logits (``return_logits=False``)."""
        if getattr(model, "supports_fused_loss", False):
            return model(batch[:, :-1], moe_k=moe_k, shift_labels=batch[:, 1:], return_logits=False)
        return model(batch[:, :-1], moe_k=moe_k)

    @staticmethod
    def _lm_loss(output: Any, batch: Tensor) -> Tensor:
        if getattr(output, "logits", None) is None:
            return output.lm_loss  # computed by the model on batch[:, 1:] (see forward)
        return token_cross_entropy(output.logits, batch[:, 1:])

    def loss(self, output: Any, batch: Tensor) -> ObjectiveOutput:
        """``lm_loss + weighted aux``."""
        lm_loss = self._lm_loss(output, batch)
        aux_losses = output.aux_losses or {}
        aux = self.weights.weighted(aux_losses, lm_loss)
        return ObjectiveOutput(
            loss=lm_loss + aux,
            metrics={"lm_loss": lm_loss, "aux_loss": aux},
            aux_losses=aux_losses,
            routing=list(output.routing or []),
        )

    def eval_loss(self, output: Any, batch: Tensor) -> tuple[Tensor, int]:
        """Mean LM loss and the number of target tokens."""
        return self._lm_loss(output, batch), batch[:, 1:].numel()


__all__ = [
    "AUX_LOSS_NAMES",
    "CausalLMObjective",
    "LossWeights",
    "Objective",
    "ObjectiveOutput",
    "causal_lm_loss",
    "shifted_labels",
    "token_cross_entropy",
]
