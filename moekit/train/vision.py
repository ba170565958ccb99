"""Vision training runs through the one engine (:func:`moekit.train.fit`): a ViT-MoE on digits,
a CLIP-MoE on generated scenes, a task-level ViT-MoE on the shape/colour/count tasks.

:func:`train_vision` builds the preset, the data module and the objective, trains, and writes
``metrics.json`` next to the engine's ``checkpoints/`` and ``train_log.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.config import JsonConfig, check_choice
from moekit.models.objectives import LossWeights
from moekit.train.engine import fit, seed_everything
from moekit.train.loop_config import LoopConfig

VISION_TASKS = ("vit", "clip", "multitask")


@dataclass(kw_only=True)
class VisionRunConfig(JsonConfig):
    """One vision run.

    Attributes:
        task: ``"vit"`` (digits), ``"clip"`` (scenes + captions) or ``"multitask"`` (scene tasks).
        preset: a :func:`~moekit.models.vision.presets.vision_preset` name; None = the task's default.
        out_dir: the run folder.
        steps, batch_size, lr: the budget and optimiser.
        num_train: generated scenes for clip/multitask.
        seed: seeds the model, the data and the batch order.
    """

    task: str = "vit"
    preset: str | None = None
    out_dir: str = "runs/vision"
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    num_train: int = 1500
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("VisionRunConfig", "task", self.task, VISION_TASKS)
        for f in ("steps", "batch_size", "num_train"):
            if getattr(self, f) < 1:
                raise ValueError(f"VisionRunConfig.{f} must be >= 1, got {getattr(self, f)}")


def build_run(config: VisionRunConfig):
    """``(model, objective, data module)`` of a run (seeded)."""
    from moekit.data.images import DigitsDataModule, MultiTaskShapesDataModule, ShapesCaptionDataModule
    from moekit.models import vision
    from moekit.models.vision.presets import TASK_PRESETS, vision_preset

    preset = config.preset or TASK_PRESETS[config.task]
    model_cfg = vision_preset(preset)
    want = vision.CLIPConfig if config.task == "clip" else vision.ViTConfig
    if not isinstance(model_cfg, want):
        raise ValueError(f"preset {preset!r} is not a {config.task} preset")
    if config.task == "multitask" and not model_cfg.task_num_classes:
        raise ValueError(f"preset {preset!r} has no task heads; use a multitask preset")
    seed_everything(config.seed)
    weights = LossWeights(load_balance=model_cfg.aux_loss_coef, z_loss=model_cfg.z_loss_coef)
    if config.task == "clip":
        model = vision.CLIPMoE(model_cfg)
        data = ShapesCaptionDataModule(config.batch_size, num_train=config.num_train, seed=config.seed)
        return model, vision.ContrastiveObjective(weights), data
    model = vision.ViTMoE(model_cfg)
    if config.task == "vit":
        data = DigitsDataModule(config.batch_size, image_size=model_cfg.image_size, seed=config.seed)
    else:
        data = MultiTaskShapesDataModule(config.batch_size, num_train=config.num_train, seed=config.seed)
    return model, vision.ClassificationObjective(weights), data


def evaluate_run(model, data, task: str) -> dict[str, Any]:
    """The task's metrics: accuracy (per task, with expert share and memory saved for multitask),
    or retrieval R@1 both ways for CLIP."""
    from moekit.data.images import TASKS
    from moekit.models.vision import accuracy, retrieval_r1

    metrics: dict[str, Any] = {
        "num_params": model.num_parameters() if hasattr(model, "num_parameters") else None
    }
    if task == "clip":
        metrics["num_params"] = sum(p.numel() for p in model.parameters())
        metrics.update(retrieval_r1(model, data.val_batches()))
        return metrics
    metrics["num_active_params"] = model.num_parameters(active_only=True)
    if task == "vit":
        metrics["val_accuracy"] = accuracy(model, data.val_batches())
        return metrics
    from moekit.models.vision.task import extract_task_model

    for t, name in enumerate(TASKS):
        batches = data.task_val_batches(t)
        entry: dict[str, Any] = {"accuracy": accuracy(model, batches)}
        if model.moe_layers:
            ex = extract_task_model(model, t, batches)
            entry.update(
                kept_experts=ex.kept_experts,
                expert_share=ex.expert_share,
                num_params_task=ex.num_params_task,
                bytes_saved=ex.bytes_saved,
                memory_saved_fraction=1 - ex.num_params_task / ex.num_params_full,
                extracted_accuracy=accuracy(
                    ex.model, [{k: v for k, v in b.items() if k != "task"} for b in batches]
                ),
            )
        metrics[name] = entry
    return metrics


def train_vision(config: VisionRunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Trains a run through :func:`fit`, evaluates it and writes ``out_dir/metrics.json``; returns the metrics."""
    model, objective, data = build_run(config)
    loop = LoopConfig(
        max_steps=config.steps, lr=config.lr, min_lr=config.lr / 10, warmup_steps=max(1, config.steps // 20),
        weight_decay=0.01, eval_interval=max(config.steps // 4, 1), log_interval=max(config.steps // 20, 1),
        save_interval=config.steps, items_per_step=config.batch_size,
    )  # fmt: skip
    result = fit(
        model, objective, data, loop, config.out_dir, resume=resume, progress=progress,
        run_config={"vision": config.to_dict(), "loop": loop.to_dict()}, dist_context=None,
    )  # fmt: skip
    metrics = {
        "task": config.task,
        "preset": config.preset,
        "steps": result.step,
        "val_loss": result.val_loss,
    }
    metrics.update(evaluate_run(model, data, config.task))
    metrics["elapsed_s"] = result.elapsed_s
    Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
