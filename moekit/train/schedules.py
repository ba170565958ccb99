"""Schedules that are pure functions of the step: the learning rate and experts per token (k).

Being pure functions of the step is what lets a resumed run continue them exactly: nothing but the
step is saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moekit.config import JsonConfig, check_choice

K_SCHEDULE_TYPES = ("linear", "cosine", "step", "constant")


@dataclass(kw_only=True)
class KSchedule(JsonConfig):
    """Experts per token over training, passed to the model as ``moe_k`` (SMoE-Dropout's progressive k).

    At step s, with progress ``t = min(s / horizon, 1)``:
    ``linear``: ``round(k_min + (k_max - k_min) * t)``; ``cosine``: the same with
    ``(1 - cos(pi t)) / 2`` in place of t; ``step``: each k in ``k_min..k_max`` for an equal share of the
    horizon; ``constant``: ``k_max``.

    Attributes:
        type: one of ``linear``, ``cosine``, ``step``, ``constant``.
        k_min: k at step 0.
        k_max: k from the horizon on.
        horizon: steps to reach ``k_max``; ``None`` means the whole run.
    """

    type: str = "linear"
    k_min: int = 1
    k_max: int = 2
    horizon: int | None = None

    def __post_init__(self) -> None:
        check_choice("KSchedule", "type", self.type, K_SCHEDULE_TYPES)
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(
                f"KSchedule needs 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}"
            )
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(
                f"KSchedule.horizon must be >= 1 (or None for the whole run), got {self.horizon}"
            )

    @classmethod
    def parse(cls, text: str) -> KSchedule:
        """Parses JSON (``{"type": "linear", "k_min": 1, "k_max": 4}``) or ``type:k_min:k_max[:horizon]``."""
        text = text.strip()
        if text.startswith("{"):
            return cls.from_json(text)
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(
                f"k schedule {text!r}: use TYPE:K_MIN:K_MAX[:HORIZON] (e.g. linear:1:4) or a JSON object"
            )
        try:
            nums = [int(p) for p in parts[1:]]
        except ValueError as e:
            raise ValueError(f"k schedule {text!r}: K_MIN, K_MAX and HORIZON must be integers") from e
        return cls(type=parts[0], k_min=nums[0], k_max=nums[1], horizon=nums[2] if len(nums) == 3 else None)

    def k_at(self, step: int, total_steps: int) -> int:
        """k for optimizer step ``step`` (0-based) of a ``total_steps`` run."""
        if self.type == "constant" or self.k_min == self.k_max:
            return self.k_max
        horizon = self.horizon or max(total_steps, 1)
        t = min(max(step, 0) / horizon, 1.0)
        span = self.k_max - self.k_min
        if self.type == "linear":
            return int(round(self.k_min + span * t))
        if self.type == "cosine":
            return int(round(self.k_min + span * (1 - math.cos(math.pi * t)) / 2))
        return min(self.k_min + int(t * (span + 1)), self.k_max)  # step


def lr_at(step: int, config: Any, total_steps: int | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Linear warmup ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then cosine
    decay from ``lr`` to ``min_lr`` reached at the last step ``total_steps - 1``. ``config`` is any
    object with ``lr``, ``min_lr``, ``warmup_steps`` and ``total_steps`` (a TrainConfig or LoopConfig).
    """
    total = config.total_steps if total_steps is None else total_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(total - 1 - config.warmup_steps, 1)
    t = min((step - config.warmup_steps) / decay_steps, 1.0)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
