"""The text-level bridge: an expert whose tokenizer differs from the mixture's.

Shape legend: V = the mixture's (primary) vocabulary, M = candidates per step, N = windows,
T = continuation tokens.

A mixture of next-token distributions needs one vocabulary. The first expert's tokenizer is the
mixture's (the *primary* one); an expert with another tokenizer is seen through the text:

* **decoding** (:meth:`TextBridge.next_logprobs`): the primary ids so far are decoded to text and
  re-encoded with the expert's tokenizer; the expert runs over that, and each of its ``M`` most
  likely next tokens is mapped to the primary token that ``text + piece`` starts with after the
  context. Their probabilities are summed per primary token and renormalised over the mapped
  mass. Approximations: a piece shorter than a primary token credits the shorter primary token;
  mass outside the top M is dropped.
* **scoring** (:meth:`TextBridge.score_windows`): the window's text is encoded once with the
  expert's tokenizer and each of the expert's token log-probabilities is credited to the primary
  token in which that token ends (by character offsets), so a window's total is the expert's
  log-probability of the same text (up to the prompt/continuation boundary).

**Cost.** Retokenization changes the expert's ids at the end of the text, so its KV cache cannot
be kept: every generated token re-runs the bridged expert over the whole context (quadratic in
the length, against linear for a native expert through its
:class:`~moekit.models.decode.DecodeSession`), plus ``M`` encodes of short texts. Scoring costs
one forward per window, as for a native expert.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class TextBridge:
    """An expert ``model`` with its own ``tokenizer``, speaking the ``primary`` tokenizer's ids.

    Args:
        model: the expert (a causal LM).
        tokenizer: its own ``tokenizers.Tokenizer``.
        primary: the mixture's tokenizer.
        vocab_size: the mixture's vocabulary V (scores are ``[1, V]``).
        num_candidates: M, the expert's next tokens mapped per step.
    """

    def __init__(self, model, tokenizer, primary, vocab_size: int, num_candidates: int = 32) -> None:
        self.model, self.tokenizer, self.primary = model, tokenizer, primary
        self.vocab_size, self.num_candidates = vocab_size, num_candidates
        self.config = model.config  # what callers read (positions, width)

    def _own_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    @torch.no_grad()
    def next_logprobs(self, primary_ids: list[int]) -> Tensor:
        """The bridged next-token log-probabilities over the primary vocabulary: ``[1, V]`` float64
        (-inf outside the mapped candidates)."""
        context = self.primary.decode(primary_ids)
        own = self._own_ids(context) or [0]
        logits = self.model(torch.tensor([own])).logits[0, -1].double()
        probs, ids = logits.softmax(-1).topk(min(self.num_candidates, logits.shape[-1]))
        out = torch.zeros(self.vocab_size, dtype=torch.float64)
        n = len(primary_ids)
        for p, tid in zip(probs.tolist(), ids.tolist(), strict=True):
            piece = self.tokenizer.decode([tid])
            if not piece:
                continue
            ext = self.primary.encode(context + piece).ids
            # The primary token after the context (when re-encoding kept the context's ids).
            if len(ext) > n and ext[:n] == primary_ids and ext[n] < self.vocab_size:
                out[ext[n]] += p
        total = float(out.sum())
        if total <= 0:  # nothing mapped: a uniform guess rather than no distribution
            return torch.full((1, self.vocab_size), -math.log(self.vocab_size), dtype=torch.float64)
        return (out / total).log()[None]

    @torch.no_grad()
    def score_windows(self, windows_NL: Tensor, prompt_len: int) -> Tensor:
        """``[N, T]`` float64: the expert's log-probability of each continuation token's text."""
        rows = []
        for window in windows_NL.tolist():
            # Character span of each primary token, from decoding growing prefixes.
            ends = [len(self.primary.decode(window[: i + 1])) for i in range(len(window))]
            text = self.primary.decode(window)
            enc = self.tokenizer.encode(text)
            own = enc.ids
            credit = torch.zeros(len(window), dtype=torch.float64)
            if len(own) >= 2:
                logp = self.model(torch.tensor([own[:-1]])).logits[0].double().log_softmax(-1)
                token_lp = logp.gather(-1, torch.tensor(own[1:])[:, None])[:, 0]
                j = 0
                for k, (_, end) in enumerate(enc.offsets[1:]):
                    while j < len(ends) - 1 and ends[j] < end:
                        j += 1
                    credit[j] += token_lp[k]
            rows.append(credit[prompt_len:])
        return torch.stack(rows)


class BridgedSession:
    """A :class:`TextBridge` with the ``prefill``/``step`` interface of a decode session."""

    def __init__(self, bridge: TextBridge, prompt_ids: list[int]) -> None:
        self.bridge, self.ids = bridge, list(prompt_ids)

    def prefill(self) -> Tensor:
        """Scores for the first new token (log-probs ``[1, V]``)."""
        return self.bridge.next_logprobs(self.ids)

    def step(self, next_B: Tensor) -> Tensor:
        """Appends the chosen token; scores for the next one."""
        self.ids.append(int(next_B[0]))
        return self.bridge.next_logprobs(self.ids)


__all__ = ["BridgedSession", "TextBridge"]
