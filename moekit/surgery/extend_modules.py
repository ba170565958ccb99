"""The modules an extended MoE layer holds (MoExtend): :class:`ExtendedRouter` (old and new router
rows in separate parameters), :class:`CalibratedRouter` (plus MoExtend's calibration module
``p' = p + MLP(p)``) and :class:`SplitExpertWeights` (old and new expert stacks apart).

Shape legend: T = tokens, D = model width, E = old FFN experts, N = new experts, A = E + N,
M = hidden width of the calibration MLP, K = experts per token, H/F as in ``moekit.layers.experts``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers import ExpertWeights, MoEConfig, Router, RouterOutput
from moekit.layers.experts import SortedExpertsFunction


class ExtendedRouter(Router):
    """A :class:`~moekit.layers.Router` with extra rows in their own parameters.

    Parameters:
        weight: ``[E, D]`` old rows (and ``bias`` ``[E]`` when the old router had one).
        new_weight: ``[N, D]`` new rows.
        new_bias: ``[N]`` logit bias of the new rows, or None.
        expert_bias: ``[E + N]`` buffer (aux-loss-free balancing), when the old router had one.
    """

    def __init__(
        self, old: Router, new_config: MoEConfig, new_weight: Tensor, new_bias: Tensor | None
    ) -> None:
        super().__init__(old.config)
        if old.config.gating_residual or old.config.router_type in ("random_fixed", "expert_choice", "top_p"):
            raise ValueError(
                "extend: routers with a gating residual, random_fixed, top_p or expert_choice routing are not "
                "supported; use a top-k router"
            )
        self.load_state_dict(old.state_dict())
        self.to(old.weight.dtype)
        self.weight.requires_grad_(old.weight.requires_grad)
        self.config = new_config
        self.new_weight = nn.Parameter(new_weight.to(old.weight.dtype).clone())
        self.new_bias = None if new_bias is None else nn.Parameter(new_bias.to(old.weight.dtype).clone())
        if old.expert_bias is not None:
            extended = torch.cat([old.expert_bias, old.expert_bias.new_zeros(new_weight.shape[0])])
            self.expert_bias = extended  # reassigning a registered buffer keeps it a buffer

    def project(self, x_TD: Tensor) -> Tensor:
        """``[T, E + N]``: the old rows exactly as :meth:`Router.project`, then the new rows (noise,
        residual and the strategy math stay :class:`Router`'s)."""
        old_TE = super().project(x_TD)
        dtype = old_TE.dtype
        new_bias = self.new_bias.to(dtype) if self.new_bias is not None else None
        new_TN = F.linear(x_TD.to(dtype), self.new_weight.to(dtype), new_bias)
        return torch.cat([old_TE, new_TN], dim=-1)


class CalibratedRouter(ExtendedRouter):
    """An :class:`ExtendedRouter` with MoExtend's calibration module on the routing probabilities.

    ``p = softmax(logits)`` ``[T, A]``; ``p' = p + W2 gelu(W1 p + b1) + b2`` with ``W1`` ``[M, A]``,
    ``W2`` ``[A, M]``; the top-k experts are taken on ``p'``, their ``p'`` values are the weights,
    renormalised to sum to 1 when ``norm_topk_prob`` (times ``routed_scaling_factor``).
    ``W2``/``b2`` start at zero, so at init ``p' = p`` and the router routes exactly as the plain
    :class:`ExtendedRouter` (tested bit-identical).

    From the MoExtend code, per the notes [code]: a "WeightScale" MLP 9 -> 16 -> 9 with GELU for
    Mixtral's 8 + 1 experts, last layer zero-initialised, applied residually to the softmax
    probabilities, then top-2 and renormalisation. Not confirmed: whether the top-k *indices* come
    from ``p'`` (here) or from ``p`` with only the weights taken from ``p'``, and whether a ``p'``
    weight can go negative in their code (here it can; nothing clamps it). Balance statistics use
    ``p`` (the router's own distribution).

    Parameters (besides :class:`ExtendedRouter`'s): ``calib_w1`` ``[M, A]``, ``calib_b1`` ``[M]``,
    ``calib_w2`` ``[A, M]``, ``calib_b2`` ``[A]``.
    """

    def __init__(
        self,
        old: Router,
        new_config: MoEConfig,
        new_weight: Tensor,
        new_bias: Tensor | None,
        hidden: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(old, new_config, new_weight, new_bias)
        cfg = old.config
        if cfg.router_type != "topk" or cfg.softmax_order != "before_topk" or cfg.score_func != "softmax":
            raise ValueError(
                "extend: calibrate=True needs a softmax-before-top-k router (router_type='topk', "
                "score_func='softmax', softmax_order='before_topk')"
            )
        if cfg.num_expert_groups > 1 or cfg.capacity_factor is not None:
            raise ValueError("extend: calibrate=True does not support group-limited routing or capacity")
        if hidden < 1:
            raise ValueError(f"ExtendConfig.calibration_hidden must be >= 1, got {hidden}")
        num_a, dtype = new_config.num_total_experts, old.weight.dtype
        bound = num_a**-0.5  # nn.Linear's default uniform bound for the first layer
        w1 = (torch.rand(hidden, num_a, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        b1 = (torch.rand(hidden, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.calib_w1 = nn.Parameter(w1.to(dtype))
        self.calib_b1 = nn.Parameter(b1.to(dtype))
        self.calib_w2 = nn.Parameter(torch.zeros(num_a, hidden, dtype=dtype))
        self.calib_b2 = nn.Parameter(torch.zeros(num_a, dtype=dtype))

    def calibrate(self, probs_TA: Tensor) -> Tensor:
        """``p' = p + MLP(p)``: ``[T, A] -> [T, A]`` in the probabilities' dtype."""
        dtype = probs_TA.dtype
        h_TM = F.gelu(F.linear(probs_TA, self.calib_w1.to(dtype), self.calib_b1.to(dtype)))
        return probs_TA + F.linear(h_TM, self.calib_w2.to(dtype), self.calib_b2.to(dtype))

    def is_identity(self) -> bool:
        """Whether the calibration module is still the identity (``W2`` and ``b2`` all zero)."""
        return not bool(self.calib_w2.detach().any()) and not bool(self.calib_b2.detach().any())

    def forward(
        self,
        x_TD: Tensor,
        token_mask_T: Tensor | None = None,
        prev_logits_TE: Tensor | None = None,
        k: int | None = None,
    ) -> RouterOutput:
        """Routes T tokens on the calibrated probabilities (see the class docstring)."""
        cfg = self.config
        k = cfg.top_k if k is None else int(k)
        if not 1 <= k <= cfg.num_total_experts:
            raise ValueError(f"k={k} must be in [1, {cfg.num_total_experts}] (the number of experts)")
        logits_TA = self.logits(x_TD, prev_logits_TE)
        probs_TA = torch.softmax(logits_TA, dim=-1)
        calibrated_TA = self.calibrate(probs_TA)
        select_TA = calibrated_TA if self.expert_bias is None else calibrated_TA + self.expert_bias
        ids_TK = select_TA.topk(k, dim=-1).indices
        weights_TK = calibrated_TA.gather(-1, ids_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * cfg.routed_scaling_factor
        if token_mask_T is not None:
            keep_T1 = token_mask_T.to(torch.bool).unsqueeze(-1)
            ids_TK = torch.where(keep_T1, ids_TK, -1)
            weights_TK = weights_TK * keep_T1
        return RouterOutput(ids_TK, weights_TK, logits_TA, probs_TA, ids_TK)


class SplitExpertWeights(ExpertWeights):
    """Old and new experts in separate stacked parameters.

    Parameters:
        w_in ``[E, H, D]``, w_out ``[E, D, F]``: the old experts (same names as the default storage).
        new_w_in ``[N, H, D]``, new_w_out ``[N, D, F]``: the new experts.
    """

    def __init__(
        self, w_in: Tensor, w_out: Tensor, new_w_in: Tensor, new_w_out: Tensor, activation: str
    ) -> None:
        super().__init__()
        self.num_old = w_in.shape[0]
        self.num_experts = w_in.shape[0] + new_w_in.shape[0]
        self.dim, self.ffn_dim, self.activation = w_in.shape[2], w_out.shape[2], activation
        self.w_in, self.w_out = nn.Parameter(w_in.clone()), nn.Parameter(w_out.clone())
        self.new_w_in, self.new_w_out = nn.Parameter(new_w_in.clone()), nn.Parameter(new_w_out.clone())

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """``(w_in [H, D], w_out [D, F])`` of expert ``expert`` (old ids first)."""
        if expert < self.num_old:
            return self.w_in[expert], self.w_out[expert]
        return self.new_w_in[expert - self.num_old], self.new_w_out[expert - self.num_old]

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Old experts' rows through the old stack, new experts' rows through the new one."""
        old_counts, new_counts = counts[: self.num_old], counts[self.num_old :]
        num_old_rows = sum(old_counts)
        parts = []
        if num_old_rows:
            parts.append(
                SortedExpertsFunction.apply(
                    x_ND[:num_old_rows], self.w_in, self.w_out, old_counts, self.activation
                )
            )
        if sum(new_counts):
            parts.append(
                SortedExpertsFunction.apply(
                    x_ND[num_old_rows:], self.new_w_in, self.new_w_out, new_counts, self.activation
                )
            )
        if not parts:
            return x_ND.new_zeros(0, self.dim)
        return parts[0] if len(parts) == 1 else torch.cat(parts)
