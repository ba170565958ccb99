"""The per-layer cache of a decoding batch: keys/values (preallocated, grown in chunks) or Mamba states,
and the ragged cache of a continuous batch (rows of their own lengths that join and leave).

Shape legend: B = batch, G = key/value heads, S = new tokens, P = cached tokens, Dh = head width,
I = Mamba inner width, K = conv kernel width (Mamba) or keys a ragged step attends to,
N = SSM state size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MambaState:
    """The recurrent state of one Mamba layer for a batch (constant size, whatever the length).

    Attributes:
        conv_BIK: ``[B, I, K]`` the last K inputs of the causal conv (zeros before the first token).
        ssm_BIN: ``[B, I, N]`` the selective-scan state after the last token.
    """

    conv_BIK: Tensor
    ssm_BIN: Tensor


class KVCache:
    """Per-layer key/value cache for a batch, preallocated and grown in chunks.

    Each layer holds ``keys``/``values`` ``[B, G, capacity, Dh]``; :meth:`update` writes the new
    tokens in place and returns views of the filled part, so decoding does not reallocate per
    token. When the capacity runs out it grows to the next multiple of ``chunk_size`` (one copy).
    An attention block may store anything token-indexed on dim 2 (MLA stores its latent as
    "keys" and its shared rotary key as "values").

    A hybrid model's Mamba layers keep a :class:`MambaState` instead (:meth:`mamba_state`,
    :meth:`set_mamba_state`), linear-attention layers one state tensor (:meth:`recurrent_state`,
    :meth:`set_recurrent_state`); they count tokens in ``lengths`` too, so :attr:`seq_len` holds
    whichever kind layer 0 is.

    Args:
        num_layers: decoder layers (attention or Mamba).
        max_length: initial capacity (e.g. prompt + new tokens, so generation never grows).
        chunk_size: growth granularity in tokens.
    """

    def __init__(self, num_layers: int, max_length: int = 0, chunk_size: int = 256) -> None:
        if chunk_size <= 0:
            raise ValueError(f"KVCache: chunk_size must be positive, got {chunk_size}")
        self.num_layers, self.max_length, self.chunk_size = num_layers, max_length, chunk_size
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.mamba_states: list[MambaState | None] = [None] * num_layers
        self.recurrent_states: list[Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        """P: tokens cached so far (layer 0's count; all layers agree between forwards)."""
        return self.lengths[0]

    def capacity(self, layer_idx: int) -> int:
        """Tokens layer ``layer_idx`` can hold before growing."""
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def update(self, layer_idx: int, k_BGSd: Tensor, v_BGSd: Tensor) -> tuple[Tensor, Tensor]:
        """Appends S new keys/values ``[B, G, S, Dh]``; returns all ``[B, G, P + S, Dh]`` (views)."""
        length, new = self.lengths[layer_idx], k_BGSd.shape[2]
        end = length + new
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if old_k is not None and old_k.shape[:2] != k_BGSd.shape[:2]:
            raise ValueError(
                f"KVCache layer {layer_idx}: cached batch/heads {tuple(old_k.shape[:2])} != new "
                f"{tuple(k_BGSd.shape[:2])}; use a fresh cache for a new batch"
            )
        if end > self.capacity(layer_idx):
            capacity = max(self.max_length, math.ceil(end / self.chunk_size) * self.chunk_size)
            b, g, _, d = k_BGSd.shape
            new_k = k_BGSd.new_empty(b, g, capacity, d)
            new_v = v_BGSd.new_empty(b, g, capacity, v_BGSd.shape[-1])
            if old_k is not None and length:
                new_k[:, :, :length] = old_k[:, :, :length]
                new_v[:, :, :length] = old_v[:, :, :length]
            self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, length:end] = k_BGSd
        values[:, :, length:end] = v_BGSd
        self.lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def mamba_state(self, layer_idx: int) -> MambaState | None:
        """Mamba layer ``layer_idx``'s state after the cached tokens (None before its first call)."""
        return self.mamba_states[layer_idx]

    def set_mamba_state(self, layer_idx: int, state: MambaState, num_new: int) -> None:
        """Stores Mamba layer ``layer_idx``'s state after ``num_new`` more tokens."""
        old = self.mamba_states[layer_idx]
        if old is not None and old.ssm_BIN.shape[0] != state.ssm_BIN.shape[0]:
            raise ValueError(
                f"KVCache layer {layer_idx}: cached batch {old.ssm_BIN.shape[0]} != new "
                f"{state.ssm_BIN.shape[0]}; use a fresh cache for a new batch"
            )
        self.mamba_states[layer_idx] = state
        self.lengths[layer_idx] += num_new

    def recurrent_state(self, layer_idx: int) -> Tensor | None:
        """A linear-attention layer's state after the cached tokens (None before its first call)."""
        return self.recurrent_states[layer_idx]

    def set_recurrent_state(self, layer_idx: int, state: Tensor, num_new: int) -> None:
        """Stores linear-attention layer ``layer_idx``'s state (any tensor) after ``num_new`` more tokens."""
        self.recurrent_states[layer_idx] = state
        self.lengths[layer_idx] += num_new

    def crop(self, length: int) -> None:
        """Forgets every token after the first ``length`` (speculative decoding rollback).

        Raises:
            ValueError: when a Mamba layer would have to forget tokens: its state is a running
                summary that cannot be rolled back.
        """
        for i, state in enumerate(self.mamba_states):
            if (state is not None or self.recurrent_states[i] is not None) and length < self.lengths[i]:
                raise ValueError(
                    f"KVCache.crop({length}): layer {i} (Mamba or linear attention) holds a recurrent state over "
                    f"{self.lengths[i]} tokens that cannot be rolled back"
                )
        self.lengths = [min(n, length) for n in self.lengths]


