"""Random training windows and fixed validation windows over a flat token stream.

Shape legend: B = batch size, L = sequence length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


class WindowSampler:
    """Draws batches of random ``seq_len + 1`` windows from a token stream.

    The generator state and the batch count are the whole state (:meth:`state_dict`), so a resumed
    run draws exactly the batches the uninterrupted run would have drawn.

    Args:
        tokens: 1-D token stream.
        seq_len: L; each window has L + 1 tokens (inputs and shifted targets).
        batch_size: B.
        seed: seeds the sampler's own ``torch.Generator`` (independent of the global RNG).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"the train split has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                "pass a bigger corpus or a smaller --seq-len"
            )
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.num_batches = 0

    def next_batch(self) -> Tensor:
        """Returns ``[B, L + 1]`` int64 token ids."""
        num_starts = len(self.tokens) - self.seq_len
        starts = torch.randint(0, num_starts, (self.batch_size,), generator=self.generator).tolist()
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        self.num_batches += 1
        return torch.from_numpy(rows)

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "num_batches", "generator"}``; the generator state is a uint8 tensor."""
        return {"seed": self.seed, "num_batches": self.num_batches, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.seed, self.num_batches = int(state["seed"]), int(state["num_batches"])
        self.generator.set_state(state["generator"])


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int) -> list[Tensor]:
    """Fixed validation batches: ``num_batches * B`` windows spread evenly over the stream.

    No randomness, so every evaluation scores the same tokens and evaluation never moves any RNG.
    """
    num_starts = len(tokens) - seq_len
    if num_starts < 1:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "pass a bigger corpus, a larger val_fraction or a smaller --seq-len"
        )
    num_windows = min(num_batches * batch_size, num_starts)
    starts = np.linspace(0, num_starts - 1, num_windows).astype(np.int64)
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    return list(torch.from_numpy(rows).split(batch_size))
