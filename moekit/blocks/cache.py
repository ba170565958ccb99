"""The per-layer cache of a decoding batch: keys/values (preallocated, grown in chunks) or Mamba states.

Shape legend: B = batch, G = key/value heads, S = new tokens, P = cached tokens, Dh = head width,
I = Mamba inner width, K = conv kernel width, N = SSM state size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
