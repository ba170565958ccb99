"""The text data module: a corpus, its tokenizer and the window sampler, for causal LMs.

:func:`prepare_tokenizer` loads or trains (and caches) the byte-level BPE;
:func:`build_text_data` resolves the corpus, splits it, tokenises it (cached) and returns a
:class:`TextDataModule` whose batches are ``[B, L + 1]`` int64 windows (inputs ``[:, :-1]``,
targets ``[:, 1:]``).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from moekit.data.base import DataModule
from moekit.data.corpus import (
    Document,
    TokenData,
    corpus_fingerprint,
    default_cache_dir,
    read_text,
    unigram_loss,
)
from moekit.data.sampler import WindowSampler, eval_batches
from moekit.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def prepare_tokenizer(
    train_docs: list[Document],
    vocab_size: int,
    sample_bytes: int,
    cache_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Tokenizer:
    """Loads ``tokenizer_dir``, or a cached tokenizer trained on the same sample, or trains one.

    The sample is the first ``sample_bytes`` characters of the train documents in path order, so
    it is deterministic; the cache key hashes the documents, ``vocab_size`` and ``sample_bytes``.
    """
    if tokenizer_dir:
        return load_tokenizer(tokenizer_dir)
    sample, total = [], 0
    for doc in train_docs:  # sorted by path: a deterministic sample
        if total >= sample_bytes:
            break
        text = read_text(doc)[: sample_bytes - total]
        sample.append(text)
        total += len(text)
    key_src = f"{corpus_fingerprint(train_docs)}|{vocab_size}|{sample_bytes}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache = (Path(cache_dir) if cache_dir else default_cache_dir()) / "tokenizers" / key
    if (cache / "tokenizer.json").is_file():
        with contextlib.suppress(ValueError):
            return load_tokenizer(cache)
    tok = train_tokenizer(sample, vocab_size)
    save_tokenizer(tok, cache)
    return tok


class TextDataModule(DataModule):
    """Random ``seq_len + 1`` windows of a token stream for training, fixed windows for validation.

    Args:
        tokenizer: saved into every checkpoint (:meth:`save_artifacts`).
        tokens: both token streams (:func:`~moekit.data.corpus.load_token_data`).
        seq_len: L.
        batch_size: B.
        eval_steps: number of validation batches.
        seed: the sampler's own generator seed (differs per rank under data parallelism).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokens: TokenData,
        seq_len: int,
        batch_size: int,
        eval_steps: int,
        seed: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.sampler = WindowSampler(tokens.train, seq_len, batch_size, seed)
        self._val = eval_batches(tokens.val, seq_len, batch_size, eval_steps)
        self.unigram_loss = unigram_loss(tokens.train, tokens.val, tokens.vocab_size)

    def next_train_batch(self) -> Tensor:
        """``[B, L + 1]`` int64 token ids."""
        return self.sampler.next_batch()

    def val_batches(self) -> list[Tensor]:
        """``eval_steps`` batches of ``[B, L + 1]`` windows spread evenly over the validation stream."""
        return self._val

    def state_dict(self) -> dict[str, Any]:
        """The sampler's ``{"seed", "num_batches", "generator"}``."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.sampler.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        """Token and document counts of both splits and the unigram baseline."""
        return {
            "unigram_val_loss": self.unigram_loss,
            "num_train_tokens": len(self.tokens.train),
            "num_val_tokens": len(self.tokens.val),
            "num_train_docs": self.tokens.num_train_docs,
            "num_val_docs": self.tokens.num_val_docs,
        }

    def baselines(self) -> dict[str, float]:
        """``{"unigram_val_loss"}``: the context-free loss a trained LM should beat."""
        return {"unigram_val_loss": self.unigram_loss}

    def save_artifacts(self, folder: Path) -> None:
        """Writes the tokenizer, so each checkpoint is also a tokenizer folder."""
        save_tokenizer(self.tokenizer, folder)

    @property
    def tokenizer_hash(self) -> str:
        """Content hash of the tokenizer (recorded in checkpoints)."""
        return tokenizer_hash(self.tokenizer)
