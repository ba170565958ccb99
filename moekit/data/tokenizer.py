"""A byte-level BPE tokenizer trained with the ``tokenizers`` package, saved in the Hugging Face layout.

A tokenizer folder holds ``tokenizer.json`` (the whole tokenizer), ``tokenizer_config.json`` and
``special_tokens_map.json``, so ``transformers.AutoTokenizer.from_pretrained(folder)`` and
``PreTrainedTokenizerFast(tokenizer_file=...)`` load it with the same ids as :func:`load_tokenizer`.

Byte-level means every byte string is encodable: there is no unknown token, so any corpus (or any
prompt at inference time) round-trips. Ids 0 and 1 are the special tokens ``<|endoftext|>`` (document
separator, also the EOS) and ``<|pad|>``; no BOS is added, so training streams are plain concatenations.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # tokenizers is an optional dependency (the ``hf`` extra)
    from tokenizers import Tokenizer

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# 256 byte symbols plus the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _import_tokenizers():
    try:
        import tokenizers
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "moekit.data needs the `tokenizers` package; install it with `pip install moekit[hf]`"
        ) from e
    return tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Trains a byte-level BPE on ``texts``.

    Args:
        texts: the training sample (keep it bounded, a few MB, so this takes seconds).
        vocab_size: target vocabulary size including the special tokens; the result may be smaller
            when the sample has fewer distinct merges.
        min_frequency: merges seen fewer times than this are not learned.

    Returns:
        A ``tokenizers.Tokenizer`` with ``<|endoftext|>`` = 0 and ``<|pad|>`` = 1.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {MIN_VOCAB_SIZE} "
            "(256 bytes + 2 special tokens)"
        )
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    """A content hash of the tokenizer (its canonical JSON); token caches are keyed on it."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def save_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int | None = None) -> Path:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``folder``.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000,
    }
    special = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    files = {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    for name, text in files.items():
        tmp = folder / f"{name}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    return folder


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Loads the ``tokenizers.Tokenizer`` saved in ``folder`` (a tokenizer or checkpoint folder)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass a folder written by moekit.data.save_tokenizer "
            "(or a moekit checkpoint folder)"
        )
    tk = _import_tokenizers()
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e


def special_token_id(tok: Tokenizer, token: str = EOS_TOKEN) -> int:
    """The id of a special token, with a clear error if the tokenizer lacks it."""
    idx = tok.token_to_id(token)
    if idx is None:
        raise ValueError(f"the tokenizer has no {token!r} token; train it with moekit.data.train_tokenizer")
    return idx
