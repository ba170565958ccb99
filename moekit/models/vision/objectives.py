"""Training objectives of the vision family (see :class:`moekit.models.objectives.Objective`).

Batches are dicts of tensors: ``{"pixel_values", "labels"}`` (+ ``"task"``, an int64 scalar, for
task-level MoE) for classification, ``{"pixel_values", "input_ids", "attention_mask"}`` for CLIP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.models.objectives import LossWeights, Objective, ObjectiveOutput
from moekit.models.vision.clip import contrastive_loss


def _task_of(batch: dict[str, Any]) -> int | None:
    task = batch.get("task")
    return None if task is None else int(task)


class ClassificationObjective(Objective):
    """Cross-entropy of the (task's) head plus weighted aux losses; logs ``ce`` and ``accuracy``.

    Args:
        weights: aux-loss coefficients (``LossWeights.from_model_config(vit_config)`` gives the model's).
    """

    def __init__(self, weights: LossWeights) -> None:
        self.weights = weights

    def forward(self, model: nn.Module, batch: dict[str, Tensor], moe_k: int | None = None) -> Any:
        """``model(pixel_values, task=batch.get("task"), moe_k=moe_k)``."""
        return model(batch["pixel_values"], task=_task_of(batch), moe_k=moe_k)

    def loss(self, output: Any, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """``CE + weighted aux``."""
        ce = F.cross_entropy(output.logits.float(), batch["labels"])
        aux = self.weights.weighted(output.aux_losses or {}, ce)
        acc = (output.logits.argmax(-1) == batch["labels"]).float().mean()
        return ObjectiveOutput(
            loss=ce + aux,
            metrics={"ce": ce, "aux_loss": aux, "accuracy": acc},
            aux_losses=output.aux_losses or {},
            routing=list(output.routing or []),
        )

    def eval_loss(self, output: Any, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Mean CE and the number of images."""
        return F.cross_entropy(output.logits.float(), batch["labels"]), int(batch["labels"].numel())


class ContrastiveObjective(Objective):
    """CLIP's symmetric contrastive loss plus weighted aux losses; logs ``contrastive``."""

    def __init__(self, weights: LossWeights) -> None:
        self.weights = weights

    def forward(self, model: nn.Module, batch: dict[str, Tensor], moe_k: int | None = None) -> Any:
        """``model(input_ids, pixel_values, attention_mask, moe_k=moe_k)``."""
        return model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch.get("attention_mask"),
            moe_k=moe_k,
        )

    def loss(self, output: Any, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """``contrastive + weighted aux``."""
        con = contrastive_loss(output.logits_per_image)
        aux = self.weights.weighted(output.aux_losses or {}, con)
        return ObjectiveOutput(
            loss=con + aux,
            metrics={"contrastive": con, "aux_loss": aux},
            aux_losses=output.aux_losses or {},
            routing=list(output.routing or []),
        )

    def eval_loss(self, output: Any, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Mean contrastive loss and the number of pairs."""
        return contrastive_loss(output.logits_per_image), int(batch["input_ids"].shape[0])


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[dict[str, Tensor]], moe_k: int | None = None) -> float:
    """Top-1 accuracy of a classifier over ``batches`` (eval mode)."""
    was = model.training
    model.eval()
    right = total = 0
    try:
        for b in batches:
            out = model(b["pixel_values"], task=_task_of(b), moe_k=moe_k)
            right += int((out.logits.argmax(-1) == b["labels"]).sum())
            total += int(b["labels"].numel())
    finally:
        model.train(was)
    return right / max(total, 1)
