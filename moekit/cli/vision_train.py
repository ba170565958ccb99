"""``moekit vision-train``: train a ViT-MoE (digits), a CLIP-MoE (scenes) or a task-level ViT-MoE."""

from __future__ import annotations

import argparse
import json

HELP = (
    "Train a vision MoE: --task vit (digits), clip (shape scenes + captions) or multitask (task-level MoE); "
    "--recipe unimoe runs Uni-MoE's three stages on image + signal VQA."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The verb's flags (each a :class:`~moekit.train.vision.VisionRunConfig` field)."""
    p.add_argument("--task", choices=["vit", "clip", "multitask"], default="vit", help="what to train")
    p.add_argument(
        "--preset",
        help="vision preset (vit-digits, vit-digits-mamba, clip-shapes, multitask-shapes, each also -dense)",
    )
    p.add_argument("--out", help="run folder (default runs/vision-<task>)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and batch order")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last")
    g = p.add_argument_group("recipes on generated VQA (--recipe; --task is ignored)")
    g.add_argument(
        "--recipe",
        choices=["unimoe", "moe-llava"],
        help="unimoe: connectors, then per-modality LoRA experts, then joint LoRA-expert tuning; "
        "moe-llava: projector, then projector + LM, then the upcycled MoE layers",
    )
    g.add_argument(
        "--dense-control", action="store_true",
        help="moe-llava: stage 3 trains the same layers' dense FFNs instead of upcycling them",
    )  # fmt: skip
    g.add_argument(
        "--expert-kind", choices=["lora", "ffn"], default="lora",
        help="lora (Uni-MoE) or ffn (full experts with the same trainable parameters, the control)",
    )  # fmt: skip
    g.add_argument("--num-train", type=int, default=600, help="generated items per modality")
    g.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (>= 2)")
    g.add_argument("--top-k", type=int, default=2, help="experts per token")
    g.add_argument("--lora-rank", type=int, default=4, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (scale alpha / r)")
    g.add_argument(
        "--stage-steps",
        help="steps of stages 1, 2 (per modality for unimoe), 3 (default 150,100,200; moe-llava 150,300,200)",
    )


def run(args: argparse.Namespace) -> int:
    """Parses the flags into a run config and trains it."""
    if args.recipe:
        if args.resume:
            raise ValueError(
                f"--recipe {args.recipe} does not resume; rerun it (each stage takes a minute or two)"
            )
        return _run_unimoe(args) if args.recipe == "unimoe" else _run_moe_llava(args)
    from moekit.train.vision import VisionRunConfig, train_vision

    config = VisionRunConfig(
        task=args.task, preset=args.preset, out_dir=args.out or f"runs/vision-{args.task}",
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )  # fmt: skip
    metrics = train_vision(config, resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def _run_unimoe(args: argparse.Namespace) -> int:
    from moekit.surgery.unimoe import UniMoERunConfig, train_unimoe

    steps = _stage_steps(args.stage_steps or "150,100,200")
    config = UniMoERunConfig(
        out_dir=args.out or "runs/unimoe", expert_kind=args.expert_kind, num_experts=args.num_experts,
        top_k=args.top_k, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, stage_steps=steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, num_train=args.num_train,
    )  # fmt: skip
    metrics = train_unimoe(config)
    print(json.dumps(metrics["stages"], indent=2))
    return 0


def _stage_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--stage-steps {text!r} must be three integers like 150,100,200") from None


def _run_moe_llava(args: argparse.Namespace) -> int:
    from moekit.surgery.llava import LLaVARunConfig, train_moe_llava

    config = LLaVARunConfig(
        out_dir=args.out or "runs/moe-llava", moe=not args.dense_control, num_experts=args.num_experts,
        top_k=args.top_k, stage_steps=_stage_steps(args.stage_steps or "150,300,200"),
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, num_train=args.num_train,
    )  # fmt: skip
    metrics = train_moe_llava(config)
    print(json.dumps(metrics["stages"], indent=2))
    return 0
