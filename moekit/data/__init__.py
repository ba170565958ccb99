"""moekit.data: data sources for training, behind one interface (floor 1: imports only moekit.config).

Contract:
    :class:`DataModule` is what the training engine draws from: ``next_train_batch()``, fixed
    ``val_batches()``, ``state_dict()``/``load_state_dict()`` (exact resume for any source),
    ``describe()`` (the run log's start record), ``baselines()`` and ``save_artifacts(folder)``.

Layout:
    base.py        the DataModule interface
    corpus.py      corpus resolution (file / folder / glob / list; default: the stdlib source), split
                   by path hash, cached token streams, the unigram baseline
    sampler.py     WindowSampler (random windows, resumable) and fixed eval windows
    tokenizer.py   byte-level BPE training, save/load in the Hugging Face layout
    text.py        TextDataModule (the causal-LM data module) and the cached tokenizer
    images.py      image preprocessing, sklearn digits, generated shape scenes (captions, multi-task
                   labels) and their data modules (imported on use: ``moekit.data.images``)

To add a data source, subclass :class:`DataModule` (see :mod:`moekit.data.base`).
"""

from moekit.data.base import BatchListDataModule, DataModule
from moekit.data.corpus import (
    Document,
    TokenData,
    default_cache_dir,
    load_token_data,
    read_text,
    resolve_corpus,
    split_documents,
    unigram_loss,
)
from moekit.data.sampler import WindowSampler, eval_batches
from moekit.data.text import TextDataModule, prepare_tokenizer
from moekit.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    load_tokenizer,
    save_tokenizer,
    special_token_id,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "BatchListDataModule",
    "DataModule",
    "Document",
    "TextDataModule",
    "TokenData",
    "WindowSampler",
    "default_cache_dir",
    "eval_batches",
    "load_token_data",
    "load_tokenizer",
    "prepare_tokenizer",
    "read_text",
    "resolve_corpus",
    "save_tokenizer",
    "special_token_id",
    "split_documents",
    "tokenizer_hash",
    "train_tokenizer",
    "unigram_loss",
]
