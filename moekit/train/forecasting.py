"""Pretraining a forecast-family model (``moekit ts-train``) through the one engine.

:func:`ts_train` looks the family up in the registry (task ``"forecast"``), builds the preset's
config (the family's config module has a ``PRESETS`` dict), its objective
(``objective_cls.for_config(config)``) and its data module
(``data_module_cls.for_model(SeriesDataConfig, config, series=None)``), and calls :func:`moekit.train.fit`. The
run folder gets ``train_config.json`` (this :class:`TSTrainConfig`), ``train_log.jsonl`` and
``checkpoints/last``, which ``moekit.from_pretrained`` opens. A resumed run takes its settings
from the folder's ``train_config.json`` (only ``max_steps`` may grow), so it continues exactly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.config import JsonConfig
from moekit.models.registry import families, families_for_task, get_family
from moekit.models.timemoe_train import SeriesDataConfig
from moekit.train.engine import FitResult, LoopConfig, fit, seed_everything

DEFAULT_FAMILY = "timemoe"


def forecast_family(name: str):
    """The registered family ``name`` (``-`` and ``_`` are the same: ``moirai-moe`` is
    ``moirai_moe``); ValueError unless its task is ``"forecast"``."""
    known = {f.name for f in families()}
    if name not in known and name.replace("-", "_") in known:
        name = name.replace("-", "_")
    family = get_family(name)
    if family.task != "forecast":
        names = [f.name for f in families_for_task("forecast")]
        raise ValueError(
            f"family {name!r} is a {family.task} family, not a forecaster; choose one of {names}"
        )
    return family


def family_presets(family) -> dict[str, Any]:
    """``name -> config function`` of a forecast family (its config module's ``PRESETS``)."""
    return dict(getattr(sys.modules[family.config_cls.__module__], "PRESETS", {}))


@dataclass(kw_only=True)
class TSTrainConfig(JsonConfig):
    """One forecaster pretraining run.

    Attributes:
        family: a registered family with task ``"forecast"``.
        preset: one of the family's presets.
        model_overrides: fields of the preset's config to change.
        data: where windows come from (:class:`~moekit.models.timemoe_train.SeriesDataConfig`).
        max_steps, lr, min_lr, warmup_steps, weight_decay, grad_clip: the optimisation.
        seed: model init seed (the sampler has its own, ``data.seed``).
        eval_interval, save_interval, log_interval: the loop's (see LoopConfig).
        time_limit_s: stop (with a checkpoint) after this many seconds: the default keeps the
            no-flag run under 10 minutes on a busy machine; None trains all ``max_steps``.
    """

    family: str = DEFAULT_FAMILY
    preset: str = "timemoe-small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: SeriesDataConfig = field(default_factory=SeriesDataConfig)
    max_steps: int = 600
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_interval: int = 250
    save_interval: int = 250
    log_interval: int = 10
    time_limit_s: float | None = 540.0

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = SeriesDataConfig.from_dict(self.data)
        if self.max_steps < 1:
            raise ValueError(f"TSTrainConfig.max_steps must be >= 1, got {self.max_steps}")

    def model_config(self) -> Any:
        """The preset's config with ``model_overrides`` applied."""
        family = forecast_family(self.family)
        presets = family_presets(family)
        if self.preset not in presets:
            raise ValueError(f"unknown {self.family} preset {self.preset!r}; choose one of {sorted(presets)}")
        config = presets[self.preset]()
        try:
            return config.replace(**self.model_overrides) if self.model_overrides else config
        except TypeError as err:
            raise ValueError(f"model_overrides: {err}") from None

    def loop_config(self, items_per_step: int) -> LoopConfig:
        """The engine's settings."""
        return LoopConfig(
            max_steps=self.max_steps,
            items_per_step=items_per_step,
            grad_clip=self.grad_clip,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            eval_interval=self.eval_interval,
            save_interval=self.save_interval,
            log_interval=self.log_interval,
            time_limit_s=self.time_limit_s,
        )


def resume_config(out_dir: str | Path, max_steps: int | None = None) -> TSTrainConfig:
    """The config saved in a run folder (``train_config.json``), with a new ``max_steps`` if given."""
    file = Path(out_dir) / "train_config.json"
    if not file.is_file():
        raise ValueError(f"{file} not found: nothing to resume in {out_dir}; run without --resume first")
    try:
        config = TSTrainConfig.from_dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{file} is not a ts-train config: {err}") from None
    return config.replace(max_steps=max_steps) if max_steps is not None else config


def build_run(config: TSTrainConfig, series: list | None = None) -> tuple[Any, Any, Any]:
    """``(model, objective, data module)`` of a run, the model seeded with ``config.seed``.

    ``series`` replaces the built-in training series (tests, a user's own data).
    """
    family = forecast_family(config.family)
    model_config = config.model_config()
    seed_everything(config.seed)
    model = family.build(model_config)
    data = family.data_module_cls.for_model(config.data, model_config, series)
    return model, family.objective_cls.for_config(model_config), data


def ts_train(
    config: TSTrainConfig,
    out_dir: str | Path | None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str | None = "cpu",
    series: list | None = None,
) -> FitResult:
    """Pretrains ``config``'s model (see :func:`build_run`) and returns the engine's
    :class:`FitResult`; with ``resume`` the run continues from ``out_dir/checkpoints/last``."""
    model, objective, data = build_run(config, series)
    model_config = model.config
    items = config.data.batch_size * model_config.context_length
    return fit(
        model,
        objective,
        data,
        config.loop_config(items),
        out_dir,
        resume=resume,
        progress=progress,
        device=device,
        run_config=config.to_dict(),
        start_extra={
            "model_config": model_config.to_dict(),
            "num_active_params": model.num_parameters(active_only=True),
            "loss_weights": objective.weights.to_dict(),
        },
        dist_context=None,
    )
