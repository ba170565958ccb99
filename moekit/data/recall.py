"""Multi-query associative recall (MQAR, Zoology's synthetic task), generated in code.

A sequence is ``P`` key-value pairs ``k1 v1 k2 v2 ... kP vP`` followed by ``Q`` queries
``q1 a1 q2 a2 ...``, each query ``q`` one of the pairs' keys and ``a`` its value. Keys are drawn
without replacement from ``[0, num_keys)`` and values (with replacement) from
``[num_keys, num_keys + num_values)``, so a model must look the value up in its context: no
token-level statistic helps beyond chance (``1 / num_values``). Only the answers are scored.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def associative_recall_batch(
    batch_size: int,
    num_pairs: int,
    num_queries: int,
    num_keys: int,
    num_values: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch of MQAR sequences.

    Returns:
        ``input_ids`` ``[B, 2 (P + Q)]`` int64, and ``labels`` ``[B, 2 (P + Q)]``: the input ids at
        the answer positions and ``-100`` elsewhere (the decoder shifts them, so the logits at a
        query token are scored against its answer).
    """
    if num_pairs > num_keys:
        raise ValueError(f"num_pairs={num_pairs} must be <= num_keys={num_keys} (keys are distinct)")
    for name, v in (("batch_size", batch_size), ("num_pairs", num_pairs), ("num_queries", num_queries)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if num_values <= 0:
        raise ValueError(f"num_values must be positive, got {num_values}")
    B, P, Q = batch_size, num_pairs, num_queries
    keys_BP = torch.rand(B, num_keys, generator=generator).argsort(dim=1)[:, :P]
    values_BP = num_keys + torch.randint(0, num_values, (B, P), generator=generator)
    which_BQ = torch.randint(0, P, (B, Q), generator=generator)
    queries_BQ = keys_BP.gather(1, which_BQ)
    answers_BQ = values_BP.gather(1, which_BQ)
    context = torch.stack([keys_BP, values_BP], dim=2).reshape(B, 2 * P)
    tail = torch.stack([queries_BQ, answers_BQ], dim=2).reshape(B, 2 * Q)
    input_ids = torch.cat([context, tail], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 2 * P + 1 :: 2] = answers_BQ
    return input_ids, labels


def recall_accuracy(logits_BSV: Tensor, labels_BS: Tensor) -> float:
    """Share of answers predicted right: the argmax at the token before each labelled position."""
    pred_BS = logits_BSV[:, :-1].argmax(-1)
    target_BS = labels_BS[:, 1:]
    scored = target_BS != IGNORE_INDEX
    return (pred_BS[scored] == target_BS[scored]).float().mean().item()
