"""Routers: from token states to (expert ids, weights) per token.

Shape legend: T = tokens, D = model width, E = experts the router scores (FFN plus
zero-computation), K = experts per token (padded to K_max), G = expert groups.

A router returns a :class:`RouterOutput`. Unused slots (top-p tokens with fewer experts, expert
choice, dropped or padding tokens) hold expert id -1 and weight 0, so every shape is static and
nothing calls ``.item()``: routing works under ``torch.compile``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import MoEConfig


@dataclass
class RouterOutput:
    """What a router decides for T tokens.

    Attributes:
        expert_ids_TK: chosen experts, -1 in unused slots; int64 ``[T, K]``.
        weights_TK: combine weights, 0 in unused slots; ``[T, K]`` in the routing dtype.
        logits_TE: router logits after the gating residual (what the next layer receives).
        probs_TE: the scores used for balance statistics (softmax, or normalised sigmoid).
        choice_ids_TK: expert ids chosen before capacity dropping (for load-balance counts).
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    choice_ids_TK: Tensor


def _routing_dtype(x: Tensor) -> torch.dtype:
    # Gating runs in at least fp32: bf16 logits flip top-k choices between runs and devices.
    return torch.promote_types(x.dtype, torch.float32)


def _gumbel_like(t: Tensor) -> Tensor:
    u = torch.rand_like(t).clamp_(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


class Router(nn.Module):
    """Scores tokens against experts and picks experts per token.

    Parameters:
        weight: ``[E, D]`` router projection (``bias`` ``[E]`` when ``router_bias``).
        residual_weight: ``[E, E]`` MoE++ gating-residual projection, zero at init so a new
            layer starts as if it had no residual.
        expert_bias: ``[E]`` buffer used only to choose experts (aux-loss-free balancing).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        num_e = config.num_total_experts
        self.weight = nn.Parameter(torch.empty(num_e, config.dim))
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
        self.reset_parameters()
        if config.router_frozen or config.router_type == "random_fixed":
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Initialises the projection like ``nn.Linear`` (kaiming-uniform, fan-in bound)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.config.dim)
            nn.init.uniform_(self.bias, -bound, bound)

    def logits(self, x_TD: Tensor, prev_logits_TE: Tensor | None = None) -> Tensor:
        """Router logits ``[T, E]`` in the routing dtype, with input jitter and gating residual."""
        cfg = self.config
        dtype = _routing_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        if self.training and cfg.noise == "jitter" and cfg.noise_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - cfg.noise_eps, 1.0 + cfg.noise_eps)
        bias = self.bias.to(dtype) if self.bias is not None else None
        logits_TE = F.linear(x_TD, self.weight.to(dtype), bias)
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

    def forward(
        self,
        x_TD: Tensor,
        token_mask_T: Tensor | None = None,
        prev_logits_TE: Tensor | None = None,
        k: int | None = None,
    ) -> RouterOutput:
        """Routes T tokens.

        Args:
            x_TD: token states ``[T, D]``.
            token_mask_T: bool ``[T]``, False for padding tokens (they get no experts).
            prev_logits_TE: the previous MoE layer's logits, for the gating residual.
            k: overrides ``top_k`` for this call.
        """
        cfg = self.config
        k = cfg.top_k if k is None else int(k)
        num_e = cfg.num_total_experts
        if cfg.router_type != "expert_choice" and not (1 <= k <= num_e):
            raise ValueError(f"k={k} must be in [1, {num_e}] (the number of experts)")
        logits_TE = self.logits(x_TD, prev_logits_TE)
        if cfg.router_type == "expert_choice":
            out = self._expert_choice(logits_TE, token_mask_T, k)
        elif cfg.router_type == "top_p":
            out = self._top_p(logits_TE)
        else:
            out = self._top_k(logits_TE, k)
        if token_mask_T is not None and cfg.router_type != "expert_choice":
            keep_T1 = token_mask_T.to(torch.bool).unsqueeze(-1)
            out.expert_ids_TK = torch.where(keep_T1, out.expert_ids_TK, -1)
            out.choice_ids_TK = torch.where(keep_T1, out.choice_ids_TK, -1)
            out.weights_TK = out.weights_TK * keep_T1
        return out

    # Token choice: top-k (softmax or sigmoid, with groups and selection bias).
    def _top_k(self, logits_TE: Tensor, k: int) -> RouterOutput:
        cfg = self.config
        if cfg.router_type == "random_fixed" or cfg.softmax_order == "after_topk":
            # SMoE-Dropout and Moirai: choose on raw logits, softmax over the chosen k only.
            select_TE = logits_TE
            if self.expert_bias is not None:
                select_TE = select_TE + self.expert_bias
            if self.training and cfg.noise == "gumbel":
                select_TE = select_TE + _gumbel_like(select_TE)
            ids_TK = select_TE.topk(k, dim=-1).indices
            weights_TK = torch.softmax(logits_TE.gather(-1, ids_TK), dim=-1)
            probs_TE = torch.softmax(logits_TE, dim=-1)
        else:
            if cfg.score_func == "softmax":
                scores_TE = torch.softmax(logits_TE, dim=-1)
                probs_TE = scores_TE
            else:
                scores_TE = torch.sigmoid(logits_TE)
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
            # The expert bias only steers the choice; weights still come from the unbiased scores.
            select_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias
            if self.training and cfg.noise == "gumbel":
                select_TE = select_TE + _gumbel_like(select_TE)
            if cfg.num_expert_groups > 1:
                select_TE = self._mask_groups(select_TE)
            ids_TK = select_TE.topk(k, dim=-1).indices
            weights_TK = scores_TE.gather(-1, ids_TK)
            if cfg.norm_topk_prob:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * cfg.routed_scaling_factor
        return RouterOutput(ids_TK, weights_TK, logits_TE, probs_TE, ids_TK)

    def _mask_groups(self, select_TE: Tensor) -> Tensor:
        cfg = self.config
        num_t, num_e = select_TE.shape
        select_TGX = select_TE.view(num_t, cfg.num_expert_groups, num_e // cfg.num_expert_groups)
        if cfg.group_score == "top2_sum" and select_TGX.shape[-1] >= 2:
            group_score_TG = select_TGX.topk(2, dim=-1).values.sum(-1)
        else:
            group_score_TG = select_TGX.amax(dim=-1)
        top_groups_TL = group_score_TG.topk(cfg.num_limited_groups, dim=-1).indices
        group_keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TL, True)
        keep_TE = group_keep_TG.unsqueeze(-1).expand_as(select_TGX).reshape(num_t, num_e)
        return select_TE.masked_fill(~keep_TE, float("-inf"))

    # Top-p dynamic routing ("Harder Tasks Need More Experts").
    def _top_p(self, logits_TE: Tensor) -> RouterOutput:
        cfg = self.config
        num_e = logits_TE.shape[-1]
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE if self.expert_bias is None else probs_TE + self.expert_bias
        order_TE = select_TE.argsort(dim=-1, descending=True)
        sorted_TE = probs_TE.gather(-1, order_TE)
        # Keep an expert while the mass before it is <= p: every expert with cumsum <= p plus the
        # first that crosses p (the official code's strict '>' rule), so at least one is kept.
        mass_before_TE = sorted_TE.cumsum(-1) - sorted_TE
        rank_E = torch.arange(num_e, device=logits_TE.device)
        keep_TE = mass_before_TE <= cfg.top_p
        keep_TE = keep_TE | (rank_E < cfg.min_k)
        k_max = cfg.max_experts_per_token
        keep_TE = keep_TE & (rank_E < k_max)
        ids_TK = order_TE[:, :k_max]
        keep_TK = keep_TE[:, :k_max]
        weights_TK = sorted_TE[:, :k_max] * keep_TK
        if cfg.top_p_renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * cfg.routed_scaling_factor
        ids_TK = torch.where(keep_TK, ids_TK, -1)
        return RouterOutput(ids_TK, weights_TK, logits_TE, probs_TE, ids_TK)

    # Expert choice: each expert takes its top-C tokens.
    def _expert_choice(self, logits_TE: Tensor, token_mask_T: Tensor | None, k: int) -> RouterOutput:
        cfg = self.config
        num_t, num_e = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE if self.expert_bias is None else probs_TE + self.expert_bias
        if token_mask_T is not None:
            select_TE = select_TE.masked_fill(~token_mask_T.to(torch.bool).unsqueeze(-1), float("-inf"))
        cf = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
        capacity = max(1, min(num_t, math.ceil(cf * num_t * k / num_e)))
        token_ids_EC = select_TE.t().topk(capacity, dim=-1).indices
        chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
        chosen_TE.scatter_(0, token_ids_EC.t(), True)
        if token_mask_T is not None:
            chosen_TE &= token_mask_T.to(torch.bool).unsqueeze(-1)
        # Pack each token's chosen experts to the front of a [T, E] table, in descending score.
        packed_score_TE = torch.where(chosen_TE, probs_TE, -1.0)
        order_TE = packed_score_TE.argsort(dim=-1, descending=True)
        keep_TE = chosen_TE.gather(-1, order_TE)
        ids_TE = torch.where(keep_TE, order_TE, -1)
        weights_TE = probs_TE.gather(-1, order_TE) * keep_TE * cfg.routed_scaling_factor
        return RouterOutput(ids_TE, weights_TE, logits_TE, probs_TE, ids_TE)


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
