"""Auxiliary losses and routing statistics. All return unweighted scalars; trainers weight them.

Shape legend: T = tokens, E = experts scored by the router, K = slots per token, B = sequences,
S = tokens per sequence.

Conventions (so numbers compare across papers):
    load_balance = E * sum_e eta_e * f_e * P_e, with f_e = c_e / A (c_e: assignments chosen for e
        before capacity dropping, A: all assignments) and P_e the mean router probability. It is
        1.0 for a perfectly uniform router whatever k is (Switch for k=1; DeepSpeed's (E/k) form
        for top-k; HF's value divided by k). eta_e is 1 for FFN experts and tau for MoE++
        zero-computation experts.
    load_balance_first: the same with f_e counting first choices only (GShard, DeepSpeed top-2).
    z_loss = mean_t logsumexp(logits_t)^2 (ST-MoE).
    seq_balance: load_balance computed per sequence, then averaged (DeepSeek-V3).
    entropy = mean_t -sum_e p log p (the top-p paper's dynamic loss; minimise it).

Every loss takes ``reduce``: a function that sums a tensor over a process group, with autograd
(its backward all-reduces the gradient). Sums and counts go through it before any division, so
under expert or data parallelism each rank computes the loss of the whole global batch, and
with DDP's gradient averaging the gradients equal the single-process run's. ``None`` means a
single process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor] | None


def _sum(t: Tensor, reduce: Reduce) -> Tensor:
    return t if reduce is None else reduce(t)


def assignment_counts(expert_ids_TK: Tensor, num_experts: int, token_mask_T: Tensor | None = None) -> Tensor:
    """Counts assignments per expert: ``[T, K] -> [E]`` (float, no gradient). -1 slots are ignored."""
    ids_N = expert_ids_TK.reshape(-1)
    valid_N = ids_N >= 0
    if token_mask_T is not None:
        valid_N = valid_N & token_mask_T.to(torch.bool).unsqueeze(-1).expand_as(expert_ids_TK).reshape(-1)
    counts = torch.zeros(num_experts + 1, device=ids_N.device, dtype=torch.float32)
    counts.scatter_add_(0, torch.where(valid_N, ids_N, num_experts), valid_N.to(torch.float32))
    return counts[:num_experts]


def _masked_mean_T(values_T: Tensor, token_mask_T: Tensor | None, reduce: Reduce = None) -> Tensor:
    if token_mask_T is None:
        total, count = values_T.sum(), values_T.new_tensor(float(values_T.shape[0]))
    else:
        m = token_mask_T.to(values_T.dtype)
        total, count = (values_T * m).sum(), m.sum()
    return _sum(total, reduce) / _sum(count, reduce).clamp_min(1.0)


def load_balance_loss(
    probs_TE: Tensor,
    choice_ids_TK: Tensor,
    token_mask_T: Tensor | None = None,
    expert_weight_E: Tensor | None = None,
    first_choice_only: bool = False,
    reduce: Reduce = None,
) -> Tensor:
    """Switch/GShard balance loss (see module docstring); gradient flows through ``probs_TE``."""
    num_e = probs_TE.shape[-1]
    ids = choice_ids_TK[:, :1] if first_choice_only else choice_ids_TK
    counts_E = _sum(assignment_counts(ids, num_e, token_mask_T).to(probs_TE.dtype), reduce)
    frac_E = counts_E / counts_E.sum().clamp_min(1.0)
    if token_mask_T is None:
        prob_sum_E, num_tokens = probs_TE.sum(0), probs_TE.new_tensor(float(probs_TE.shape[0]))
    else:
        m_T1 = token_mask_T.to(probs_TE.dtype).unsqueeze(-1)
        prob_sum_E, num_tokens = (probs_TE * m_T1).sum(0), m_T1.sum()
    mean_prob_E = _sum(prob_sum_E, reduce) / _sum(num_tokens, reduce).clamp_min(1.0)
    terms_E = frac_E * mean_prob_E
    if expert_weight_E is not None:
        terms_E = terms_E * expert_weight_E.to(terms_E.dtype)
    return num_e * terms_E.sum()


def seq_balance_loss(
    probs_BSE: Tensor,
    choice_ids_BSK: Tensor,
    token_mask_BS: Tensor | None = None,
    expert_weight_E: Tensor | None = None,
    reduce: Reduce = None,
) -> Tensor:
    """Sequence-wise balance loss: :func:`load_balance_loss` per sequence, averaged over B."""
    losses = [
        load_balance_loss(
            probs_BSE[b],
            choice_ids_BSK[b],
            None if token_mask_BS is None else token_mask_BS[b],
            expert_weight_E,
        )
        for b in range(probs_BSE.shape[0])
    ]
    per_seq_B = torch.stack(losses)
    return _sum(per_seq_B.sum(), reduce) / _sum(per_seq_B.new_tensor(float(per_seq_B.numel())), reduce)


def z_loss(logits_TE: Tensor, token_mask_T: Tensor | None = None, reduce: Reduce = None) -> Tensor:
    """Router z-loss: mean squared logsumexp of the logits."""
    return _masked_mean_T(torch.logsumexp(logits_TE, dim=-1).square(), token_mask_T, reduce)


def router_entropy(probs_TE: Tensor, token_mask_T: Tensor | None = None, reduce: Reduce = None) -> Tensor:
    """Mean entropy of the routing distribution, in nats."""
    ent_T = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1)
    return _masked_mean_T(ent_T, token_mask_T, reduce)
