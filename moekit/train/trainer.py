"""The causal-LM run: :class:`TrainConfig` in, :class:`TrainResult` out, through the generic engine.

Order of one run: seed -> corpus -> tokenizer (cached) -> token streams (cached) -> model (preset +
overrides, the ``init_from`` folder, or the checkpoint) -> :class:`~moekit.data.TextDataModule` and
:class:`~moekit.models.objectives.CausalLMObjective` -> :func:`moekit.train.engine.fit`.

Everything about steps, freezing, schedules, logging, checkpoints and exact resume lives in the
engine; this module only builds the LM's pieces and checks that a resume continues the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.data import corpus as data_mod
from moekit.data import load_token_data, load_tokenizer, prepare_tokenizer
from moekit.models.objectives import CausalLMObjective, LossWeights
from moekit.models.registry import family_of
from moekit.train import checkpoint as ckpt
from moekit.train.config import TrainConfig, TrainResult
from moekit.train.engine import _autocast, fit, seed_everything
from moekit.train.freeze import (
    FREEZE_GROUPS,
    apply_freeze,
    build_optimizer,
    freeze_pattern,
    select_frozen,
)
from moekit.train.runlog import perplexity
from moekit.train.schedules import KSchedule, lr_at


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_model_config(config: TrainConfig, vocab_size: int | None = None):
    """The ModelConfig of a new run: the preset with ``model_overrides`` merged in (and the tokenizer's
    vocabulary size unless overridden). Loss coefficients are not part of it: see :func:`loss_weights`."""
    from moekit.models import ModelConfig, get_preset

    base = get_preset(config.preset)
    merged = _deep_merge(base.to_dict(), config.model_overrides)
    if vocab_size is not None and "vocab_size" not in config.model_overrides:
        merged["vocab_size"] = vocab_size
    return ModelConfig.from_dict(merged)


def loss_weights(config: TrainConfig, model_config: Any) -> LossWeights:
    """The objective's aux-loss weights: the TrainConfig's, else the model config's recommended ones."""
    return LossWeights.from_model_config(
        model_config,
        load_balance=config.aux_loss_coef,
        z_loss=config.z_loss_coef,
        seq_balance=config.seq_balance_coef,
        entropy=config.entropy_loss_coef,
    )


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Tensor], config: TrainConfig, moe_k: int | None = None) -> float:
    """Mean LM loss (nats/token) over fixed ``[B, S + 1]`` validation batches, in eval mode."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    objective = CausalLMObjective(LossWeights())
    return objective.evaluate(model, batches, moe_k, _autocast(config.dtype, device))


def _resolve_init_from(path: str) -> Path:
    """The model folder ``init_from`` names (any folder the loader opens but a quantized one)."""
    from moekit.loader import inspect_folder

    info = inspect_folder(path)
    if info.kind == "quantized":
        raise ValueError(f"init_from {path} is a quantized folder; train from the float model it came from")
    return info.model_dir


def train(
    config: TrainConfig, resume: bool = False, progress: bool = True, device: torch.device | str | None = None
) -> TrainResult:
    """Trains a causal LM as ``config`` says and returns the final metrics and paths.

    Args:
        config: the run.
        resume: continue from ``<out_dir>/checkpoints/last`` (bit-exact when the config is unchanged;
            a changed model, data or freeze setting is refused).
        progress: show a tqdm bar (loss, tokens/s, max/mean expert load).
        device: where to train (default: CPU, or ``cuda:<LOCAL_RANK>`` under torchrun with CUDA).

    Ctrl-C and SIGTERM save a checkpoint of the last completed step and return with
    ``stop_reason="interrupted"``.
    """
    from moekit.loader import from_pretrained as load_any
    from moekit.models import MoEForCausalLM
    from moekit.parallel import distributed as dist_mod

    ctx = dist_mod.init_from_env()
    if device is None and ctx is not None and torch.cuda.is_available():
        import os

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out_dir = config.resolved_out_dir()
    loaded = ckpt.load_checkpoint(out_dir / "checkpoints") if resume else None
    if loaded is not None:
        _check_resume_compatible(config, loaded.state["config"])
    seed_everything(config.seed)

    docs = data_mod.resolve_corpus(config.corpus, config.max_corpus_bytes)
    train_docs, val_docs = data_mod.split_documents(docs, config.val_fraction)
    if loaded is not None:
        tok = load_tokenizer(loaded.path)
        model = MoEForCausalLM.from_pretrained(loaded.path)
    elif config.init_from is not None:
        source = _resolve_init_from(config.init_from)
        model = load_any(source)
        has_tok = (source / "tokenizer.json").is_file() and not config.tokenizer_dir
        tok = (
            load_tokenizer(source)
            if has_tok
            else prepare_tokenizer(
                train_docs,
                model.config.vocab_size,
                config.tokenizer_sample_bytes,
                config.cache_dir,
                config.tokenizer_dir,
            )
        )
    else:
        vocab_size = build_model_config(config).vocab_size
        tok = prepare_tokenizer(
            train_docs, vocab_size, config.tokenizer_sample_bytes, config.cache_dir, config.tokenizer_dir
        )
        torch.manual_seed(config.seed)  # model init does not depend on how the tokenizer was obtained
        model = MoEForCausalLM(build_model_config(config))
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.get_vocab_size()} tokens but the model only {model.config.vocab_size}; "
            "raise model_overrides.vocab_size or use a smaller tokenizer"
        )
    if config.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"seq_len={config.seq_len} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}; pass --seq-len {model.config.max_position_embeddings} "
            "or less (or raise max_position_embeddings in model_overrides)"
        )
    tokens = load_token_data(tok, train_docs, val_docs, config.cache_dir, config.val_fraction)
    # Each rank draws its own windows: a different stream per rank from one seed.
    sampler_seed = config.seed if ctx is None else config.seed + 1_000_003 * ctx.rank
    # The family registry says which data module and objective this model trains with.
    family = family_of(model)
    data = family.data_module_cls(
        tok, tokens, config.seq_len, config.batch_size, config.eval_steps, sampler_seed
    )
    objective = family.objective_cls(loss_weights(config, model.config))
    result = fit(
        model,
        objective,
        data,
        config.loop_config(),
        out_dir,
        resume=loaded if loaded is not None else False,
        progress=progress,
        device=device,
        run_config=config.to_dict(),
        state_extra={"unigram_val_loss": data.unigram_loss, "tokenizer_hash": data.tokenizer_hash},
        start_extra={"model_config": model.config.to_dict(), "loss_weights": objective.weights.to_dict()},
        dist_context=ctx,
    )
    return TrainResult(
        step=result.step,
        num_tokens=result.num_items,
        train_loss=result.train_loss,
        val_loss=result.val_loss,
        val_perplexity=perplexity(result.val_loss),
        unigram_loss=data.unigram_loss,
        stop_reason=result.stop_reason,
        elapsed_s=result.elapsed_s,
        tokens_per_s=result.items_per_s,
        out_dir=out_dir,
        checkpoint_dir=result.checkpoint_dir,
        log_path=result.log_path,
        losses=result.losses,
        history=result.history,
        val_step=result.val_step,
        num_steps_run=result.num_steps_run,
    )


# Fields that define the model or the data: resuming with different values would not continue the run.
_RESUME_FIXED = (
    "preset",
    "init_from",
    "model_overrides",
    "corpus",
    "max_corpus_bytes",
    "val_fraction",
    "tokenizer_dir",
    "freeze",
)


def _check_resume_compatible(config: TrainConfig, saved: dict[str, Any]) -> None:
    now = config.to_dict()
    changed = [f for f in _RESUME_FIXED if f in saved and saved[f] != now[f]]
    if changed:
        detail = ", ".join(f"{f}: {saved[f]!r} -> {now[f]!r}" for f in changed)
        raise ValueError(
            f"cannot resume: {detail} differ from the checkpoint's run; resume with the original values "
            "or train into a new --out folder"
        )


def run_dir_files(out_dir: str | Path) -> dict[str, Path]:
    """The files of a run folder: ``checkpoint``, ``log``, ``config``."""
    out_dir = Path(out_dir)
    return {
        "checkpoint": out_dir / "checkpoints" / ckpt.LAST,
        "log": out_dir / "train_log.jsonl",
        "config": out_dir / "train_config.json",
    }


__all__ = [
    "FREEZE_GROUPS",
    "KSchedule",
    "TrainConfig",
    "TrainResult",
    "apply_freeze",
    "build_model_config",
    "build_optimizer",
    "evaluate",
    "freeze_pattern",
    "loss_weights",
    "lr_at",
    "run_dir_files",
    "select_frozen",
    "train",
]
