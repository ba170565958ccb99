"""Decoding strategies that use the MoE routing: self-contrast (SCMoE) and weak-routing overrides.

Shape legend: B = batch, V = vocabulary, T = tokens in one router call, K = experts per token,
E = experts the router scores.

SCMoE ("Unchosen Experts Can Contribute Too", DavidFanzz/SCMoE) runs the model twice per step on
the same prefix, each pass with its own KV cache: a *strong* pass with the model's own routing
(top-k) and a *weak* pass with a weaker routing, by default "rank-k": each token uses only its
k-th ranked expert, at weight 1. With temperatures ``tau_s``/``tau_w`` and ``s = log_softmax(z_s /
tau_s)``, ``w = log_softmax(z_w / tau_w)``, the next-token score is

    F_v = (1 + beta) * s_v - beta * w_v   if  p_s(v) >= alpha * max_u p_s(u)   else  -inf

(the plausibility mask keeps the contrast from promoting tokens the strong model finds
implausible). The paper's defaults: ``alpha = 0.1``, ``beta = 0.5``, strong = top-2; its README
example uses the third-ranked expert for the weak pass. Ranks here are **1-based**: ``rank:1`` is
each token's top expert, ``rank:3`` the third (the paper code's 0-based ``student_routed_tok=2``).

The weak routing is applied by :func:`weak_routing`, a context manager that sets each MoE layer's
declared routing override (:meth:`moekit.layers.MoELayer.override_routing`) to a
:class:`RankOnlyRouting` for the duration of the weak pass only; nothing outside the ``with``
block sees it, and the decode fast path is not taken while it is set.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moekit.layers import MoELayer
from moekit.layers.router import RouterOutput
from moekit.models.decode import DecodeSession


@dataclass(frozen=True, kw_only=True)
class WeakRouting:
    """How the weak (amateur) pass of SCMoE routes.

    Attributes:
        mode: ``"rank"`` (each token uses only its ``k``-th ranked expert, weight 1) or ``"top"``
            (plain top-``k`` routing, e.g. ``top:1``, through the layer's dynamic-k dial).
        k: the 1-based rank, or the number of experts for ``"top"``.
    """

    mode: str = "rank"
    k: int = 3

    def __post_init__(self) -> None:
        if self.mode not in ("rank", "top"):
            raise ValueError(f"weak routing mode must be 'rank' or 'top', got {self.mode!r}")
        if self.k < 1:
            raise ValueError(f"weak routing k must be >= 1 (ranks are 1-based), got {self.k}")

    @classmethod
    def parse(cls, text: str) -> WeakRouting:
        """Parses ``"rank:K"`` or ``"top:K"`` (e.g. ``"rank:3"``, ``"top:1"``)."""
        mode, sep, k = text.partition(":")
        if not sep or not k.strip().isdigit():
            raise ValueError(f"weak routing {text!r}: expected 'rank:K' or 'top:K' with an integer K >= 1")
        return cls(mode=mode.strip(), k=int(k))

    def __str__(self) -> str:
        return f"{self.mode}:{self.k}"


@dataclass(frozen=True)
class RankOnlyRouting:
    """A routing override (:class:`moekit.layers.RoutingOverride`): each token keeps only its
    ``rank``-th ranked expert (1-based), at weight 1.

    The router's own top-``rank`` selection (sorted by score, with groups and selection bias
    applied as usual), then its last column.
    """

    rank: int

    def __call__(self, router, x_TD: Tensor, token_mask_T, prev_logits_TE, k) -> RouterOutput:
        """Routes ``x_TD [T, D]`` to ``[T, 1]`` expert ids and unit weights."""
        out = router(x_TD, token_mask_T, prev_logits_TE, self.rank)
        ids_T1 = out.expert_ids_TK[:, self.rank - 1 : self.rank]
        weights_T1 = (ids_T1 >= 0).to(out.weights_TK.dtype)
        return replace(out, expert_ids_TK=ids_T1, choice_ids_TK=ids_T1, weights_TK=weights_T1)


@contextlib.contextmanager
def weak_routing(model: torch.nn.Module, routing: WeakRouting) -> Iterator[int | None]:
    """Within the block, every MoE layer of ``model`` routes as ``routing`` says.

    Yields the ``moe_k`` to pass to the model (``routing.k`` for ``"top"``, None for ``"rank"``,
    whose override is each layer's ``routing_override``). The overrides are cleared on exit,
    even on error.

    Raises:
        ValueError: a rank above a layer's expert count, or a router type that has no ranking
            (top-p and expert-choice routers choose a variable number of experts).
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        cfg = layer.config
        if routing.k > cfg.num_total_experts:
            raise ValueError(f"weak routing {routing}: a layer has only {cfg.num_total_experts} experts")
        if routing.mode == "rank" and cfg.router_type not in ("topk", "random_fixed"):
            raise ValueError(
                f"weak routing {routing}: rank routing needs token-choice top-k routers, not {cfg.router_type!r}"
            )
    if routing.mode == "top":
        yield routing.k
        return
    override = RankOnlyRouting(routing.k)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.override_routing(override))
        yield None


