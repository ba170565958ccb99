"""Shared pieces of the CLI verbs: finding a model folder, loading it with its tokenizer, and
choosing evaluation text. Verbs stay thin: they parse flags and call these and library functions."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """``--model DIR`` (a run folder, a checkpoint folder or a model folder) and ``--dtype``."""
    p.add_argument(
        "--model", required=True, help="a run folder (runs/NAME), a checkpoint folder or a model folder"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype to run in")


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder resolves to ``checkpoints/last``; a model or checkpoint folder to itself."""
    from moekit.train import find_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the folder `moekit train` printed")
    return find_checkpoint(path)


def load_model_and_tokenizer(path: str | Path, dtype: str = "fp32"):
    """Loads ``(model, tokenizer, folder)``; the tokenizer is a ``tokenizers.Tokenizer``."""
    import torch

    from moekit.models import MoEForCausalLM
    from moekit.train import load_tokenizer

    folder = resolve_model_dir(path)
    from moekit.compress import is_quantized_folder, load_quantized  # quantized folders: moekit.compress

    load = load_quantized if is_quantized_folder(folder) else MoEForCausalLM.from_pretrained
    model = load(folder, dtype=getattr(torch, DTYPES[dtype]))
    model.eval()
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"{folder} has no tokenizer.json; moekit commands need the tokenizer next to the model"
        )
    return model, load_tokenizer(folder), folder


def eos_token_id(tokenizer, folder: Path) -> int:
    """The end-of-text id: from an HF ``config.json``/``tokenizer_config.json``, else moekit's own token."""
    import json

    from moekit.train.tokenizer import special_token_id

    cfg = folder / "config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token_id")
        if isinstance(eos, list) and eos:
            eos = eos[0]
        if isinstance(eos, int):
            return eos
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        token = json.loads(tok_cfg.read_text()).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return special_token_id(tokenizer)


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

    from moekit.train import resolve_corpus, split_documents
    from moekit.train.data import read_text

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
