"""Shared pieces of the surgery verbs (upcycle, grow, prune-experts, merge-experts, extend-experts,
moe-merge): loading a model folder, building a surgery config from ``--config`` plus flags,
calibration batches from text, and saving the result with the source's tokenizer files.
Not a verb itself."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


def add_io_arguments(p: argparse.ArgumentParser, calibration: bool = True) -> None:
    """``--model``, ``--out``, ``--config`` and (optionally) the calibration flags."""
    p.add_argument("--model", required=True, help="source: a run folder, checkpoint folder or model folder")
    p.add_argument("--out", required=True, help="folder to write the new model (and tokenizer files) to")
    p.add_argument(
        "--config", metavar="JSON", help="the operation's config as a JSON file or string; flags override it"
    )
    if calibration:
        add_calibration_arguments(p)


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    """``--calib``, ``--calib-batches``, ``--seq-len``, ``--batch-size``."""
    p.add_argument(
        "--calib",
        action="append",
        metavar="PATH",
        help="calibration text (file, folder or glob; repeatable); default: the run's validation split",
    )
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch")


def load_model(path: str | Path):
    """``(model, folder)`` from any folder :func:`moekit.from_pretrained` opens but a quantized one."""
    from moekit.loader import from_pretrained, inspect_folder

    info = inspect_folder(path)
    if info.kind == "quantized":
        raise ValueError(
            f"{path} is a quantized folder; surgery needs float weights: pass the model it was quantized from"
        )
    return from_pretrained(path), info.model_dir


def build_config(cls, args: argparse.Namespace, changes: dict[str, Any]):
    """``cls`` from ``--config`` (if given) with every non-None entry of ``changes`` applied."""
    base = cls.from_json(args.config).to_dict() if getattr(args, "config", None) else {}
    base.update({k: v for k, v in changes.items() if v is not None})
    return cls.from_dict(base)


def calibration_batches(folder: Path, corpus: list[str] | None, args: argparse.Namespace):
    """``[B, S]`` token batches from ``corpus`` (or the run's validation split) with the folder's tokenizer."""
    from moekit.cli.common import evaluation_tokens
    from moekit.data import eval_batches
    from moekit.loader import load_tokenizer

    tokens = evaluation_tokens(load_tokenizer(folder), folder, corpus)
    return [b[:, :-1] for b in eval_batches(tokens, args.seq_len, args.batch_size, args.calib_batches)]


def save_model(model, out: str | Path, source: Path) -> Path:
    """Saves ``model`` to ``out`` and copies the source folder's tokenizer files next to it."""
    out = Path(out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out


def summary(model) -> str:
    """One line: layers, MoE layers, experts per MoE layer, parameters."""
    cfg = model.config
    experts = [cfg.moe_config(i).num_experts for i in cfg.moe_layer_ids]
    return (
        f"{cfg.num_layers} layers, dim {cfg.dim}, MoE layers {cfg.moe_layer_ids} with experts {experts}, "
        f"{model.num_parameters():,} parameters ({model.num_parameters(active_only=True):,} active)"
    )
