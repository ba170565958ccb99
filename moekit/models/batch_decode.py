"""A continuous decoding batch: rows join after their own prefill and leave at token boundaries.

Shape legend: B = rows in the batch, K = keys a step attends to (the longest row plus one),
V = vocabulary, D = model width, Dh = RoPE width.

:class:`DecodeBatch` is what a server's scheduler steps: each request is prefilled alone by a
:class:`~moekit.models.decode.DecodeSession` (batch 1, any prompt length, a VLM's spliced
embeddings too), then :meth:`DecodeBatch.join` copies its cache into a
:class:`~moekit.blocks.RaggedKVCache` row. Rows keep their own lengths, so there is no left
padding: each row's RoPE position is its own length and the step's mask hides the slots past it.
One step feeds one token per row through the same layer code a batch-1 session runs
(:func:`~moekit.models.decode.fast_layers_step` or
:func:`~moekit.models.decode.general_layers_step`), so the MoE layer routes and dispatches all
rows' tokens in one call. Rows that finish or are cancelled leave with :meth:`DecodeBatch.keep`.

A row's logits do not depend on the other rows (``tests/test_server_batching.py`` checks it in
float64) as long as every layer treats tokens independently: :func:`batch_decode_supported`
refuses Mamba layers (their state is not in the ragged cache) and MoE layers whose tokens
compete for experts (expert choice, a capacity factor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.blocks import RaggedKVCache
from moekit.models.decode import DecodeSession, fast_decode_supported, fast_layers_step, general_layers_step
from moekit.models.decoder import MoEForCausalLM


def batch_decode_supported(model: MoEForCausalLM) -> bool:
    """Whether rows of a :class:`DecodeBatch` of ``model`` decode exactly as they would alone."""
    cfg = model.config
    if cfg.layer_types is not None and any(t != "attention" for t in cfg.layer_types):
        return False  # Mamba and lightning layers keep recurrent states the ragged cache does not
    # The ragged cache builds one mask for every layer: per-layer mask types (sliding/full,
    # chunked) and mixture-of-attention-heads layers decode one request at a time.
    if cfg.attention_layer_types is not None or cfg.attention_chunk_size is not None or cfg.moa_num_experts:
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
                "(Mamba layers, expert choice or a capacity factor); decode its requests one at a time"
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

    def join(self, session: DecodeSession) -> int:
        """Adds a prefilled batch-1 session's tokens as a new row; returns the row's index.

        The session's next token (sampled from its prefill or last step's logits) is the row's
        first input to :meth:`step`; the session itself is not used afterwards.
        """
        if session.input_ids.shape[0] != 1:
            raise ValueError(f"DecodeBatch.join: a session of batch 1, got {session.input_ids.shape[0]}")
        if session.padded:
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
            mask_B11K = cache.mask(model.config.sliding_window)
            logits_BV, _ = general_layers_step(model, x_B1D, cos, sin, mask_B11K, None, cache, self.moe_k)
            self.last_path = "general"
        cache.advance()
        self.num_steps += 1
        self.num_row_steps += cache.num_rows
        return logits_BV
