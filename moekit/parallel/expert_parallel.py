"""Expert parallelism on torch.distributed, applied to a built model from outside.

Shape legend: T = local tokens, D = model width, K = slots per token, E = global FFN experts,
E_loc = experts on this rank, N = local (token, slot) assignments, M = rows this rank computes,
W = ranks in the expert-parallel group.

``parallelize_experts(model, group)`` replaces each MoE layer's storage (``experts``) with an
:class:`ExpertParallelExperts` holding this rank's contiguous shard of E / W experts, its
``dispatcher`` with an :class:`AllToAllDispatcher`, and sets the layer's ``stats_reduce`` so
balance losses, z-loss, entropy and aux-free bias counts cover the global batch. The model code
does not change: the layer calls ``dispatcher.dispatch``, which puts its all-to-alls between the
stages:

1. permute locally by global expert id (``moekit.layers.permute``);
2. exchange per-expert counts (all-to-all);
3. exchange token rows with variable split sizes (all-to-all, with autograd);
4. reorder the received rows expert-major and run the local experts;
5. undo the reorder, all-to-all the outputs back, combine locally.

Data parallelism: every rank holds the full non-expert parameters and its own data. Wrap the
model in DDP, telling it to ignore ``ddp_ignored_parameters(model)`` (the expert shards). Expert
gradients get a hook that divides them by W, matching DDP's averaging of the other gradients,
so a W-rank run equals the single-process run on the concatenated batch
(``tests/test_parallel.py`` checks forward, aux losses and every gradient in float64).

Capacity under EP is applied per rank on local tokens (as DeepSpeed and MegaBlocks do); the
single-process equality holds for dropless routing.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce as _all_reduce_with_grad
from torch.distributed.nn.functional import all_to_all_single as _all_to_all_single

from moekit.layers import Dispatcher, ExpertWeights, MoELayer, StackedExpertWeights, combine, permute
from moekit.layers.experts import SortedExpertsFunction


def _quiet(fn, *args, **kwargs):
    # torch 2.13 marks these autograd collectives deprecated in favour of functional collectives
    # that have no CPU autograd path for variable splits yet; silence only that notice.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*distributed.nn.functional.*")
        return fn(*args, **kwargs)


def all_to_all_single(*args, **kwargs):
    """Autograd all-to-all with variable splits (``torch.distributed.nn.functional``)."""
    return _quiet(_all_to_all_single, *args, **kwargs)


def all_reduce_with_grad(t: Tensor, group=None) -> Tensor:
    """Sum over the group whose backward sums the gradients too."""
    return _quiet(_all_reduce_with_grad, t, group=group)


def _group_size_rank(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def expert_shard(num_experts: int, world: int, rank: int) -> tuple[int, int]:
    """``(first_expert, num_local)`` of ``rank``'s contiguous shard; ValueError if W does not divide E."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"expert parallelism: rank {rank} is not in a group of {world}")
    if num_experts % world:
        raise ValueError(
            f"expert parallelism: {num_experts} experts do not divide over {world} ranks; "
            "choose an expert-parallel size that divides the number of experts"
        )
    num_local = num_experts // world
    return rank * num_local, num_local


