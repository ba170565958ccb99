"""The LM training run's configuration (:class:`TrainConfig`) and result (:class:`TrainResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.config import JsonConfig, check_choice
from moekit.train.engine import DTYPES, LoopConfig
from moekit.train.freeze import freeze_pattern
from moekit.train.schedules import KSchedule


@dataclass(kw_only=True)
class TrainConfig(JsonConfig):
    """Everything that defines a training run. Every CLI flag of ``moekit train`` is one of these fields.

    The defaults are the ``moekit train`` default run: moe-small on the standard library, 320 steps of
    16 x 256 tokens (1.3M tokens, ~1.4 s per step on 2 idle cores), capped at 540 s.

    Model:
        preset: a ``moekit.models`` preset name.
        init_from: start from this model folder instead of a fresh preset (a surgery result, an
            imported Hugging Face model, a checkpoint); its tokenizer is used when it has one.
            ``preset`` and ``model_overrides`` are then ignored.
        model_overrides: ModelConfig fields to change (nested dicts merge, e.g. ``{"moe": {"top_k": 1}}``).
        aux_loss_coef, z_loss_coef, seq_balance_coef, entropy_loss_coef: the objective's aux-loss
            weights (load_balance, z_loss, seq_balance, entropy). ``None`` takes the model's
            recommended value (its ModelConfig field of the same name: the preset's, or the
            ``init_from`` folder's). These, not the ModelConfig, are what training uses.
        bias_update_rate: speed of the aux-loss-free expert-bias update for routers with
            ``use_expert_bias``; ``None`` means 1e-3 (DeepSeek-V3).
        k_schedule: experts per token over training (:class:`KSchedule`), ``None`` for the model's k.
        freeze: parameter groups to freeze: names in :data:`FREEZE_GROUPS` or ``"re:<regex>"``.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        dtype: ``"fp32"`` or ``"bf16"`` (autocast; weights and optimizer stay fp32).

    Data:
        corpus: files, folders or globs; ``None`` is the Python standard library's source.
        max_corpus_bytes: cap on the corpus size (a deterministic subset).
        val_fraction: share of documents (by path hash) held out for validation.
        tokenizer_dir: use this tokenizer instead of training one.
        tokenizer_sample_bytes: how much text the tokenizer is trained on.
        cache_dir: token and tokenizer cache; ``None`` is ``$MOEKIT_CACHE`` or ``~/.cache/moekit``.

    Budget and optimisation:
        seq_len, batch_size, grad_accum: tokens per step are ``seq_len * batch_size * grad_accum``.
        max_steps: optimizer steps; with ``max_tokens`` too, the smaller budget wins.
        max_tokens: the budget in training tokens instead of steps.
        time_limit_s: stop (with a checkpoint) after this much wall-clock time.
        lr, min_lr, warmup_steps: linear warmup to ``lr``, cosine decay to ``min_lr`` at the last step.
        weight_decay, betas: AdamW; norms, biases and embeddings get no weight decay.
        grad_clip: max global gradient norm (0 disables).

    Bookkeeping:
        eval_interval, eval_steps: evaluate every N steps on ``eval_steps`` fixed validation batches.
        log_interval: steps between ``train_log.jsonl`` records.
        save_interval: steps between checkpoints (one is always written at the end).
        keep_previous: keep the checkpoint before ``last`` as ``previous``.
        seed: seeds the model init, the sampler and every RNG.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` during the run.
        out_dir: run folder (checkpoints/, train_log.jsonl, train_config.json).
    """

    preset: str = "moe-small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    aux_loss_coef: float | None = None
    z_loss_coef: float | None = None
    seq_balance_coef: float | None = None
    entropy_loss_coef: float | None = None
    bias_update_rate: float | None = None
    k_schedule: KSchedule | None = None
    freeze: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    dtype: str = "fp32"

    init_from: str | None = None

    corpus: list[str] | None = None
    max_corpus_bytes: int | None = 12_000_000
    val_fraction: float = 0.05
    tokenizer_dir: str | None = None
    tokenizer_sample_bytes: int = 3_000_000
    cache_dir: str | None = None

    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = 320
    max_tokens: int | None = None
    time_limit_s: float | None = 540.0
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    eval_interval: int = 80
    eval_steps: int = 4
    log_interval: int = 10
    save_interval: int = 100
    keep_previous: bool = True
    seed: int = 0
    deterministic: bool = True
    out_dir: str | None = None

    def __post_init__(self) -> None:
        name = "TrainConfig"
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if isinstance(self.k_schedule, dict):
            self.k_schedule = KSchedule.from_dict(self.k_schedule)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.freeze = list(self.freeze)
        check_choice(name, "dtype", self.dtype, DTYPES)
        for f in ("seq_len", "batch_size", "grad_accum", "eval_interval", "eval_steps", "log_interval"):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")
        if self.save_interval < 1:
            raise ValueError(f"{name}.save_interval must be >= 1, got {self.save_interval}")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError(f"{name}: set max_steps or max_tokens (the training budget)")
        for f in ("max_steps", "max_tokens"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1 (or None), got {getattr(self, f)}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"{name}.time_limit_s must be positive (or None), got {self.time_limit_s}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(
                f"{name} needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"{name}: warmup_steps, weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{name}.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"{name}.val_fraction must be in (0, 1), got {self.val_fraction}")
        for f in (
            "aux_loss_coef",
            "z_loss_coef",
            "seq_balance_coef",
            "entropy_loss_coef",
            "bias_update_rate",
        ):
            if getattr(self, f) is not None and getattr(self, f) < 0:
                raise ValueError(
                    f"{name}.{f} must be >= 0 (or None to keep the model's), got {getattr(self, f)}"
                )
        if self.max_corpus_bytes is not None and self.max_corpus_bytes < 1:
            raise ValueError(
                f"{name}.max_corpus_bytes must be positive (or None), got {self.max_corpus_bytes}"
            )
        if self.tokenizer_sample_bytes < 1:
            raise ValueError(
                f"{name}.tokenizer_sample_bytes must be positive, got {self.tokenizer_sample_bytes}"
            )
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"{name}.model_overrides must be a dict of ModelConfig fields")
        for spec in self.freeze:
            freeze_pattern(spec)  # raises on unknown groups and bad regexes

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step (``seq_len * batch_size * grad_accum``)."""
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        """The step budget: ``max_steps`` or ``ceil(max_tokens / tokens_per_step)``, whichever is smaller."""
        budgets = []
        if self.max_steps is not None:
            budgets.append(self.max_steps)
        if self.max_tokens is not None:
            budgets.append(math.ceil(self.max_tokens / self.tokens_per_step))
        return min(budgets)

    def loop_config(self) -> LoopConfig:
        """The engine's settings of this run."""
        return LoopConfig(
            max_steps=self.total_steps,
            items_per_step=self.tokens_per_step,
            grad_accum=self.grad_accum,
            grad_clip=self.grad_clip,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            betas=self.betas,
            k_schedule=self.k_schedule,
            freeze=self.freeze,
            bias_update_rate=self.bias_update_rate,
            dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            time_limit_s=self.time_limit_s,
            eval_interval=self.eval_interval,
            log_interval=self.log_interval,
            save_interval=self.save_interval,
            keep_previous=self.keep_previous,
            deterministic=self.deterministic,
        )

    def resolved_out_dir(self) -> Path:
        """``out_dir``, or ``runs/<preset>`` (``runs/<init_from folder name>`` when starting from a folder)."""
        if self.out_dir:
            return Path(self.out_dir)
        return Path("runs") / (Path(self.init_from).name if self.init_from else self.preset)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        step: optimizer steps done (including those before a resume).
        num_tokens: training tokens seen.
        train_loss: mean total loss of the last logged window of steps.
        val_loss, val_perplexity: the latest evaluation (mean LM loss in nats/token, and ``exp``);
            NaN when the run was never evaluated.
        unigram_loss: the context-free baseline on the same validation tokens.
        stop_reason: ``"max_steps"``, ``"time_limit"``, ``"interrupted"`` or ``"already_finished"``
            (a resumed run that had already reached its budget; nothing ran).
        elapsed_s: wall-clock seconds of this process's part of the run.
        tokens_per_s: training throughput of this process (NaN when no step ran).
        val_step: the step ``val_loss`` was measured at (None when never evaluated).
        num_steps_run: optimizer steps this process ran.
        out_dir, checkpoint_dir, log_path: where things went.
        losses: ``[(step, total loss)]`` of every step of this process (for comparisons and tests).
        history: the eval records (``{"step", "val_loss", "val_perplexity"}``) of the whole run.
    """

    step: int
    num_tokens: int
    train_loss: float
    val_loss: float
    val_perplexity: float
    unigram_loss: float
    stop_reason: str
    elapsed_s: float
    tokens_per_s: float
    out_dir: Path
    checkpoint_dir: Path
    log_path: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    val_step: int | None = None
    num_steps_run: int = 0
