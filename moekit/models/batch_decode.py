"""A continuous decoding batch: rows join after their own prefill and leave at token boundaries.

Shape legend: B = rows in the batch, K = keys a step attends to (the longest row plus one),
V = vocabulary, D = model width, Dh = RoPE width, S = prompt tokens, C = one prefill chunk's tokens.

:class:`DecodeBatch` is what a server's scheduler steps: each request is prefilled alone by a
:class:`~moekit.models.decode.DecodeSession` (batch 1, any prompt length, a VLM's spliced
embeddings too), then :meth:`DecodeBatch.join` copies its cache into a
:class:`~moekit.blocks.RaggedKVCache` row. Rows keep their own lengths, so there is no left
padding: each row's RoPE position is its own length and the step's mask hides the slots past it.
One step feeds one token per row through the same layer code a batch-1 session runs
(:func:`~moekit.models.decode.fast_layers_step` or
:func:`~moekit.models.decode.general_layers_step`), so the MoE layer routes and dispatches all
rows' tokens in one call. Rows that finish or are cancelled leave with :meth:`DecodeBatch.keep`.

:class:`ChunkedPrefill` prefills a joining prompt a chunk of at most ``chunk_size`` tokens at a
time (each chunk one batch-1 forward of the general layers over its own cache), so a server can
interleave a long prompt's chunks with the running rows' decode steps instead of stalling them
for the whole prompt; :meth:`DecodeBatch.join` takes it as it takes a prefilled session. The
chunk boundaries depend on the prompt and ``chunk_size`` only, never on the other requests, so a
request's prefill is the same computation whoever else is running.

A row's logits do not depend on the other rows (``tests/test_server_batching.py`` checks it in
float64) as long as every layer treats tokens independently: :func:`batch_decode_supported`
refuses Mamba and lightning layers (their state is not in the ragged cache), mixture-of-attention
heads, and MoE layers whose tokens compete for experts (expert choice, a capacity factor). Models
with per-layer mask types (sliding and full layers, Llama 4's chunked layers) get one ragged mask
per type.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.blocks import KVCache, RaggedKVCache
from moekit.models.decode import DecodeSession, fast_decode_supported, fast_layers_step, general_layers_step
from moekit.models.decoder import MoEForCausalLM, attention_masks


def batch_decode_supported(model: MoEForCausalLM) -> bool:
    """Whether rows of a :class:`DecodeBatch` of ``model`` decode exactly as they would alone."""
    cfg = model.config
    if cfg.layer_types is not None and any(t != "attention" for t in cfg.layer_types):
        return False  # Mamba and lightning layers keep recurrent states the ragged cache does not
    # Per-layer mask types (sliding/full, chunked) get one ragged mask per type (see
    # DecodeBatch.step); mixture-of-attention-heads layers decode one request at a time.
    if cfg.moa_num_experts:
        return False
    # Llama 4's attention temperature scales queries by the layer's cached length, one number
    # for the whole batch; ragged rows each have their own.
    if cfg.attention_temperature_scale is not None:
        return False
    for layer in model.layers:
        if layer.is_moe:
            moe = layer.mlp.config
            # Expert choice and capacity limits make tokens compete: a row's experts would
            # depend on which other rows share the step.
            if moe.router_type == "expert_choice" or moe.capacity_factor is not None:
                return False
    return True


class DecodeBatch:
    """A batch of decoding rows of different lengths, stepped one token per row.

    Args:
        model: the language model (eval mode; gradients are never tracked).
        moe_k: experts per token for every MoE layer (None keeps each layer's top-k).

    Raises:
        ValueError: a model :func:`batch_decode_supported` refuses.
    """

    def __init__(self, model: MoEForCausalLM, moe_k: int | None = None) -> None:
        if not batch_decode_supported(model):
            raise ValueError(
                "DecodeBatch: this model's layers make rows depend on each other "
                "(Mamba or lightning layers, mixture-of-attention heads, expert choice or a capacity factor); "
                "decode its requests one at a time"
            )
        self.model, self.moe_k = model, moe_k
        self.cache = RaggedKVCache(model.config.num_layers)
        #: take the fast decode path (see :func:`fast_decode_supported`); set False to force the
        #: general layers.
        self.fast = fast_decode_supported(model)
        #: which layer code the last :meth:`step` ran: ``"fast"`` or ``"general"`` (None before one)
        self.last_path: str | None = None
        self.num_steps = 0
        self.num_row_steps = 0

    @property
    def num_rows(self) -> int:
        """B: rows in the batch."""
        return self.cache.num_rows

    def join(self, session: DecodeSession | ChunkedPrefill) -> int:
        """Adds a prefilled batch-1 session's tokens as a new row; returns the row's index.

        ``session`` is a :class:`DecodeSession` after its prefill (and any steps) or a finished
        :class:`ChunkedPrefill`. Its next token (sampled from its last logits) is the row's first
        input to :meth:`step`; the session itself is not used afterwards.
        """
        if isinstance(session, ChunkedPrefill):
            if session.remaining:
                raise ValueError(f"DecodeBatch.join: {session.remaining} prompt tokens are not prefilled yet")
        elif session.input_ids.shape[0] != 1:
            raise ValueError(f"DecodeBatch.join: a session of batch 1, got {session.input_ids.shape[0]}")
        elif session.padded:
            raise ValueError("DecodeBatch.join: the session's prompt is padded; rows have no padding")
        cache = session.cache
        if not cache.seq_len:
            raise ValueError("DecodeBatch.join: prefill the session first")
        length = cache.seq_len
        keys = [k[:, :, :length] for k in cache.keys]
        values = [v[:, :, :length] for v in cache.values]
        return self.cache.add_row(keys, values)

    def keep(self, rows: list[int]) -> None:
        """Keeps ``rows`` (their order is the new row order); the others leave the batch."""
        self.cache.keep_rows(rows)

    def _masks(self) -> Tensor | dict[str, Tensor]:
        """The general path's ragged mask ``[B, 1, 1, K]``, or ``{mask type: mask}`` for models with
        per-layer mask types (each layer takes its own, as from :func:`attention_masks`)."""
        cfg, cache = self.model.config, self.cache
        if cfg.attention_layer_types is None:
            return cache.mask(cfg.sliding_window)
        return {
            kind: cache.mask(
                cfg.sliding_window if kind == "sliding" else None,
                cfg.attention_chunk_size if kind == "chunked" else None,
            )
            for kind in set(cfg.attention_layer_types)
        }

    @torch.no_grad()
    def step(self, next_B: Tensor) -> Tensor:
        """Feeds one token per row (``[B]`` int64); returns float32 next-token logits ``[B, V]``."""
        cache, model = self.cache, self.model
        if next_B.shape != (cache.num_rows,):
            raise ValueError(f"DecodeBatch.step: expected [{cache.num_rows}] ids, got {tuple(next_B.shape)}")
        num_keys = max(cache.lengths) + 1
        # Each row's position is its own length: no padding, so no offsets to subtract.
        cos, sin = model.rotary(cache.lengths_B[:, None], num_keys)
        x_B1D = model.embed(next_B[:, None])
        if self.fast:
            # A lone row's keys are all its own: no mask (the fast path has no sliding window).
            mask_B11K = None if cache.num_rows == 1 else cache.mask()
            logits_BV, _ = fast_layers_step(model, x_B1D, cos, sin, mask_B11K, cache, self.moe_k)
            self.last_path = "fast"
        else:
            logits_BV, _ = general_layers_step(model, x_B1D, cos, sin, self._masks(), None, cache, self.moe_k)
            self.last_path = "general"
        cache.advance()
        self.num_steps += 1
        self.num_row_steps += cache.num_rows
        return logits_BV


class ChunkedPrefill:
    """One prompt prefilled alone (batch 1) a chunk at a time, to join a :class:`DecodeBatch`.

    Chunk ``c`` covers prompt tokens ``[c * chunk_size, (c + 1) * chunk_size)``: one forward of
    the general layers (what :meth:`DecodeSession.prefill` runs) over those tokens at their own
    positions, attending to the chunks before it through :attr:`cache` and causally within
    itself. Only the last chunk's last position goes through the LM head. In exact arithmetic
    the last chunk's logits are the one-shot prefill's; in floating point they differ by rounding
    (``tests/test_server_batching.py`` compares them in float64).

    Args:
        model: the language model (eval mode).
        input_ids: ``[1, S]`` prompt ids.
        chunk_size: C, tokens per forward at most (None: the whole prompt in one forward).
        inputs_embeds: ``[1, S, D]`` prompt embeddings instead of ``embed(input_ids)`` (a VLM's
            spliced image + text embeddings).
        moe_k: experts per token for every MoE layer (None keeps each layer's top-k).
    """

    def __init__(
        self,
        model: MoEForCausalLM,
        input_ids: Tensor,
        chunk_size: int | None = None,
        inputs_embeds: Tensor | None = None,
        moe_k: int | None = None,
    ) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"ChunkedPrefill: input_ids must be [1, length>0], got {tuple(input_ids.shape)}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"ChunkedPrefill: chunk_size must be >= 1 (or None), got {chunk_size}")
        if inputs_embeds is not None and inputs_embeds.shape[:2] != input_ids.shape:
            raise ValueError(
                f"inputs_embeds {tuple(inputs_embeds.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        self.model, self.moe_k = model, moe_k
        self.input_ids, self.inputs_embeds = input_ids, inputs_embeds
        self.prompt_len = input_ids.shape[1]
        self.chunk_size = chunk_size or self.prompt_len
        self.cache = KVCache(model.config.num_layers, max_length=self.prompt_len)
        #: prompt tokens in :attr:`cache` so far
        self.done_tokens = 0
        self.num_chunks = 0

    @property
    def remaining(self) -> int:
        """Prompt tokens not prefilled yet."""
        return self.prompt_len - self.done_tokens

    @property
    def next_chunk(self) -> int:
        """Tokens the next :meth:`run_chunk` feeds (0 when done)."""
        return min(self.chunk_size, self.remaining)

    @torch.no_grad()
    def run_chunk(self) -> Tensor | None:
        """Feeds the next chunk; returns float32 next-token logits ``[1, V]`` after the last one, else None."""
        start, num = self.done_tokens, self.next_chunk
        if not num:
            raise RuntimeError("ChunkedPrefill.run_chunk: the prompt is already prefilled")
        end = start + num
        model, device = self.model, self.input_ids.device
        pos_1C = torch.arange(start, end, device=device)[None, :]
        cos, sin = model.rotary(pos_1C, end)
        # Causal within the chunk, everything before it visible (None for a first chunk of a
        # plain causal model: SDPA's is_causal path, as in DecodeSession.prefill).
        mask = attention_masks(model.config, None, 1, num, start, device)
        if self.inputs_embeds is None:
            x_1CD = model.embed(self.input_ids[:, start:end])
        else:
            x_1CD = self.inputs_embeds[:, start:end]
        last = end == self.prompt_len
        logits_1V, _ = general_layers_step(
            model, x_1CD, cos, sin, mask, None, self.cache, self.moe_k, logits=last
        )
        self.done_tokens, self.num_chunks = end, self.num_chunks + 1
        if not last:
            return None
        self.inputs_embeds = None  # the cache holds what the prefill needed; free the copy
        return logits_1V
