"""moekit.train: corpora, tokenizer, the training loop and atomic checkpoints.

Contract:
    ``train(TrainConfig, resume=False, progress=True) -> TrainResult``. A run folder ``out_dir``
    (default ``runs/<preset>``) gets ``train_config.json``, ``train_log.jsonl`` (one JSON record per
    line: ``start`` with the unigram baseline, ``train`` every ``log_interval`` steps, ``eval``,
    ``end``) and ``checkpoints/last`` (plus ``checkpoints/previous``). ``resume=True`` continues
    from ``checkpoints/last`` bit-exactly; Ctrl-C saves the last completed step. A checkpoint folder
    is also a model folder (``MoEForCausalLM.from_pretrained``) and a tokenizer folder
    (``transformers.AutoTokenizer.from_pretrained``).

Layout:
    data.py        corpus resolution (file / folder / glob / list; default: the stdlib source),
                   split by path hash, cached token streams, WindowSampler, eval batches, unigram loss
    tokenizer.py   byte-level BPE training, save/load in the Hugging Face layout
    trainer.py     TrainConfig, KSchedule, freeze groups, lr schedule, AdamW, the loop
    checkpoint.py  atomic, pickle-free checkpoints with all optimizer, sampler and RNG state

Imports ``moekit.models`` lazily (inside :func:`train`), so the data and tokenizer tools work alone.
"""

from moekit.train.checkpoint import Checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from moekit.train.data import (
    Document,
    TokenData,
    WindowSampler,
    eval_batches,
    load_token_data,
    resolve_corpus,
    split_documents,
    unigram_loss,
)
from moekit.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from moekit.train.trainer import (
    FREEZE_GROUPS,
    KSchedule,
    TrainConfig,
    TrainResult,
    apply_freeze,
    build_optimizer,
    evaluate,
    lr_at,
    select_frozen,
    train,
)

__all__ = [
    "FREEZE_GROUPS",
    "Checkpoint",
    "Document",
    "KSchedule",
    "TokenData",
    "TrainConfig",
    "TrainResult",
    "WindowSampler",
    "apply_freeze",
    "build_optimizer",
    "eval_batches",
    "evaluate",
    "find_checkpoint",
    "load_checkpoint",
    "load_token_data",
    "load_tokenizer",
    "lr_at",
    "resolve_corpus",
    "save_checkpoint",
    "save_tokenizer",
    "select_frozen",
    "split_documents",
    "train",
    "train_tokenizer",
    "unigram_loss",
]
