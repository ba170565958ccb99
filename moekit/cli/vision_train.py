"""``moekit vision-train``: train a ViT-MoE (digits), a CLIP-MoE (scenes) or a task-level ViT-MoE."""

from __future__ import annotations

import argparse
import json

HELP = (
    "Train a vision MoE: --task vit (digits), clip (shape scenes + captions) or multitask (task-level MoE)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The verb's flags (each a :class:`~moekit.train.vision.VisionRunConfig` field)."""
    p.add_argument("--task", choices=["vit", "clip", "multitask"], default="vit", help="what to train")
    p.add_argument(
        "--preset", help="vision preset (vit-digits, clip-shapes, multitask-shapes, each also -dense)"
    )
    p.add_argument("--out", help="run folder (default runs/vision-<task>)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and batch order")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last")


def run(args: argparse.Namespace) -> int:
    """Parses the flags into a run config and trains it."""
    from moekit.train.vision import VisionRunConfig, train_vision

    config = VisionRunConfig(
        task=args.task, preset=args.preset, out_dir=args.out or f"runs/vision-{args.task}",
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )  # fmt: skip
    metrics = train_vision(config, resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0
