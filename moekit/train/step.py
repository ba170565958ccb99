"""The pieces of one optimizer step that :func:`moekit.train.engine.fit` runs, and the distributed save."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moekit.train import checkpoint as ckpt
from moekit.train.loop_config import LoopConfig
from moekit.train.runlog import to_device


def save_distributed(model, optimizer, param_names, state, commit, data, data_tensors, config, root, is_main):
    """Every rank gathers (collectives); rank 0 writes the single-device format."""
    from moekit.parallel import distributed as dist_mod
    from moekit.parallel import full_state_dict

    full = full_state_dict(model)
    flat_tensors, flat_meta = ckpt.flatten_optimizer(optimizer, param_names)
    flat_tensors = dist_mod.gather_optimizer_tensors(model, flat_tensors)
    if is_main:
        with torch.random.fork_rng(devices=[]):  # building the copy must not move this rank's RNG
            shadow = type(model)(model.config)
        shadow.load_state_dict(full)
        ckpt.save_checkpoint(
            root, shadow, None, optimizer, param_names, state, commit.rng,
            extra_tensors=data_tensors, keep_previous=config.keep_previous,
            optimizer_flat=(flat_tensors, flat_meta), save_artifacts=data.save_artifacts,
        )  # fmt: skip
    torch.distributed.barrier()
    return root / ckpt.LAST


def accumulate_gradients(model, objective, data, config, moe_k, balancer, device, autocast) -> dict[str, Any]:
    """Forward and backward over ``grad_accum`` micro-batches; returns the step's metrics."""
    n = config.grad_accum
    totals: dict[str, float] = {"loss": 0.0}
    aux_parts: dict[str, float] = {}
    tpe: list[Tensor] = []
    entropy: list[float] = []
    for _ in range(n):
        batch = to_device(data.next_train_batch(), device)
        with autocast():
            output = objective.forward(model, batch, moe_k)
        out = objective.loss(output, batch)
        (out.loss / n).backward()
        if balancer is not None:
            balancer.observe(out.routing)
        totals["loss"] += float(out.loss.detach()) / n
        for name, value in out.metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach()) / n
        for name, value in (out.aux_losses or {}).items():
            aux_parts[name] = aux_parts.get(name, 0.0) + float(value.detach()) / n
        for i, info in enumerate(out.routing or []):
            counts = info.tokens_per_expert.detach().float().cpu()
            if i < len(tpe):
                tpe[i] = tpe[i] + counts
                entropy[i] += float(info.router_entropy) / n
            else:
                tpe.append(counts)
                entropy.append(float(info.router_entropy) / n)
    return {**totals, "aux": aux_parts, "_tpe": tpe, "_entropy": entropy}


def clip_gradients(model, optimizer, config: LoopConfig, ctx) -> float:
    """Clips the gradients to ``grad_clip`` (global norm) and returns the norm before clipping."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if ctx is not None:
        from moekit.parallel import distributed as dist_mod

        dist_mod.sync_replicated_grads(model, ctx)
        return dist_mod.clip_grad_norm_global(model, params, config.grad_clip, ctx)
    if config.grad_clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=False))
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def train_record(step, num_items, lr, moe_k, window, dt, config: LoopConfig) -> dict[str, Any]:
    """The ``train`` log record: metrics averaged over the steps in ``window``."""
    n = len(window)
    metric_names = [k for k in window[-1] if k not in ("aux", "grad_norm") and not k.startswith("_")]
    aux_names = sorted({k for r in window for k in r["aux"]})
    return {
        "event": "train",
        "step": step,
        "num_tokens": num_items,
        **{k: sum(r.get(k, 0.0) for r in window) / n for k in metric_names},
        "aux_losses": {k: sum(r["aux"].get(k, 0.0) for r in window) / n for k in aux_names},
        "lr": lr,
        "moe_k": moe_k,
        "grad_norm": sum(r["grad_norm"] for r in window) / n,
        "tokens_per_s": config.items_per_step / max(dt, 1e-9),
    }
