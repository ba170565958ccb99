"""Router strategies: how router logits become (expert ids, weights), one class per ``router_type``.

Shape legend: T = tokens, E = experts the router scores (FFN plus zero-computation), K = experts
per token (padded to K_max), G = expert groups.

``CentroidRouting`` (token-cluster gating) needs the router to compute distance logits: the
:class:`~moekit.layers.Router` does that from its ``centroids`` buffer (no projection weight).

Every strategy is a stateless class with two parts:

* :meth:`RouterStrategy.check` validates the :class:`~moekit.layers.MoEConfig` fields the strategy
  reads, and rejects fields it would silently ignore (``ValueError`` naming them), so a config
  means what it says;
* :meth:`RouterStrategy.route` turns ``[T, E]`` logits into a :class:`RouterOutput`. Strategies
  that give every token exactly ``k`` experts (``fixed_k``) also expose :meth:`select`, the same
  math without statistics, which the decode fast path calls through :meth:`Router.route_small`:
  there is one copy of the routing math.

To add a router: write a subclass, give it a ``name``, add it to the literal of :data:`ROUTER_STRATEGIES`, and
add an oracle case to ``tests/test_layers_oracle.py``. This module imports no other part of
``moekit.layers`` (``config.py`` reads the registry to validate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor


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


# Defaults of the fields a strategy may ignore; a non-default value there is rejected.
_TOP_P_FIELDS = {"top_p": 0.4, "min_k": 1, "max_k": None, "top_p_renormalize": False}


def _gumbel_like(t: Tensor) -> Tensor:
    u = torch.rand_like(t).clamp_(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


def _reject(cfg: Any, strategy: str, fields: dict[str, Any], why: str) -> None:
    """Raises when any of ``fields`` differs from its default (the strategy would ignore it)."""
    ignored = [
        f"{name}={getattr(cfg, name)!r}" for name, default in fields.items() if getattr(cfg, name) != default
    ]
    if ignored:
        raise ValueError(
            f"MoEConfig: {strategy} routing ignores {', '.join(ignored)} ({why}); "
            f"remove {'them' if len(ignored) > 1 else 'it'} or choose another router"
        )


class RouterStrategy:
    """Base of the router strategies (see the module docstring).

    Class attributes:
        name: the ``router_type`` value (``softmax_order`` picks between the two top-k forms).
        fixed_k: every token gets exactly ``k`` experts, so :meth:`select` exists and the fast
            decode path can use it.
    """

    name: ClassVar[str]
    fixed_k: ClassVar[bool] = False

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Validates ``cfg``'s routing fields for this strategy; ``ValueError`` names the field."""

    @classmethod
    def select(cls, cfg: Any, logits_TE: Tensor, bias_E: Tensor | None, k: int, training: bool):
        """``(ids_TK, weights_TK, scores_TE)`` for fixed-k strategies (no statistics)."""
        raise NotImplementedError(f"{cls.name} routing has no fixed-k selection")

    @classmethod
    def probs(cls, cfg: Any, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        """The ``[T, E]`` distribution used for balance statistics."""
        return torch.softmax(logits_TE, dim=-1)

    @classmethod
    def route(
        cls,
        cfg: Any,
        logits_TE: Tensor,
        bias_E: Tensor | None,
        token_mask_T: Tensor | None,
        k: int,
        training: bool,
    ) -> RouterOutput:
        """Routes T tokens: a :class:`RouterOutput` with -1/0 padding (masking is the router's)."""
        ids_TK, weights_TK, scores_TE = cls.select(cfg, logits_TE, bias_E, k, training)
        return RouterOutput(ids_TK, weights_TK, logits_TE, cls.probs(cfg, logits_TE, scores_TE), ids_TK)


class TopKRouting(RouterStrategy):
    """Token choice on scores (Mixtral, Qwen, OLMoE, DeepSeek): softmax or sigmoid scores, optional
    group-limited choice, a selection-only expert bias, renormalisation and scaling."""

    name = "topk"
    fixed_k = True

    @classmethod
    def check(cls, cfg: Any) -> None:
        _reject(cfg, "top-k", _TOP_P_FIELDS, "they are top-p settings")
        if cfg.num_expert_groups == 1:
            _reject(
                cfg,
                "top-k",
                {"group_score": "top2_sum"},
                "it scores expert groups; set num_expert_groups > 1",
            )

    @classmethod
    def select(cls, cfg: Any, logits_TE: Tensor, bias_E: Tensor | None, k: int, training: bool):
        scores_TE = (
            torch.softmax(logits_TE, dim=-1) if cfg.score_func == "softmax" else torch.sigmoid(logits_TE)
        )
        # The expert bias only steers the choice; weights still come from the unbiased scores.
        select_TE = scores_TE if bias_E is None else scores_TE + bias_E
        if training and cfg.noise == "gumbel":
            select_TE = select_TE + _gumbel_like(select_TE)
        if cfg.num_expert_groups > 1:
            select_TE = _mask_groups(cfg, select_TE)
        ids_TK = select_TE.topk(k, dim=-1).indices
        weights_TK = scores_TE.gather(-1, ids_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return ids_TK, weights_TK, scores_TE

    @classmethod
    def probs(cls, cfg: Any, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        if cfg.score_func == "softmax":
            return scores_TE
        return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def _mask_groups(cfg: Any, select_TE: Tensor) -> Tensor:
    """Keeps each token's best ``num_limited_groups`` expert groups, -inf elsewhere."""
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


class TopKLogitSoftmaxRouting(RouterStrategy):
    """Token choice on raw logits, softmax over the chosen k only (Moirai; ``softmax_order=
    "after_topk"``). The weights always sum to 1, and there are no scores to group or sigmoid."""

    name = "topk"
    fixed_k = True

    @classmethod
    def _ignored(cls, cfg: Any) -> None:
        why = "it takes a softmax over the chosen logits, whose weights always sum to 1"
        _reject(
            cfg,
            cls.label,
            {
                "score_func": "softmax",
                "num_expert_groups": 1,
                "norm_topk_prob": True,
                "group_score": "top2_sum",
            },
            why,
        )
        _reject(cfg, cls.label, _TOP_P_FIELDS, "they are top-p settings")

    label = "softmax_order='after_topk'"

    @classmethod
    def check(cls, cfg: Any) -> None:
        cls._ignored(cfg)

    @classmethod
    def select(cls, cfg: Any, logits_TE: Tensor, bias_E: Tensor | None, k: int, training: bool):
        select_TE = logits_TE if bias_E is None else logits_TE + bias_E
        if training and cfg.noise == "gumbel":
            select_TE = select_TE + _gumbel_like(select_TE)
        ids_TK = select_TE.topk(k, dim=-1).indices
        weights_TK = torch.softmax(logits_TE.gather(-1, ids_TK), dim=-1)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return ids_TK, weights_TK, logits_TE


class RandomFixedRouting(TopKLogitSoftmaxRouting):
    """SMoE-Dropout: a frozen random router (weight and bias), chosen on raw logits, softmax over
    the chosen k. The same selection as ``after_topk``; the router does not train."""

    name = "random_fixed"
    label = "random_fixed"

    @classmethod
    def check(cls, cfg: Any) -> None:
        _reject(cfg, cls.label, {"softmax_order": "before_topk"}, "it always takes the softmax after top-k")
        cls._ignored(cfg)


class TopPRouting(RouterStrategy):
    """Dynamic routing ("Harder Tasks Need More Experts"): each token keeps experts in score order
    until their mass passes ``top_p``, within ``[min_k, max_k]``."""

    name = "top_p"

    @classmethod
    def check(cls, cfg: Any) -> None:
        _reject(
            cfg,
            "top_p",
            {"score_func": "softmax", "softmax_order": "before_topk", "norm_topk_prob": True},
            "it keeps softmax mass up to top_p; top_p_renormalize renormalises",
        )
        if cfg.noise == "gumbel":
            raise ValueError("MoEConfig: top_p routing ignores noise='gumbel'; use 'jitter' or 'gaussian'")

    @classmethod
    def route(
        cls,
        cfg: Any,
        logits_TE: Tensor,
        bias_E: Tensor | None,
        token_mask_T: Tensor | None,
        k: int,
        training: bool,
    ) -> RouterOutput:
        num_e = logits_TE.shape[-1]
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE if bias_E is None else probs_TE + bias_E
        order_TE = select_TE.argsort(dim=-1, descending=True)
        sorted_TE = probs_TE.gather(-1, order_TE)
        # Keep an expert while the mass before it is <= p: every expert with cumsum <= p plus the
        # first that crosses p (the official code's strict '>' rule), so at least one is kept.
        mass_before_TE = sorted_TE.cumsum(-1) - sorted_TE
        rank_E = torch.arange(num_e, device=logits_TE.device)
        keep_TE = (mass_before_TE <= cfg.top_p) | (rank_E < cfg.min_k)
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


class CentroidRouting(RouterStrategy):
    """Token-cluster gating (Moirai-MoE): each token goes to its ``k`` nearest centroids.

    The router holds ``E`` centroids ``[E, D]`` (a buffer from k-means over a pretrained dense
    model's token states, :func:`moekit.layers.centroids.fit_centroids`); nothing in it trains.
    Its logits are ``-||x - c_e||`` (Euclidean distance), so top-k picks the nearest centroids
    and the weights are the softmax of the chosen negative distances (they sum to 1; times
    ``routed_scaling_factor``). ``centroid_farthest=True`` reproduces the released uni2ts code,
    which takes top-k of the raw distances and so routes to the *farthest* centroids (logits
    ``+||x - c_e||``); it exists only to run checkpoints trained that way.

    [paper*] The paper describes the gate as a distance to cluster centroids; whether its weights
    are a softmax of the chosen negative distances (as here) or of all distances is not stated
    unambiguously. The softmax over the chosen k follows the released code's form.
    """

    name = "centroid"
    fixed_k = True

    @classmethod
    def check(cls, cfg: Any) -> None:
        _reject(
            cfg,
            "centroid",
            {
                "score_func": "softmax",
                "softmax_order": "before_topk",
                "norm_topk_prob": True,
                "num_expert_groups": 1,
                "group_score": "top2_sum",
                "router_bias": False,
                "gating_residual": False,
            },
            "it scores tokens by distance to fixed centroids and takes a softmax over the chosen k",
        )
        _reject(cfg, "centroid", _TOP_P_FIELDS, "they are top-p settings")

    @classmethod
    def select(cls, cfg: Any, logits_TE: Tensor, bias_E: Tensor | None, k: int, training: bool):
        select_TE = logits_TE if bias_E is None else logits_TE + bias_E
        if training and cfg.noise == "gumbel":
            select_TE = select_TE + _gumbel_like(select_TE)
        ids_TK = select_TE.topk(k, dim=-1).indices
        weights_TK = torch.softmax(logits_TE.gather(-1, ids_TK), dim=-1)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return ids_TK, weights_TK, logits_TE


class ExpertChoiceRouting(RouterStrategy):
    """Expert choice: each expert takes its top-C tokens, ``C = ceil(cf * T * k / E)``."""

    name = "expert_choice"

    @classmethod
    def check(cls, cfg: Any) -> None:
        _reject(
            cfg,
            "expert_choice",
            {
                "score_func": "softmax",
                "softmax_order": "before_topk",
                "norm_topk_prob": True,
                "drop_policy": "score",
            }
            | _TOP_P_FIELDS,
            "experts choose tokens by softmax score; capacity_factor sets how many",
        )
        if cfg.noise == "gumbel":
            raise ValueError(
                "MoEConfig: expert_choice routing ignores noise='gumbel'; use 'jitter' or 'gaussian'"
            )

    @classmethod
    def route(
        cls,
        cfg: Any,
        logits_TE: Tensor,
        bias_E: Tensor | None,
        token_mask_T: Tensor | None,
        k: int,
        training: bool,
    ) -> RouterOutput:
        num_t, num_e = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE if bias_E is None else probs_TE + bias_E
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


class SparseMixerRouting(RouterStrategy):
    """PhiMoE's sparsemixer, top-2: the best expert, then the best of the rest, each weighted by a
    softmax over the logits within a relative margin of its own logit.

    For choice j (j = 1, 2) with threshold logit ``m_j`` (the best logit not yet chosen), the
    logits ``s`` with ``(m_j - s) / max(|s|, m_j) > 2 * sparsemixer_eps`` are masked out (and, for
    the second choice, the first expert too); the weight is the softmax of the rest at the chosen
    expert. This is transformers' eval path exactly. In training moekit uses the same deterministic
    choice with plain autograd through the masked softmaxes; it does not sample experts (Gumbel)
    or use the paper's Heun's-method gradient estimator, so fine-tuning gradients differ from the
    official ones.
    """

    name = "sparsemixer"
    fixed_k = True

    @classmethod
    def check(cls, cfg: Any) -> None:
        if cfg.top_k != 2:
            raise ValueError(
                f"MoEConfig: sparsemixer routing always picks 2 experts; set top_k=2, got {cfg.top_k}"
            )
        _reject(
            cfg,
            "sparsemixer",
            {
                "score_func": "softmax",
                "softmax_order": "before_topk",
                "norm_topk_prob": True,
                "routed_scaling_factor": 1.0,
                "num_expert_groups": 1,
                "group_score": "top2_sum",
                "use_expert_bias": False,
            }
            | _TOP_P_FIELDS,
            "its weights come from the masked softmaxes alone",
        )
        if cfg.noise == "gumbel":
            raise ValueError("MoEConfig: sparsemixer routing ignores noise='gumbel'; use 'jitter' or 'none'")

    @classmethod
    def select(cls, cfg: Any, logits_TE: Tensor, bias_E: Tensor | None, k: int, training: bool):
        if k != 2:
            raise ValueError(f"sparsemixer routing picks exactly 2 experts per token, got k={k}")
        eps2 = 2 * cfg.sparsemixer_eps
        abs_TE = logits_TE.abs()
        top_T1, first_T1 = logits_TE.max(dim=-1, keepdim=True)
        with torch.no_grad():
            drop_TE = (top_T1 - logits_TE) / abs_TE.clamp(min=top_T1) > eps2
        w1_T1 = torch.softmax(logits_TE.masked_fill(drop_TE, float("-inf")), dim=-1).gather(-1, first_T1)
        rest_TE = logits_TE.scatter(-1, first_T1, float("-inf"))
        second_val_T1, second_T1 = rest_TE.max(dim=-1, keepdim=True)
        with torch.no_grad():
            drop_TE = (second_val_T1 - logits_TE) / abs_TE.clamp(min=second_val_T1) > eps2
        w2_T1 = torch.softmax(rest_TE.masked_fill(drop_TE, float("-inf")), dim=-1).gather(-1, second_T1)
        ids_TK = torch.cat([first_T1, second_T1], dim=-1)
        return ids_TK, torch.cat([w1_T1, w2_T1], dim=-1), torch.softmax(logits_TE, dim=-1)


#: ``router_type`` -> strategy. ``"topk"`` maps to :class:`TopKRouting`; with
#: ``softmax_order="after_topk"`` :func:`strategy_for` picks :class:`TopKLogitSoftmaxRouting`.
#: Read-only: the registry is fixed at import (no module-level mutable state).
ROUTER_STRATEGIES: Mapping[str, type[RouterStrategy]] = MappingProxyType(
    {
        "topk": TopKRouting,
        "top_p": TopPRouting,
        "random_fixed": RandomFixedRouting,
        "expert_choice": ExpertChoiceRouting,
        "sparsemixer": SparseMixerRouting,
        "centroid": CentroidRouting,
    }
)


def strategy_for(cfg: Any) -> type[RouterStrategy]:
    """The strategy class that routes for ``cfg`` (a validated :class:`~moekit.layers.MoEConfig`)."""
    if cfg.router_type == "topk" and cfg.softmax_order == "after_topk":
        return TopKLogitSoftmaxRouting
    return ROUTER_STRATEGIES[cfg.router_type]
