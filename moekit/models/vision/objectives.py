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


@torch.no_grad()
def retrieval_r1(model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[str, float]:
    """Recall@1 both ways over all pairs of ``batches`` (eval mode). A retrieved text counts as right
    when its token ids equal the image's own caption (generated captions repeat)."""
    was = model.training
    model.eval()
    imgs, txts, ids = [], [], []
    try:
        for b in batches:
            out = model(
                input_ids=b["input_ids"], pixel_values=b["pixel_values"], attention_mask=b["attention_mask"]
            )
            imgs.append(out.image_embeds)
            txts.append(out.text_embeds)
            ids.append(b["input_ids"])
    finally:
        model.train(was)
    img, txt, tok = torch.cat(imgs), torch.cat(txts), torch.cat(ids)
    same_NN = (tok[:, None, :] == tok[None, :, :]).all(-1)
    sim = img @ txt.t()
    i2t = same_NN[torch.arange(len(tok)), sim.argmax(1)].float().mean()
    t2i = same_NN[sim.argmax(0), torch.arange(len(tok))].float().mean()
    return {"image_to_text_r1": float(i2t), "text_to_image_r1": float(t2i)}


def _vqa_forward(model: nn.Module, batch: dict[str, Tensor], moe_k: int | None = None) -> Any:
    # signal_values only when the batch has them, so image-only VLMs (MoE-LLaVA) take these batches.
    extra = {"signal_values": batch["signal_values"]} if "signal_values" in batch else {}
    return model(
        input_ids=batch["input_ids"],
        pixel_values=batch.get("pixel_values"),
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        moe_k=moe_k,
        **extra,
    )


def _answer_hits(logits_BSV: Tensor, labels_BS: Tensor) -> Tensor:
    # Position t predicts labels[t + 1]; every row has exactly one answer label.
    pred_BS = logits_BSV[:, :-1].argmax(-1)
    target_BS = labels_BS[:, 1:]
    keep_BS = target_BS != -100
    return (pred_BS == target_BS)[keep_BS]


class VQAObjective(Objective):
    """Answer-token cross-entropy (``labels`` are -100 elsewhere) plus weighted aux losses, for a
    model taking ``input_ids``, ``pixel_values``, ``attention_mask``, ``labels`` (and
    ``signal_values`` when the batch has them): :class:`~moekit.models.vision.unimoe.UniMoE`,
    :class:`~moekit.models.vision.llava.MoELLaVA`; logs ``ce`` and ``accuracy``."""

    def __init__(self, weights: LossWeights) -> None:
        self.weights = weights

    def forward(self, model: nn.Module, batch: dict[str, Tensor], moe_k: int | None = None) -> Any:
        """The model on the batch's text and its modality's inputs."""
        return _vqa_forward(model, batch, moe_k)

    def loss(self, output: Any, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """``CE + weighted aux``."""
        ce = output.lm_loss
        aux = self.weights.weighted(output.aux_losses or {}, ce)
        acc = _answer_hits(output.logits, batch["labels"]).float().mean()
        return ObjectiveOutput(
            loss=ce + aux,
            metrics={"ce": ce, "aux_loss": aux, "accuracy": acc},
            aux_losses=output.aux_losses or {},
            routing=list(output.routing or []),
        )

    def eval_loss(self, output: Any, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Mean answer CE and the number of answers."""
        return output.lm_loss, int((batch["labels"] != -100).sum())


@torch.no_grad()
def vqa_accuracy(model: nn.Module, batches: list[dict[str, Tensor]]) -> tuple[float, list[float] | None]:
    """Exact-answer accuracy over ``batches`` (eval mode), and each expert's share of the routed
    slots summed over MoE layers (None for a dense model)."""
    was = model.training
    model.eval()
    right = total = 0
    counts = None
    try:
        for b in batches:
            out = _vqa_forward(model, b)
            hits = _answer_hits(out.logits, b["labels"])
            right, total = right + int(hits.sum()), total + hits.numel()
            for r in out.routing or []:
                c = r.tokens_per_expert
                counts = c if counts is None else counts + c
    finally:
        model.train(was)
    usage = None if counts is None else (counts / counts.sum()).tolist()
    return right / max(total, 1), usage


@torch.no_grad()
def vqa_accuracy_by_question(model: nn.Module, batches: list[dict[str, Tensor]]) -> dict[int, float]:
    """Exact-answer accuracy per question, keyed by the question's token id (the token before the
    answer), over ``batches`` (eval mode)."""
    was = model.training
    model.eval()
    right: dict[int, int] = {}
    total: dict[int, int] = {}
    try:
        for b in batches:
            out = _vqa_forward(model, b)
            keep_BS = b["labels"][:, 1:] != -100
            hits = _answer_hits(out.logits, b["labels"])
            questions = b["input_ids"][:, :-1][keep_BS]
            for q, h in zip(questions.tolist(), hits.tolist(), strict=True):
                right[q] = right.get(q, 0) + int(h)
                total[q] = total.get(q, 0) + 1
    finally:
        model.train(was)
    return {q: right[q] / total[q] for q in sorted(total)}