def contrast_scores(
    strong_BV: Tensor,
    weak_BV: Tensor,
    alpha: float = 0.1,
    beta: float = 0.5,
    tau_strong: float = 1.0,
    tau_weak: float = 1.0,
) -> Tensor:
    """SCMoE scores ``[B, V]`` from strong and weak logits (see the module docstring).

    Tokens failing the plausibility test ``p_s >= alpha * max p_s`` get -inf; the strong argmax
    always passes, so every row keeps at least one token.
    """
    s_BV = torch.log_softmax(strong_BV.float() / tau_strong, dim=-1)
    w_BV = torch.log_softmax(weak_BV.float() / tau_weak, dim=-1)
    keep_BV = s_BV >= s_BV.max(-1, keepdim=True).values + math.log(alpha)
    scores_BV = (1 + beta) * s_BV - beta * w_BV
    return scores_BV.masked_fill(~keep_BV, float("-inf"))


class SelfContrastSession:
    """SCMoE score source for :func:`moekit.models.generation.iter_tokens`: two sessions, two KV caches.

    Args:
        model: the MoE language model.
        input_ids, attention_mask, max_new_tokens: as :class:`~moekit.models.decode.DecodeSession`.
        alpha: plausibility threshold in (0, 1].
        beta: contrast strength (0 reproduces the strong model's scores on the kept tokens).
        weak: the weak pass's routing (:class:`WeakRouting` or ``"rank:K"``/``"top:K"``).
        moe_k: the strong pass's experts per token (None: the model's top-k).
        tau_strong, tau_weak: temperatures applied to each pass's logits before contrasting.
    """

    def __init__(
        self,
        model,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 0,
        alpha: float = 0.1,
        beta: float = 0.5,
        weak: WeakRouting | str = "rank:3",
        moe_k: int | None = None,
        tau_strong: float = 1.0,
        tau_weak: float = 1.0,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"SCMoE alpha must be in (0, 1], got {alpha}")
        if beta < 0:
            raise ValueError(f"SCMoE beta must be >= 0, got {beta}")
        if tau_strong <= 0 or tau_weak <= 0:
            raise ValueError("SCMoE temperatures must be positive")
        if not model.moe_layers:
            raise ValueError("SCMoE needs a model with MoE layers")
        self.model = model
        self.weak = WeakRouting.parse(weak) if isinstance(weak, str) else weak
        self.alpha, self.beta, self.tau_strong, self.tau_weak = alpha, beta, tau_strong, tau_weak
        self.strong_session = DecodeSession(model, input_ids, attention_mask, max_new_tokens, moe_k=moe_k)
        # The weak KV cache must be built with the weak routing too (the paper's second cache).
        # Built inside the override, the session sees it and keeps off the fast path for "rank"
        # (fast_decode_supported asks each layer); this also validates the routing now.
        with weak_routing(model, self.weak):
            self.weak_session = DecodeSession(model, input_ids, attention_mask, max_new_tokens)

    def _weak(self, call, *args) -> Tensor:
        with weak_routing(self.model, self.weak) as moe_k:
            self.weak_session.moe_k = moe_k
            return call(*args)

    def _combine(self, strong_BV: Tensor, weak_BV: Tensor) -> Tensor:
        self.last_strong_BV, self.last_weak_BV = strong_BV, weak_BV
        return contrast_scores(strong_BV, weak_BV, self.alpha, self.beta, self.tau_strong, self.tau_weak)

    def prefill(self) -> Tensor:
        """Prefills both caches; returns the contrast scores ``[B, V]`` for the first token."""
        strong_BV = self.strong_session.prefill()
        return self._combine(strong_BV, self._weak(self.weak_session.prefill))

    def step(self, next_B: Tensor) -> Tensor:
        """Feeds the chosen tokens to both passes; returns the next contrast scores ``[B, V]``."""
        strong_BV = self.strong_session.step(next_B)
        return self._combine(strong_BV, self._weak(self.weak_session.step, next_B))
