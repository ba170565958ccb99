"""Fast token-by-token generation on CPU: a decode session with a preallocated KV cache and masks.

Shape legend: B = batch, S = prompt length (left-padded), N = new tokens at most, K = keys so far
(``S + tokens generated``), V = vocabulary, D = model width, Dh = RoPE width.

:class:`DecodeSession` drives the decoder layers of a :class:`~moekit.models.MoEForCausalLM`
directly instead of calling ``model.forward`` per token, because the per-call work of the general
forward is pure overhead at one token per row:

* the attention mask, the positions and the RoPE tables are built once for the whole generation
  (``[B, S + N]`` mask buffer whose prefix is sliced per step; RoPE rows gathered once for every
  future position) instead of being rebuilt from a growing ``attention_mask`` every step;
* nothing is concatenated per step: the KV cache is preallocated to ``S + N`` and the output ids
  go into a preallocated ``[B, S + N]`` buffer;
* the LM head runs on the last position only (prefill of S tokens needs one row of logits, not S);
* the MoE layers compute only the experts the step routes to (``moekit.layers`` already does).

Sampling, stopping and streaming live in :func:`iter_tokens` (a generator, so a server can run
it one token at a time and stop early) and :func:`generate` (collects everything).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.models.decoder import KVCache, MoEForCausalLM, build_attention_mask


@dataclass(kw_only=True)
class Sampler:
    """Turns next-token scores into token ids.

    Attributes:
        temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: sample among the k highest-scoring tokens (None: all).
        top_p: sample from the smallest nucleus with mass >= p (None or 1.0: all).
        generator: RNG for sampling (a seeded ``torch.Generator`` makes runs repeatable).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax."""
        return self.temperature == 0

    def __call__(self, scores_BV: Tensor) -> Tensor:
        """``[B, V]`` float scores (logits or log-probs; -inf = banned) -> ``[B]`` int64 ids."""
        if self.greedy:
            return scores_BV.argmax(-1)
        from moekit.models.generation import _filter_logits

        scores_BV = _filter_logits(scores_BV / self.temperature, self.top_k, self.top_p)
        return torch.multinomial(scores_BV.softmax(-1), 1, generator=self.generator).squeeze(-1)


class DecodeSession:
    """One batch's decoding state: KV cache, mask buffer, positions and RoPE rows, all preallocated.

    Call :meth:`prefill` once, then :meth:`step` with each chosen token. Both return float32
    next-token logits ``[B, V]``.

    Args:
        model: the language model (used in eval mode; gradients are never tracked).
        input_ids: ``[B, S]`` prompt ids, left-padded for prompts of different lengths.
        attention_mask: ``[B, S]``, 1 for real tokens and 0 for the left padding (None: all real).
        max_new_tokens: N, how many tokens this session may still decode (sizes every buffer).
        moe_k: experts per token for every MoE layer (dynamic k); None keeps each layer's top-k.
        count_experts: accumulate ``expert_assignments`` (routed (token, expert) pairs computed),
            for measuring what dynamic k saves; off by default because it adds a reduction per layer.
    """

    def __init__(
        self,
        model: MoEForCausalLM,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 0,
        moe_k: int | None = None,
        count_experts: bool = False,
    ) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length>0], got {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        cfg = model.config
        self.model, self.moe_k, self.count_experts = model, moe_k, count_experts
        batch, prompt_len = input_ids.shape
        capacity = prompt_len + max_new_tokens
        device = input_ids.device
        self.input_ids, self.prompt_len, self.max_new_tokens = input_ids, prompt_len, max_new_tokens
        self.expert_assignments = 0
        real_BS = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.bool)
        )
        if not bool(real_BS[:, -1].all()):
            raise ValueError("attention_mask: pad prompts on the left (the last prompt token must be real)")
        self.padded = not bool(real_BS.all())
        # One bool buffer for the whole generation: generated tokens are always real, so each step
        # only widens the slice it passes to attention ([B, 1, 1, K], a view, never rebuilt).
        self.mask_BK = torch.ones(batch, capacity, dtype=torch.bool, device=device)
        self.mask_BK[:, :prompt_len] = real_BS
        self._mask_B11C = self.mask_BK[:, None, None, :]
        # Positions skip the left padding, so a padded row decodes exactly like the row alone.
        prompt_pos_BS = (real_BS.long().cumsum(-1) - 1).clamp_min(0)
        next_pos_B = prompt_pos_BS[:, -1] + 1
        decode_pos_BN = next_pos_B[:, None] + torch.arange(max_new_tokens, device=device)
        self._prompt_pos_BS = prompt_pos_BS
        rotary = model.rotary
        self._cos_B1Nd, self._sin_B1Nd = rotary(decode_pos_BN, capacity) if max_new_tokens else (None, None)
        self.cache = KVCache(cfg.num_layers, max_length=capacity)
        self.num_decoded = 0
        self._use_residual = cfg.moe is not None and cfg.moe.gating_residual
        self._sliding_window = cfg.sliding_window

    def _run_layers(self, x_BSD: Tensor, cos, sin, mask, token_mask_BS) -> Tensor:
        prev_logits_TE = None
        for layer in self.model.layers:
            x_BSD, moe_out = layer(
                x_BSD,
                cos,
                sin,
                mask,
                token_mask_BS,
                prev_logits_TE if self._use_residual else None,
                self.moe_k,
                cache=self.cache,
            )
            if moe_out is not None:
                prev_logits_TE = moe_out.routing.router_logits
                if self.count_experts:
                    self.expert_assignments += int((moe_out.routing.expert_ids >= 0).sum())
        # Only the last position's logits are ever needed: skip S-1 rows of the LM head.
        last_BD = x_BSD[:, -1]
        return self.model.lm_head(self.model.norm(last_BD)).float()

    @torch.no_grad()
    def prefill(self) -> Tensor:
        """Runs the prompt; returns the ``[B, V]`` logits for the first new token."""
        if self.cache.seq_len:
            raise RuntimeError("DecodeSession.prefill: already prefilled")
        batch, prompt_len = self.input_ids.shape
        device = self.input_ids.device
        cos, sin = self.model.rotary(self._prompt_pos_BS, prompt_len)
        if self.padded or self._sliding_window is not None:
            mask = build_attention_mask(
                self.mask_BK[:, :prompt_len] if self.padded else None,
                batch,
                prompt_len,
                0,
                self._sliding_window,
                device,
            )
        else:
            mask = None  # plain causal: SDPA's is_causal path
        token_mask = self.mask_BK[:, :prompt_len] if self.padded else None
        return self._run_layers(self.model.embed_tokens(self.input_ids), cos, sin, mask, token_mask)

    @torch.no_grad()
    def step(self, next_B: Tensor) -> Tensor:
        """Feeds one token per row (``[B]`` int64); returns the ``[B, V]`` logits for the next one."""
        t = self.num_decoded
        if t >= self.max_new_tokens:
            raise RuntimeError(f"DecodeSession.step: all {self.max_new_tokens} preallocated steps are used")
        num_keys = self.prompt_len + t + 1
        if self._sliding_window is not None:
            mask = build_attention_mask(
                self.mask_BK[:, :num_keys],
                next_B.shape[0],
                1,
                num_keys - 1,
                self._sliding_window,
                next_B.device,
            )
        else:
            mask = self._mask_B11C[..., :num_keys]
        cos = self._cos_B1Nd[:, :, t : t + 1]
        sin = self._sin_B1Nd[:, :, t : t + 1]
        self.num_decoded = t + 1
        x_B1D = self.model.embed_tokens(next_B[:, None])
        return self._run_layers(x_B1D, cos, sin, mask, None)


def _eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def iter_tokens(
    source,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Iterator[Tensor]:
    """Yields the ``[B]`` new ids of each step until ``max_new_tokens`` or every row hit EOS.

    The prompt is prefilled on the first ``next()``; each later ``next()`` decodes one token, so a
    caller (a server thread) can stop between tokens by simply not asking for more.

    Args:
        source: a :class:`DecodeSession`, or anything with ``prefill() -> [B, V]`` and
            ``step(ids_B) -> [B, V]`` scores (e.g. :class:`moekit.infer.decoding.SelfContrastSession`).
        max_new_tokens: tokens to produce at most (the session must have room for them).
        sampler: how scores become ids (default greedy).
        eos_token_id: a row stops after producing one of these; later rows get ``pad_token_id``.
        pad_token_id: fill for finished rows (default: the first EOS id, else 0).
    """
    sampler = sampler or Sampler()
    eos_ids = _eos_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if max_new_tokens <= 0:
        return
    scores_BV = source.prefill()
    batch = scores_BV.shape[0]
    finished_B = torch.zeros(batch, dtype=torch.bool, device=scores_BV.device)
    eos_E = torch.tensor(eos_ids, dtype=torch.long, device=scores_BV.device)
    for step in range(max_new_tokens):
        next_B = sampler(scores_BV)
        if eos_ids:
            next_B = torch.where(finished_B, pad, next_B)
            finished_B |= torch.isin(next_B, eos_E)
        yield next_B
        # On CPU there is no device queue to drain, so this check costs only a few microseconds.
        if (eos_ids and bool(finished_B.all())) or step + 1 == max_new_tokens:
            return
        scores_BV = source.step(next_B)


@torch.no_grad()
def generate(
    model: MoEForCausalLM,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    sampler: Sampler | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    moe_k: int | None = None,
    streamer: Callable[[Tensor], object] | None = None,
    source=None,
) -> Tensor:
    """Generates up to ``max_new_tokens`` per row with a :class:`DecodeSession`.

    Args:
        model: the language model.
        input_ids: ``[B, S]`` prompt ids, left-padded for ragged batches.
        attention_mask: ``[B, S]`` (1 = real token), or None.
        max_new_tokens: tokens to add at most.
        sampler: greedy by default; see :class:`Sampler`.
        eos_token_id, pad_token_id: as in :func:`iter_tokens`.
        moe_k: experts per token (dynamic k); None keeps the model's top-k.
        streamer: called with the ``[B]`` new ids after every step.
        source: a prebuilt score source (e.g. an SCMoE session) to use instead of a plain session.

    Returns:
        ``[B, S + N]`` ids (prompt then new tokens), ``N <= max_new_tokens``.
    """
    was_training = model.training
    model.eval()
    try:
        if source is None:
            source = DecodeSession(model, input_ids, attention_mask, max_new_tokens, moe_k=moe_k)
        batch, prompt_len = input_ids.shape
        out_BC = input_ids.new_empty(batch, prompt_len + max_new_tokens)
        out_BC[:, :prompt_len] = input_ids
        num = 0
        for next_B in iter_tokens(source, max_new_tokens, sampler, eos_token_id, pad_token_id):
            out_BC[:, prompt_len + num] = next_B
            num += 1
            if streamer is not None:
                streamer(next_B)
        return out_BC[:, : prompt_len + num]
    finally:
        model.train(was_training)
