"""moekit.train: the training engine (one loop for every model family) and the causal-LM run.

Contract:
    ``fit(model, objective, data, LoopConfig, out_dir, resume=False, progress=True, device=None)
    -> FitResult`` trains any module with any :class:`~moekit.models.objectives.Objective` on any
    :class:`~moekit.data.DataModule`: gradient accumulation, clipping, warmup + cosine lr, the k
    schedule, freezing by the model's parameter groups, bf16 autocast, a time limit, the run log,
    a progress bar, periodic evaluation, atomic checkpoints with exact resume (model, optimizer,
    data state, RNG), SIGINT/SIGTERM saves, torchrun with expert parallelism.

    ``train(TrainConfig, resume=False, progress=True) -> TrainResult`` is the LM run built on it. A
    run folder ``out_dir`` (default ``runs/<preset>``) gets ``train_config.json``,
    ``train_log.jsonl`` (one JSON record per line: ``start`` with the unigram baseline, ``train``
    every ``log_interval`` steps, ``eval``, ``end``) and ``checkpoints/last`` (plus
    ``checkpoints/previous``). A checkpoint folder is also a model folder
    (``MoEForCausalLM.from_pretrained``) and a tokenizer folder (``AutoTokenizer.from_pretrained``).

Layout:
    engine.py      fit, LoopConfig, FitResult: the generic loop
    runlog.py      train_log.jsonl, progress bar, stop signals, batch moving
    schedules.py   lr_at (warmup + cosine), KSchedule
    freeze.py      freeze groups (from the model), AdamW with decay groups
    checkpoint.py  atomic, fsynced, pickle-free checkpoints with all optimizer, data and RNG state
    config.py      TrainConfig, TrainResult (the LM run)
    trainer.py     train(): builds the LM, its TextDataModule and CausalLMObjective, calls fit
    data.py, tokenizer.py   moved to moekit.data; kept as aliases

To train a new family: write its Objective (moekit.models.objectives) and DataModule (moekit.data),
build the model, call :func:`fit`. The corpus, tokenizer and sampler names below are re-exported from
:mod:`moekit.data` for older callers.
"""

from moekit.data import (
    Document,
    TokenData,
    WindowSampler,
    eval_batches,
    load_token_data,
    load_tokenizer,
    resolve_corpus,
    save_tokenizer,
    split_documents,
    train_tokenizer,
    unigram_loss,
)
from moekit.train.checkpoint import Checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from moekit.train.config import TrainConfig, TrainResult
from moekit.train.engine import FitResult, LoopConfig, fit, seed_everything
from moekit.train.freeze import FREEZE_GROUPS, apply_freeze, build_optimizer, select_frozen
from moekit.train.schedules import KSchedule, lr_at
from moekit.train.trainer import evaluate, loss_weights, train

__all__ = [
    "FREEZE_GROUPS",
    "Checkpoint",
    "Document",
    "FitResult",
    "KSchedule",
    "LoopConfig",
    "TokenData",
    "TrainConfig",
    "TrainResult",
    "WindowSampler",
    "apply_freeze",
    "build_optimizer",
    "eval_batches",
    "evaluate",
    "find_checkpoint",
    "fit",
    "load_checkpoint",
    "load_token_data",
    "load_tokenizer",
    "loss_weights",
    "lr_at",
    "resolve_corpus",
    "save_checkpoint",
    "save_tokenizer",
    "seed_everything",
    "select_frozen",
    "split_documents",
    "train",
    "train_tokenizer",
    "unigram_loss",
]
