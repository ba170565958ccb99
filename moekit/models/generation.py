"""Greedy and sampled generation with a KV cache (Hugging Face conventions).

Shape legend: B = batch, S = prompt length, N = tokens generated so far, V = vocabulary.

The prompt may be left-padded (``attention_mask`` 0 on the left); positions come from the
mask's cumulative sum, so a padded row generates the same tokens as the row alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from moekit.models.decoder import KVCache, MoEForCausalLM


def _filter_logits(logits_BV: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Masks logits outside the top-k and outside the top-p nucleus with -inf."""
    if top_k is not None and 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        # Drop a token when the mass before it already reaches p; the top token always stays.
        drop_BV = (probs_BV.cumsum(-1) - probs_BV) >= top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV


def _emit(streamer: Any, ids_B: Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):  # transformers' streamer objects
        streamer.put(ids_B)
    else:
        streamer(ids_B)


@torch.no_grad()
def generate(
    model: MoEForCausalLM,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], Any] | None = None,
) -> Tensor:
    """Generates up to ``max_new_tokens`` tokens per row.

    Args:
        model: the language model (put in eval mode for the call, then restored).
        input_ids: ``[B, S]`` prompt ids, left-padded for ragged batches.
        attention_mask: ``[B, S]``, 1 for real tokens, 0 for padding; None means all real.
        max_new_tokens: tokens to add at most.
        do_sample: sample from the (filtered) distribution instead of taking the argmax.
        temperature: divides the logits before sampling.
        top_k, top_p: sampling filters (top-k tokens, then the smallest nucleus with mass >= p).
        eos_token_id: one id or several; a row stops after producing one.
        pad_token_id: fills rows that already stopped (defaults to the first eos id).
        use_cache: decode one token per step with a :class:`KVCache` (else recompute all).
        generator: RNG for sampling.
        streamer: called with the ``[B]`` new ids after every step (or an object with
            ``put``/``end``, as transformers' streamers).

    Returns:
        ``[B, S + N]`` ids, ``N <= max_new_tokens`` (fewer when every row stopped early).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    eos_ids = (
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id)
    )
    eos_E = torch.tensor(eos_ids, dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    mask_BN = (
        torch.ones_like(input_ids)
        if attention_mask is None
        else attention_mask.to(device=device, dtype=torch.long)
    )

    was_training = model.training
    model.eval()
    try:
        ids_BN = input_ids
        finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
        cache = (
            KVCache(model.config.num_layers, max_length=prompt_len + max_new_tokens) if use_cache else None
        )
        step_ids = input_ids
        for _ in range(max_new_tokens):
            out = model(step_ids, attention_mask=mask_BN, past_key_values=cache, use_cache=use_cache)
            logits_BV = out.logits[:, -1].float()
            if do_sample:
                logits_BV = _filter_logits(logits_BV / temperature, top_k, top_p)
                next_B = torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(-1)
            else:
                next_B = logits_BV.argmax(-1)
            next_B = torch.where(finished_B, pad_token_id, next_B)
            if eos_ids:
                finished_B = finished_B | torch.isin(next_B, eos_E)
            ids_BN = torch.cat([ids_BN, next_B[:, None]], dim=1)
            mask_BN = torch.cat([mask_BN, mask_BN.new_ones(batch, 1)], dim=1)
            _emit(streamer, next_B)
            if eos_ids and bool(finished_B.all()):
                break
            step_ids = next_B[:, None] if use_cache else ids_BN
    finally:
        model.train(was_training)
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
    return ids_BN
