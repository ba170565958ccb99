"""The engine's settings (:class:`LoopConfig`) and result (:class:`FitResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.config import JsonConfig, check_choice
from moekit.train.schedules import KSchedule

DTYPES = ("fp32", "bf16")


@dataclass(kw_only=True)
class LoopConfig(JsonConfig):
    """The model- and data-independent settings of a run (see :class:`~moekit.train.TrainConfig`
    for what each means; ``TrainConfig.loop_config()`` builds one).

    Attributes:
        max_steps: optimizer steps of the whole run.
        expert_bias_update: run the aux-loss-free expert-bias update for routers that have one.
        items_per_step: items (tokens for an LM) one optimizer step consumes on one rank, for
            ``num_tokens`` and ``tokens_per_s`` in the log.
    """

    max_steps: int
    items_per_step: int = 0
    grad_accum: int = 1
    grad_clip: float = 1.0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    k_schedule: KSchedule | None = None
    freeze: list[str] = field(default_factory=list)
    bias_update_rate: float | None = None
    expert_bias_update: bool = True
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    time_limit_s: float | None = None
    eval_interval: int = 100
    log_interval: int = 10
    save_interval: int = 100
    keep_previous: bool = True
    deterministic: bool = True

    def __post_init__(self) -> None:
        name = "LoopConfig"
        if isinstance(self.k_schedule, dict):
            self.k_schedule = KSchedule.from_dict(self.k_schedule)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.freeze = list(self.freeze)
        check_choice(name, "dtype", self.dtype, DTYPES)
        for f in ("max_steps", "grad_accum", "eval_interval", "log_interval", "save_interval"):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")

    @property
    def total_steps(self) -> int:
        """``max_steps`` (what :func:`~moekit.train.schedules.lr_at` reads)."""
        return self.max_steps


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        step: optimizer steps done (including those before a resume).
        num_items: items (tokens) trained on, over all ranks.
        train_loss: the total loss of the last step of this process (NaN if none ran).
        val_loss: the latest evaluation's mean task loss (NaN if the run was never evaluated).
        val_step: the step ``val_loss`` was measured at (None if never evaluated).
        stop_reason: ``"max_steps"``, ``"time_limit"``, ``"interrupted"`` or ``"already_finished"``
            (a resume of a run that had reached its budget: nothing ran, nothing was logged).
        num_steps_run: optimizer steps this process ran.
        elapsed_s: wall-clock seconds of this process's part of the run.
        items_per_s: training throughput of this process (NaN when no step ran).
        out_dir, checkpoint_dir, log_path: where things went.
        losses: ``[(step, total loss)]`` of every step of this process.
        history: the eval records of the whole run.
    """

    step: int
    num_items: int
    train_loss: float
    val_loss: float
    val_step: int | None
    stop_reason: str
    num_steps_run: int
    elapsed_s: float
    items_per_s: float
    out_dir: Path
    checkpoint_dir: Path
    log_path: Path | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
