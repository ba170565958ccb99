"""Data + expert parallel training support: what the trainer needs under ``torchrun``.

Every rank holds the replicated (non-expert) parameters and its own data; the experts are
sharded over all ranks by :func:`~moekit.parallel.parallelize_experts`. After backward,
:func:`sync_replicated_grads` averages the replicated gradients (what DDP would do, without
wrapping the model, so ``model.config`` and friends stay reachable); expert gradients are
already averaged by their hook. Gradient clipping uses the global norm. Checkpoints are written
by rank 0 in the single-device format (expert shards and their optimizer state gathered), so a
run on W ranks resumes on any number of ranks, or on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.parallel.expert_parallel import ExpertParallelExperts


@dataclass
class DistributedContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    group: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0


def init_from_env() -> DistributedContext | None:
    """Joins the process group that ``torchrun`` describes in the environment; None when alone.

    gloo on CPU, NCCL when CUDA is available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return DistributedContext(dist.get_rank(), dist.get_world_size())


def expert_param_ids(model: nn.Module) -> set[int]:
    """``id`` of every sharded expert parameter."""
    return {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in (m.w_in, m.w_out)}


@torch.no_grad()
def sync_replicated_grads(model: nn.Module, ctx: DistributedContext) -> None:
    """Averages the gradients of replicated parameters over all ranks (one flat all-reduce)."""
    sharded = expert_param_ids(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in sharded]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=ctx.group)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def clip_grad_norm_global(
    model: nn.Module, params: list[Tensor], max_norm: float, ctx: DistributedContext
) -> float:
    """Clips by the norm of the whole model's gradient: replicated parts once, shards summed over ranks."""
    sharded = expert_param_ids(model)
    rep = [p.grad for p in params if p.grad is not None and id(p) not in sharded]
    shard = [p.grad for p in params if p.grad is not None and id(p) in sharded]
    rep_sq = sum((g.double().square().sum() for g in rep), torch.zeros((), dtype=torch.float64))
    shard_sq = sum((g.double().square().sum() for g in shard), torch.zeros((), dtype=torch.float64))
    dist.all_reduce(shard_sq, group=ctx.group)
    norm = float((rep_sq + shard_sq).sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in rep + shard:
            g.mul_(scale)
    return norm


def _shards(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def gather_optimizer_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replaces shard-shaped optimizer tensors (``state/<param>/<key>``) with full gathered ones (collective)."""
    shards = _shards(model)
    out = {}
    for key in sorted(tensors):
        value = tensors[key]
        name = key.split("/")[1]
        owner = name.rsplit(".", 1)[0]
        if owner in shards and value.dim() > 0:
            m = shards[owner]
            parts = [torch.empty_like(value) for _ in range(m.world)]
            dist.all_gather(parts, value.contiguous(), group=m.group)
            value = torch.cat(parts, 0)
        out[key] = value
    return out


def slice_optimizer_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse on load: full-model optimizer tensors sliced to this rank's expert shards."""
    shards = _shards(model)
    out = {}
    for key, value in tensors.items():
        name = key.split("/")[1] if key.count("/") >= 2 else key
        owner = name.rsplit(".", 1)[0]
        if owner in shards and value.dim() > 0:
            m = shards[owner]
            value = value[m.first_expert : m.first_expert + m.num_local]
        out[key] = value
    return out