class RaggedKVCache:
    """Per-layer keys/values of a decoding batch whose rows have their own lengths (no padding).

    Row ``b`` holds its first ``lengths[b]`` tokens at slots ``0 .. lengths[b] - 1`` of
    ``keys[layer]`` ``[B, G, capacity, Dh]``; slots past a row's length hold stale but finite
    values that the step's mask hides (zeros at first, since a masked NaN would still poison
    SDPA's weighted sum). Rows join (:meth:`add_row`, with a prefilled cache of their own) and
    leave (:meth:`keep_rows`) between steps, so a server can run a continuous batch. A decode step
    writes one token per row at that row's own position (:meth:`update`) and :meth:`advance`
    moves every row on by one after the last layer.

    Args:
        num_layers: decoder layers (attention only; Mamba layers need a recurrent state per row).
        chunk_size: capacity grows to a multiple of this many tokens.
    """

    def __init__(self, num_layers: int, chunk_size: int = 64) -> None:
        if chunk_size <= 0:
            raise ValueError(f"RaggedKVCache: chunk_size must be positive, got {chunk_size}")
        self.num_layers, self.chunk_size = num_layers, chunk_size
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        #: tokens cached per row (the next token's position, as rows have no padding)
        self.lengths: list[int] = []
        self.lengths_B: Tensor | None = None

    @property
    def num_rows(self) -> int:
        """B: rows in the batch."""
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        """Slots per row before the cache grows."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def _resize(self, capacity: int) -> None:
        for i in range(self.num_layers):
            for store in (self.keys, self.values):
                old = store[i]
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                keep = min(capacity, old.shape[2])
                new[:, :, :keep] = old[:, :, :keep]
                store[i] = new

    def reserve(self, num_tokens: int) -> None:
        """Makes room for rows of up to ``num_tokens`` tokens (one copy when it grows)."""
        if self.keys[0] is not None and num_tokens > self.capacity:
            self._resize(math.ceil(num_tokens / self.chunk_size) * self.chunk_size)

    def add_row(self, keys: list[Tensor], values: list[Tensor]) -> int:
        """Appends a row from its own cache: per layer ``[1, G, S, Dh]`` (S = its tokens); returns its index."""
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"RaggedKVCache.add_row: need {self.num_layers} layers, got {len(keys)}")
        length = keys[0].shape[2]
        if self.keys[0] is None:
            capacity = math.ceil(max(length, 1) / self.chunk_size) * self.chunk_size
            for i in range(self.num_layers):
                for store, src in ((self.keys, keys[i]), (self.values, values[i])):
                    store[i] = src.new_zeros(0, src.shape[1], capacity, src.shape[3])
        self.reserve(length)
        for i in range(self.num_layers):
            for store, src in ((self.keys, keys[i]), (self.values, values[i])):
                row = store[i].new_zeros(1, *store[i].shape[1:])
                row[:, :, :length] = src
                store[i] = torch.cat([store[i], row])
        self.lengths.append(length)
        self._sync_lengths()
        return self.num_rows - 1

    def keep_rows(self, rows: list[int]) -> None:
        """Keeps only ``rows`` (in that order); every other row leaves the batch."""
        if rows == list(range(self.num_rows)):
            return
        if self.keys[0] is not None:
            index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
            for i in range(self.num_layers):
                self.keys[i] = self.keys[i].index_select(0, index)
                self.values[i] = self.values[i].index_select(0, index)
        self.lengths = [self.lengths[r] for r in rows]
        self._sync_lengths()

    def _sync_lengths(self) -> None:
        device = None if self.keys[0] is None else self.keys[0].device
        self.lengths_B = torch.tensor(self.lengths, dtype=torch.long, device=device)

    def update(self, layer_idx: int, k_BG1d: Tensor, v_BG1d: Tensor) -> tuple[Tensor, Tensor]:
        """Writes one new key/value per row at that row's position; returns ``[B, G, K, Dh]`` views.

        K is the longest row's length plus one; :meth:`mask` says which of them each row sees.
        """
        if k_BG1d.shape[2] != 1 or k_BG1d.shape[0] != self.num_rows:
            raise ValueError(
                f"RaggedKVCache.update: expected [{self.num_rows}, G, 1, Dh], got {tuple(k_BG1d.shape)}"
            )
        num_keys = max(self.lengths) + 1
        self.reserve(num_keys)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.num_rows == 1:  # a plain slice copy: a lone row pays no indexing
            keys[:, :, num_keys - 1 : num_keys] = k_BG1d
            values[:, :, num_keys - 1 : num_keys] = v_BG1d
        else:  # one scatter along the token dim, at each row's own position
            pos_B111 = self.lengths_B.view(-1, 1, 1, 1)
            keys.scatter_(2, pos_B111.expand_as(k_BG1d), k_BG1d)
            values.scatter_(2, pos_B111.expand_as(v_BG1d), v_BG1d)
        return keys[:, :, :num_keys], values[:, :, :num_keys]

    def mask(self, sliding_window: int | None = None, attention_chunk: int | None = None) -> Tensor:
        """The step's bool SDPA mask ``[B, 1, 1, K]``: each row sees its own tokens and the new one.

        ``sliding_window`` keeps the new token and the previous ``sliding_window - 1``;
        ``attention_chunk`` keeps the slots of the new token's chunk (``[c * C, (c + 1) * C)``,
        Llama 4's chunked layers), the same as :func:`~moekit.blocks.build_attention_mask`.
        """
        num_keys = max(self.lengths) + 1
        k_1K = torch.arange(num_keys, device=self.lengths_B.device)[None, :]
        pos_B1 = self.lengths_B[:, None]  # the new token's position (rows have no padding)
        allowed_BK = k_1K <= pos_B1
        if sliding_window is not None:
            allowed_BK = allowed_BK & (pos_B1 - k_1K < sliding_window)
        if attention_chunk is not None:
            allowed_BK = allowed_BK & (k_1K // attention_chunk == pos_B1 // attention_chunk)
        return allowed_BK[:, None, None, :]

    def advance(self) -> None:
        """Every row now holds one more token (call after the step's last layer)."""
        self.lengths = [n + 1 for n in self.lengths]
        self.lengths_B = self.lengths_B + 1