class ExpertParallelExperts(ExpertWeights):
    """This rank's shard of a layer's experts (storage only; :class:`AllToAllDispatcher` moves
    the rows). Local expert ``i`` is global expert ``first_expert + i``.

    Parameters:
        w_in: ``[E_loc, H, D]``, experts ``first_expert .. first_expert + E_loc - 1``.
        w_out: ``[E_loc, D, F]``.
    """

    def __init__(self, full: StackedExpertWeights, group=None) -> None:
        super().__init__()
        world, rank = _group_size_rank(group)
        self.first_expert, self.num_local = expert_shard(full.num_experts, world, rank)
        self.group, self.world, self.rank = group, world, rank
        self.num_experts, self.dim, self.ffn_dim, self.activation = (
            full.num_experts,
            full.dim,
            full.ffn_dim,
            full.activation,
        )
        local = slice(self.first_expert, self.first_expert + self.num_local)
        self.w_in = nn.Parameter(full.w_in.detach()[local].clone())
        self.w_out = nn.Parameter(full.w_out.detach()[local].clone())
        # DDP averages the replicated parameters' gradients over W ranks; expert gradients already
        # sum the contributions of every rank's tokens, so divide them by W to match.
        for p in (self.w_in, self.w_out):
            p.register_hook(lambda g: g / self.world)

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """Local weights of global expert ``expert`` (must live on this rank)."""
        local = expert - self.first_expert
        if not 0 <= local < self.num_local:
            raise ValueError(f"expert {expert} is not on rank {self.rank}")
        return self.w_in[local], self.w_out[local]

    def stacked(self) -> None:
        """Not available: this rank holds a shard only."""
        return None

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Local expert i on the i-th contiguous slice (``counts`` has E_loc entries): ``[N, D]``."""
        return SortedExpertsFunction.apply(x_ND, self.w_in, self.w_out, counts, self.activation)

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.num_local - 1} of {self.num_experts} "
            f"on rank {self.rank}/{self.world}"
        )


class AllToAllDispatcher(Dispatcher):
    """Expert-parallel dispatch over ``group`` (see the module docstring) into an
    :class:`ExpertParallelExperts` shard. Reports backend ``"all_to_all"``."""

    def __init__(self, group=None) -> None:
        self.group = group

    def dispatch(
        self, experts: ExpertWeights, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str
    ) -> tuple[Tensor, str]:
        """``[T, D] -> [T, D]``: permute, exchange counts and rows, compute locally, send back, combine."""
        if not isinstance(experts, ExpertParallelExperts):
            raise ValueError(
                f"AllToAllDispatcher needs ExpertParallelExperts storage, got {type(experts).__name__}"
            )
        world, num_local = experts.world, experts.num_local
        # 1. local permute by global expert id
        x_ND, plan = permute(x_TD, expert_ids_TK, weights_TK, experts.num_experts)
        send_counts_E = torch.tensor(plan.counts, dtype=torch.long)
        # 2. counts: row r of recv_counts_WL = rows rank r sends to each of my local experts
        recv_counts = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts, send_counts_E, group=self.group)
        recv_counts_WL = recv_counts.view(world, num_local)
        send_splits = send_counts_E.view(world, num_local).sum(-1).tolist()
        recv_splits = recv_counts_WL.sum(-1).tolist()
        # 3. tokens
        x_MD = all_to_all_single(
            x_ND.new_empty(sum(recv_splits), experts.dim), x_ND, recv_splits, send_splits, group=self.group
        )
        # 4. rank-major -> expert-major, compute on the local storage
        order_M, local_counts = _rank_major_to_expert_major(recv_counts_WL)
        y_sorted = experts.forward_sorted(x_MD[order_M], local_counts)
        y_MD = torch.empty_like(y_sorted).index_copy(0, order_M, y_sorted)
        # 5. back to the senders, combine
        y_ND = all_to_all_single(
            y_MD.new_empty(x_ND.shape[0], experts.dim), y_MD, send_splits, recv_splits, group=self.group
        )
        return combine(y_ND, plan, x_TD.shape[0]), "all_to_all"

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(group={self.group!r})"


def _rank_major_to_expert_major(recv_counts_WL: Tensor) -> tuple[Tensor, list[int]]:
    """Permutation that sorts received rows (grouped by source rank, then expert) by expert."""
    world, num_local = recv_counts_WL.shape
    starts = torch.cumsum(recv_counts_WL.reshape(-1), 0) - recv_counts_WL.reshape(-1)
    starts_WL = starts.view(world, num_local)
    pieces = []
    for e in range(num_local):
        for r in range(world):
            n = int(recv_counts_WL[r, e])
            if n:
                pieces.append(torch.arange(int(starts_WL[r, e]), int(starts_WL[r, e]) + n))
    order = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return order, recv_counts_WL.sum(0).tolist()


def parallelize_experts(model: nn.Module, group=None) -> nn.Module:
    """Shards every MoE layer's experts over ``group`` (default: the world), in place.

    Returns the model. Call after ``torch.distributed.init_process_group`` and before building
    the optimizer; every rank must have built the same model (same seed) first.
    """
    if not dist.is_initialized():
        raise ValueError("parallelize_experts: torch.distributed is not initialised; launch with torchrun")

    def reduce(t: Tensor) -> Tensor:
        return all_reduce_with_grad(t, group=group)

    for layer in model.modules():
        if isinstance(layer, MoELayer):
            if not isinstance(layer.experts, StackedExpertWeights):
                raise ValueError(
                    f"parallelize_experts: layer has {type(layer.experts).__name__}, expected stacked experts"
                )
            layer.experts = ExpertParallelExperts(layer.experts, group)
            layer.dispatcher = AllToAllDispatcher(group)
            layer.stats_reduce = reduce
    return model


def ddp_ignored_parameters(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters, for ``DDP._set_params_and_buffers_to_ignore_for_model``."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
        for name in (f"{name}.w_in", f"{name}.w_out")
    ]


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The single-device state dict, gathering expert shards from every rank (collective).

    Keys and shapes equal the unsharded model's, so a checkpoint saved from W ranks loads on any
    other number of ranks, or on one process.
    """
    state = {}
    shards = {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in shards:
            m = shards[owner]
            parts = [torch.empty_like(value) for _ in range(m.world)]
            dist.all_gather(parts, value.contiguous(), group=m.group)
            value = torch.cat(parts, 0)
        state[key] = value.detach().clone()
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Loads a single-device state dict into a (possibly) expert-parallel model: each rank takes its slice."""
    shards = {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}
    local = {}
    for key, value in state.items():
        owner = key.rsplit(".", 1)[0]
        if owner in shards:
            m = shards[owner]
            if value.shape[0] != m.num_experts:
                raise ValueError(f"{key}: checkpoint has {value.shape[0]} experts, the model {m.num_experts}")
            value = value[m.first_expert : m.first_expert + m.num_local]
        local[key] = value
    model.load_state_dict(local)
