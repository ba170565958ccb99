"""Task-level MoE (M3ViT / Edge-MoE's software model): which experts each task uses, and a model
holding only one task's experts.

Shape legend: E = experts of an MoE layer, E' = experts one task keeps, D = width.

With task-conditioned routers (``MoEConfig.num_tasks``), a task's tokens reach only some experts.
:func:`extract_task_model` keeps exactly the experts a task activated on the given data and folds
the task conditioning into a plain router: the ``"embed"`` router's task vector becomes the router
bias, the ``"multi_gate"`` router's gate becomes ``W + W_task``. The chosen experts are the same and,
because weights are renormalised over the chosen experts (``norm_topk_prob``), so are their
weights: the extracted model gives the same outputs on that data (tested), with less memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.layers.moe import MoELayer
from moekit.models.vision.vit import ViTMoE


@torch.no_grad()
def task_expert_counts(model: ViTMoE, batches: list[dict[str, Tensor]], task: int) -> list[Tensor]:
    """Per MoE layer, ``[E]`` int64 assignments each expert received from ``task``'s tokens on
    ``batches`` (their ``"task"`` entries are ignored; ``task`` is used)."""
    was = model.training
    model.eval()
    counts: list[Tensor] = []
    try:
        for b in batches:
            out = model(b["pixel_values"], task=task)
            for i, info in enumerate(out.routing):
                num_e = info.router_logits.shape[-1]
                ids = info.expert_ids[info.expert_ids >= 0]
                c = torch.bincount(ids, minlength=num_e).cpu()
                counts[i : i + 1] = [c] if i >= len(counts) else [counts[i] + c]
    finally:
        model.train(was)
    return counts


@dataclass
class TaskExtraction:
    """What :func:`extract_task_model` returns.

    Attributes:
        model: the single-task :class:`ViTMoE` (its ``head`` is the task's head).
        task: the task index in the source model.
        kept_experts: per MoE layer, the source expert ids kept, in order.
        num_params_full: parameters of the multi-task model.
        num_params_task: parameters of the extracted model.
        bytes_saved: memory not loaded, at the source dtype.
        expert_share: per MoE layer, ``E' / E``.
    """

    model: ViTMoE
    task: int
    kept_experts: list[list[int]]
    num_params_full: int
    num_params_task: int
    bytes_saved: int
    expert_share: list[float] = field(default_factory=list)


def _check_exact(moe: MoELayer) -> None:
    cfg = moe.config
    exact = cfg.router_type == "topk" and cfg.score_func == "softmax" and cfg.num_expert_groups == 1
    exact = exact and (cfg.norm_topk_prob or cfg.softmax_order == "after_topk")
    if not exact or cfg.num_total_experts != cfg.num_experts or cfg.capacity_factor is not None:
        raise ValueError(
            "extract_task_model needs plain top-k softmax routers with renormalised weights "
            "(norm_topk_prob=True), no zero-computation experts and no capacity limit, so dropping "
            "unused experts leaves every output unchanged"
        )


@torch.no_grad()
def extract_task_model(model: ViTMoE, task: int, batches: list[dict[str, Tensor]]) -> TaskExtraction:
    """A :class:`ViTMoE` with only ``task``'s head and the experts ``task`` activated on ``batches``
    (or, under a ``task_num_experts`` budget, the task's expert set: exact for every input).

    Args:
        model: a task-level ViT (``task_num_classes`` with MoE layers routed per task).
        task: which task.
        batches: the data that decides which experts the task uses (``{"pixel_values"}``).

    Raises:
        ValueError: the model is not task-level, the task is out of range, or a router whose
            weights would change when experts are dropped (see :func:`_check_exact`).
    """
    cfg = model.config
    if not cfg.task_num_classes or not model.moe_layers:
        raise ValueError("extract_task_model needs a task-level ViT (task_num_classes and MoE layers)")
    if not 0 <= task < len(cfg.task_num_classes):
        raise ValueError(f"task={task} is outside [0, {len(cfg.task_num_classes)})")
    for moe in model.moe_layers:
        _check_exact(moe)
    counts = task_expert_counts(model, batches, task)
    kept = []
    for moe, c in zip(model.moe_layers, counts):
        if moe.config.task_num_experts:  # a hard budget: the task's set, whatever the input
            kept.append(torch.nonzero(moe.router.task_experts_mask()[task]).flatten().tolist())
        else:
            kept.append(torch.nonzero(c > 0).flatten().tolist())
    template = cfg.moe.replace(num_tasks=0, task_routing="embed", task_num_experts=0, router_bias=True)
    new_cfg = cfg.replace(
        moe=template,
        experts_per_layer=tuple(len(k) for k in kept),
        task_num_classes=(),
        num_classes=cfg.task_num_classes[task],
    )
    small = ViTMoE(new_cfg).to(next(model.parameters()).dtype)
    src = model.state_dict()
    dst = small.state_dict()
    moe_prefixes = {
        f"encoder.layers.{i}.mlp.": j
        for j, i in enumerate(i for i, layer in enumerate(model.encoder.layers) if layer.is_moe)
    }
    for name in dst:
        prefix = next((p for p in moe_prefixes if name.startswith(p)), None)
        if name.startswith("head."):
            dst[name].copy_(src[f"heads.{task}." + name[len("head.") :]])
        elif prefix is None:
            dst[name].copy_(src[name])
        else:
            ids = torch.tensor(kept[moe_prefixes[prefix]])
            rest = name[len(prefix) :]
            if rest == "router.bias":
                bias = src.get(prefix + "router.bias")
                task_vec = src.get(prefix + "router.task_logits")
                total = torch.zeros_like(dst[name])
                if bias is not None:
                    total += bias[ids]
                if task_vec is not None:
                    total += task_vec[task][ids]
                dst[name].copy_(total)
            elif rest == "router.weight":
                w = src[name][ids]
                if prefix + "router.task_weight" in src:
                    w = w + src[prefix + "router.task_weight"][task][ids]
                dst[name].copy_(w)
            else:
                dst[name].copy_(src[name][ids])
    small.load_state_dict(dst)
    small.eval()
    itemsize = next(model.parameters()).element_size()
    full, mine = model.num_parameters(), small.num_parameters()
    shares = [len(k) / len(c) for k, c in zip(kept, counts)]
    return TaskExtraction(small, task, kept, full, mine, (full - mine) * itemsize, shares)
