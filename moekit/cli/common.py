"""Shared pieces of the CLI verbs: finding a model folder, loading it with its tokenizer, and
choosing evaluation text. Verbs stay thin: they parse flags and call these and library functions."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_model_argument(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model DIR`` (any folder :func:`moekit.from_pretrained` opens) and ``--dtype``."""
    p.add_argument(
        "--model",
        required=required,
        help="a run folder (runs/NAME), a checkpoint, model or quantized folder, or a Hugging Face folder",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype to run in")


def resolve_model_dir(path: str | Path) -> Path:
    """The folder that holds the model: a run folder's last checkpoint, otherwise ``path`` itself."""
    from moekit.loader import inspect_folder

    return inspect_folder(path).model_dir


def load_model_and_tokenizer(path: str | Path, dtype: str = "fp32"):
    """Loads ``(model, tokenizer, folder)`` through :func:`moekit.loader.load_model_and_tokenizer`."""
    from moekit.loader import load_model_and_tokenizer as load

    loaded = load(path, dtype=dtype)
    return loaded.model, loaded.tokenizer, loaded.folder


def eos_token_id(tokenizer, folder: Path) -> int:
    """The end-of-text id of the model in ``folder`` (see :func:`moekit.loader.eos_token_id`)."""
    from moekit.loader import eos_token_id as find

    return find(tokenizer, folder)


def run_train_config(folder: Path):
    """The TrainConfig of the run that produced ``folder`` (checkpoints/last -> run), or None."""
    from moekit.train import TrainConfig

    for candidate in (folder, folder.parent, folder.parent.parent):
        cfg = candidate / "train_config.json"
        if cfg.is_file():
            return TrainConfig.from_json(cfg)
    return None


def evaluation_tokens(tokenizer, folder: Path, corpus: list[str] | None, split: str = "val"):
    """Token ids (numpy) to evaluate or trace on.

    With ``corpus`` given, all of it. Otherwise the run's own validation split (same corpus,
    same hash split as training), so numbers are held-out.
    """
    import numpy as np

    from moekit.data import read_text, resolve_corpus, split_documents

    cfg = run_train_config(folder)
    if corpus:
        docs = resolve_corpus(corpus)
    else:
        docs = resolve_corpus(
            cfg.corpus if cfg else None, max_bytes=cfg.max_corpus_bytes if cfg else 12_000_000
        )
        train_docs, val_docs = split_documents(docs, cfg.val_fraction if cfg else 0.05)
        docs = val_docs if split == "val" and val_docs else train_docs
    eos = eos_token_id(tokenizer, folder)
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(read_text(doc)).ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)
