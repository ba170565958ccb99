"""Moved to :mod:`moekit.data.tokenizer`; kept so old imports keep working."""

from moekit.data.tokenizer import (  # noqa: F401
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    load_tokenizer,
    save_tokenizer,
    special_token_id,
    tokenizer_hash,
    train_tokenizer,
)
