"""Routers: from token states to (expert ids, weights) per token.

Shape legend: T = tokens, D = model width, E = experts the router scores (FFN plus
zero-computation), K = experts per token (padded to K_max), G = expert groups.

The routing math lives in :mod:`moekit.layers.strategies` (one class per ``router_type``); the
:class:`Router` owns the parameters, computes logits, and asks its strategy. A router returns a
:class:`RouterOutput`. Unused slots (top-p tokens with fewer experts, expert
choice, dropped or padding tokens) hold expert id -1 and weight 0, so every shape is static and
nothing calls ``.item()``: routing works under ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import MoEConfig
from moekit.layers.strategies import RouterOutput, RouterStrategy, strategy_for


def _routing_dtype(x: Tensor) -> torch.dtype:
    # Gating runs in at least fp32: bf16 logits flip top-k choices between runs and devices.
    return torch.promote_types(x.dtype, torch.float32)


class Router(nn.Module):
    """Scores tokens against experts and picks experts per token.

    Parameters:
        weight: ``[E, D]`` router projection (``bias`` ``[E]`` when ``router_bias``); None for
            ``router_type="centroid"``, whose logits are distances to the ``centroids`` buffer
            ``[E, D]`` (persistent, never trained; set by :func:`~moekit.layers.centroids.set_centroids`).
        residual_weight: ``[E, E]`` MoE++ gating-residual projection, zero at init so a new
            layer starts as if it had no residual.
        expert_bias: ``[E]`` buffer used only to choose experts (aux-loss-free balancing).
        task_logits: ``[num_tasks, E]`` per-task logit vector (``task_routing="embed"``), or
        task_weight: ``[num_tasks, E, D]`` per-task gate delta (``"multi_gate"``); None without tasks.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        num_e = config.num_total_experts
        if config.router_type == "centroid":
            self.register_parameter("weight", None)
            self.register_buffer("centroids", torch.empty(num_e, config.dim), persistent=True)
        else:
            self.weight = nn.Parameter(torch.empty(num_e, config.dim))
            self.centroids = None
        self.bias = (
            nn.Parameter(torch.zeros(num_e))
            if config.router_bias or config.router_type == "random_fixed"
            else None
        )
        self.residual_weight = nn.Parameter(torch.zeros(num_e, num_e)) if config.gating_residual else None
        if config.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_e), persistent=True)
        else:
            self.expert_bias = None
        self.task_logits = self.task_weight = None
        if config.num_tasks and config.task_routing == "embed":
            self.task_logits = nn.Parameter(torch.zeros(config.num_tasks, num_e))
        elif config.num_tasks:
            self.task_weight = nn.Parameter(torch.zeros(config.num_tasks, num_e, config.dim))
        self.reset_parameters()
        if self.weight is not None and (config.router_frozen or config.router_type == "random_fixed"):
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Initialises the projection like ``nn.Linear`` (kaiming-uniform, fan-in bound).

        Centroids start as N(0, 1) rows (the scale of RMS-normed token states) so an unfitted
        centroid router still spreads tokens; k-means replaces them.
        """
        if self.centroids is not None:
            with torch.no_grad():
                self.centroids.normal_()
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.config.dim)
            nn.init.uniform_(self.bias, -bound, bound)

    def project(self, x_TD: Tensor) -> Tensor:
        """The router projection alone: ``[T, D] -> [T, E]`` in the routing dtype (no noise, no
        residual). Subclasses with extra rows (``surgery.extend``) override this."""
        dtype = _routing_dtype(x_TD)
        if self.centroids is not None:
            # Exact pairwise distances (no ||x||^2 - 2xc + ||c||^2 shortcut, whose rounding can
            # flip which centroid is nearest); the router's choice must not depend on batch size.
            dist_TE = torch.cdist(
                x_TD.to(dtype), self.centroids.to(dtype), compute_mode="donot_use_mm_for_euclid_dist"
            )
            return dist_TE if self.config.centroid_farthest else -dist_TE
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x_TD.to(dtype), self.weight.to(dtype), bias)

    @property
    def strategy(self) -> type[RouterStrategy]:
        """The routing strategy of this router's config (:func:`~moekit.layers.strategies.strategy_for`)."""
        return strategy_for(self.config)

    @property
    def supports_route_small(self) -> bool:
        """Whether :meth:`route_small` gives what :meth:`forward` would: a fixed-k strategy, no
        gating residual, and no subclass that post-processes ``forward`` (e.g. pruning)."""
        return (
            self.strategy.fixed_k
            and self.residual_weight is None
            and not self.config.num_tasks
            and type(self).forward is Router.forward
        )

    def route_small(self, x_BD: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Routes a small batch cheaply, without statistics or masking: ``(ids [B, K], weights [B, K])``.

        The same strategy math as :meth:`forward` (one copy); only for routers with
        :attr:`supports_route_small`. Weights are in the routing dtype (>= float32).
        """
        cfg = self.config
        k = cfg.top_k if k is None else int(k)
        if not 1 <= k <= cfg.num_total_experts:
            raise ValueError(f"k={k} must be in [1, {cfg.num_total_experts}] (the number of experts)")
        logits_BE = self.logits(x_BD)
        ids_BK, weights_BK, _ = self.strategy.select(cfg, logits_BE, self.expert_bias, k, self.training)
        return ids_BK, weights_BK

    def logits(
        self, x_TD: Tensor, prev_logits_TE: Tensor | None = None, task_ids_T: Tensor | None = None
    ) -> Tensor:
        """Router logits ``[T, E]`` in the routing dtype, with input jitter, gating residual and the
        task conditioning (``task_ids_T`` int64 ``[T]``, task-level MoE)."""
        cfg = self.config
        dtype = _routing_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        if self.training and cfg.noise == "jitter" and cfg.noise_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - cfg.noise_eps, 1.0 + cfg.noise_eps)
        logits_TE = self.project(x_TD)
        if task_ids_T is not None:
            logits_TE = logits_TE + self.task_term(x_TD, task_ids_T)
            if self.config.task_num_experts:
                # A finite floor, not -inf: softmax still gives exactly 0 and no NaN reaches
                # a gating residual or the z-loss.
                allowed_TE = self.task_experts_mask()[task_ids_T]
                logits_TE = logits_TE.masked_fill(~allowed_TE, -1e9)
        if self.residual_weight is not None and prev_logits_TE is not None:
            if prev_logits_TE.shape[-1] != logits_TE.shape[-1]:
                raise ValueError(
                    f"gating residual: previous layer has {prev_logits_TE.shape[-1]} experts, this layer "
                    f"{logits_TE.shape[-1]}; gating residuals need equal expert counts in consecutive MoE layers"
                )
            logits_TE = logits_TE + F.linear(prev_logits_TE.to(dtype), self.residual_weight.to(dtype))
        if self.training and cfg.noise == "gaussian" and cfg.noise_eps > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * (cfg.noise_eps / logits_TE.shape[-1])
        return logits_TE

    def task_experts_mask(self) -> Tensor:
        """Bool ``[num_tasks, E]``: the experts each task may use under ``task_num_experts``
        (the top entries of its task vector; all True without a budget)."""
        num_e = self.config.num_total_experts
        if self.task_logits is None:
            return torch.ones(
                max(self.config.num_tasks, 1), num_e, dtype=torch.bool, device=self.weight.device
            )
        n = self.config.task_num_experts or num_e
        top = self.task_logits.detach().topk(n, dim=-1).indices
        return torch.zeros_like(self.task_logits, dtype=torch.bool).scatter_(1, top, True)

    def task_term(self, x_TD: Tensor, task_ids_T: Tensor) -> Tensor:
        """The task's contribution to the logits, ``[T, E]``: ``task_logits[t]`` ("embed": a linear
        router over ``[x ; e_t]``) or ``x W_t^T`` ("multi_gate")."""
        dtype = x_TD.dtype
        if self.task_logits is not None:
            return self.task_logits.to(dtype)[task_ids_T]
        if self.task_weight is None:
            raise ValueError("task_ids given to a router without tasks (MoEConfig.num_tasks=0)")
        # One gate per task; T tokens of a batch usually share a task, so loop over the few tasks.
        out_TE = x_TD.new_zeros(x_TD.shape[0], self.task_weight.shape[1])
        for t in torch.unique(task_ids_T).tolist():
            rows = task_ids_T == t
            out_TE[rows] = F.linear(x_TD[rows], self.task_weight[t].to(dtype))
        return out_TE

    def forward(
        self,
        x_TD: Tensor,
        token_mask_T: Tensor | None = None,
        prev_logits_TE: Tensor | None = None,
        k: int | None = None,
        task_ids_T: Tensor | None = None,
    ) -> RouterOutput:
        """Routes T tokens.

        Args:
            x_TD: token states ``[T, D]``.
            token_mask_T: bool ``[T]``, False for padding tokens (they get no experts).
            prev_logits_TE: the previous MoE layer's logits, for the gating residual.
            k: overrides ``top_k`` for this call.
            task_ids_T: int64 ``[T]`` task of each token (task-level MoE), or None.
        """
        cfg = self.config
        k = cfg.top_k if k is None else int(k)
        num_e = cfg.num_total_experts
        if cfg.router_type != "expert_choice" and not (1 <= k <= num_e):
            raise ValueError(f"k={k} must be in [1, {num_e}] (the number of experts)")
        logits_TE = self.logits(x_TD, prev_logits_TE, task_ids_T)
        out = self.strategy.route(cfg, logits_TE, self.expert_bias, token_mask_T, k, self.training)
        if token_mask_T is not None and cfg.router_type != "expert_choice":
            keep_T1 = token_mask_T.to(torch.bool).unsqueeze(-1)
            out.expert_ids_TK = torch.where(keep_T1, out.expert_ids_TK, -1)
            out.choice_ids_TK = torch.where(keep_T1, out.choice_ids_TK, -1)
            out.weights_TK = out.weights_TK * keep_T1
        return out


def apply_capacity(
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    capacity_factor: float,
    min_capacity: int,
    drop_policy: str,
    num_valid_tokens: Tensor,
    top_k: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Drops assignments beyond each expert's capacity.

    Capacity is ``max(ceil(capacity_factor * T_valid * top_k / E), min_capacity)``. Survivors are
    chosen by ``drop_policy``: ``"score"`` (highest weight), ``"position"`` (first choices first,
    then earlier tokens), or ``"random"`` (random token selection, RTS).

    Args:
        expert_ids_TK: ``[T, K]`` expert ids, -1 for unused slots.
        weights_TK: ``[T, K]`` combine weights.
        num_valid_tokens: scalar tensor, tokens that are not padding.

    Returns:
        ``(expert_ids_TK, weights_TK)`` with dropped slots set to -1 and 0.
    """
    num_t, num_k = expert_ids_TK.shape
    ids_N = expert_ids_TK.reshape(-1)
    device = ids_N.device
    if drop_policy == "score":
        priority_N = weights_TK.reshape(-1).detach().to(torch.float64)
    elif drop_policy == "position":
        # Slot-major order: all first choices outrank all second choices, then earlier tokens win.
        slot_TK = torch.arange(num_k, device=device).expand(num_t, num_k)
        token_TK = torch.arange(num_t, device=device).unsqueeze(-1).expand(num_t, num_k)
        priority_N = -(slot_TK * num_t + token_TK).reshape(-1).to(torch.float64)
    else:
        priority_N = torch.rand(ids_N.shape, device=device, dtype=torch.float64, generator=generator)
    # Sort by priority, then stably by expert, so each expert's assignments are in priority order.
    order_N = priority_N.argsort(descending=True, stable=True)
    bucket_N = torch.where(ids_N < 0, num_experts, ids_N)[order_N]
    order2_N = bucket_N.argsort(stable=True)
    sorted_bucket_N = bucket_N[order2_N]
    counts_B = torch.bincount(sorted_bucket_N, minlength=num_experts + 1)
    starts_B = counts_B.cumsum(0) - counts_B
    rank_N = torch.arange(ids_N.numel(), device=device) - starts_B[sorted_bucket_N]
    capacity = torch.clamp(
        torch.ceil(capacity_factor * num_valid_tokens.to(torch.float64) * top_k / num_experts),
        min=min_capacity,
    )
    keep_sorted_N = rank_N < capacity
    keep_N = torch.empty_like(keep_sorted_N)
    keep_N[order_N[order2_N]] = keep_sorted_N
    keep_TK = keep_N.view(num_t, num_k) & (expert_ids_TK >= 0)
    return torch.where(keep_TK, expert_ids_TK, -1), weights_TK * keep_TK
