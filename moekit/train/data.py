"""Moved to :mod:`moekit.data` (corpus, sampler); kept so old imports keep working."""

from moekit.data.corpus import (  # noqa: F401
    CACHE_FORMAT,
    SKIP_DIRS,
    STDLIB_SKIP_DIRS,
    Document,
    TokenData,
    corpus_fingerprint,
    default_cache_dir,
    is_validation,
    load_token_data,
    read_text,
    resolve_corpus,
    split_documents,
    stdlib_root,
    tokenize_documents,
    unigram_loss,
)
from moekit.data.sampler import WindowSampler, eval_batches  # noqa: F401
