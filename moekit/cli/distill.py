"""``moekit distill``: distil a teacher into an MoE student (mimic, preference, Mixture-of-Students)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HELP = "Distil a teacher into an MoE student: mimic KD, preference (DPO/KTO, teacher as reference), or mos."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags; each sets a ``DistillConfig`` field (unset flags keep its value)."""
    p.add_argument("--teacher", metavar="DIR", help="teacher folder (run, checkpoint, model or Hugging Face)")
    p.add_argument("--student", metavar="DIR", help="student folder (e.g. `moekit upcycle` output)")
    p.add_argument(
        "--student-preset", metavar="NAME", help="a new student from this preset (teacher's vocabulary)"
    )
    p.add_argument(
        "--upcycle-experts",
        type=int,
        metavar="E",
        help="--student is dense: upcycle every other FFN into E copied experts (top-2) before distilling",
    )
    p.add_argument("--recipe", choices=["mimic", "preference", "mos"], help="the recipe (default mimic)")
    p.add_argument("--kd-kind", choices=["forward_kl", "reverse_kl", "jsd"], help="KD divergence")
    p.add_argument("--kd-beta", type=float, help="JSD interpolation (0 forward KL, 1 reverse KL)")
    p.add_argument("--temperature", type=float, help="KD temperature T (the loss is scaled by T^2)")
    p.add_argument("--kd-weight", type=float, help="weight of the KD term")
    p.add_argument("--ce-weight", type=float, help="weight of the data cross-entropy")
    p.add_argument(
        "--kd-stop-step", type=int, metavar="N", help="staged KD: no KD from step N on (mos: steps/2)"
    )
    p.add_argument("--top-k-logits", type=int, metavar="K", help="KD on the teacher's top-K logits only")
    p.add_argument("--cache-teacher", action="store_true", help="run the teacher once, caching top-K logits")
    p.add_argument("--mos-num-layers", type=int, help="depth of the Mixture-of-Students student")
    p.add_argument("--pref-loss", choices=["kto_pair", "sigmoid"], help="preference loss (default kto_pair)")
    p.add_argument("--pref-beta", type=float, help="preference beta (default 0.1)")
    p.add_argument("--num-prompts", type=int, help="prompts for preference pairs")
    p.add_argument("--num-samples", type=int, help="student samples per prompt (ranked by the teacher)")
    p.add_argument(
        "--corpus", action="append", metavar="PATH", help="text file/folder/glob (default: stdlib)"
    )
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences (or pairs) per micro-batch")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="seed of every RNG")
    p.add_argument(
        "--time-limit", type=float, metavar="SECONDS", help="stop with a checkpoint after this long"
    )
    p.add_argument("--config", metavar="FILE", help="a DistillConfig JSON file; flags override it")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/distill)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")


_FLAGS = {
    "teacher": "teacher",
    "student": "student",
    "student_preset": "student_preset",
    "recipe": "recipe",
    "kd_kind": "kd_kind",
    "kd_beta": "kd_beta",
    "temperature": "temperature",
    "kd_weight": "kd_weight",
    "ce_weight": "ce_weight",
    "kd_stop_step": "kd_stop_step",
    "top_k_logits": "top_k_logits",
    "mos_num_layers": "mos_num_layers",
    "upcycle_experts": "upcycle_experts",
    "pref_loss": "pref_loss_type",
    "pref_beta": "pref_beta",
    "num_prompts": "num_prompts",
    "num_samples": "num_samples",
    "corpus": "corpus",
    "steps": "max_steps",
    "batch_size": "batch_size",
    "seq_len": "seq_len",
    "lr": "lr",
    "seed": "seed",
    "time_limit": "time_limit_s",
    "out": "out_dir",
}


def build_config(args: argparse.Namespace):
    """The DistillConfig: ``--config`` (or, with ``--resume``, the run's ``distill_config.json``) with
    every given flag applied."""
    from moekit.train.distill_recipes import DistillConfig

    base: dict = {}
    if args.config:
        base = json.loads(Path(args.config).read_text())
    if args.resume:
        saved = Path(args.out or base.get("out_dir", "runs/distill")) / "distill_config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved} not found: nothing to resume (pass the --out of a distill run)")
        base = json.loads(saved.read_text())
    # A student flag replaces the config's student of either kind.
    if args.student is not None:
        base.pop("student_preset", None)
    if args.student_preset is not None:
        base.pop("student", None)
    for flag, name in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            base[name] = value
    if args.cache_teacher:
        base["cache_teacher"] = True
    if "teacher" not in base:
        raise ValueError("--teacher DIR is required")
    return DistillConfig.from_dict(base)


def _upcycled_student(config, num_experts: int):
    from moekit.loader import from_pretrained
    from moekit.surgery.upcycle import UpcycleConfig, upcycle

    if config.student is None:
        raise ValueError("--upcycle-experts needs --student DIR (the smaller dense model)")
    dense = from_pretrained(config.student)
    if dense.config.moe is not None and dense.config.num_moe_layers:
        raise ValueError(
            f"--upcycle-experts: {config.student} is already an MoE model; drop --upcycle-experts"
        )
    up = upcycle(
        dense, UpcycleConfig(layers="every_other", num_experts=num_experts, top_k=min(2, num_experts))
    )
    return up.train()


def run(args: argparse.Namespace) -> int:
    """Distils, then prints the run folder, the student's val loss, the teacher's and the agreement."""
    from moekit.train.checkpoint import CheckpointWriteError
    from moekit.train.distill_recipes import distill

    config = build_config(args)
    student = _upcycled_student(config, config.upcycle_experts) if config.upcycle_experts else None
    print(f"distilling {config.teacher} -> {config.student or config.student_preset} "
          f"({config.recipe}, {config.max_steps} steps) -> {config.out_dir}", file=sys.stderr)  # fmt: skip
    try:
        result = distill(config, student=student, resume=args.resume, progress=sys.stderr.isatty())
    except CheckpointWriteError as e:
        print(f"moekit distill: error: {e.strerror}", file=sys.stderr)
        return 1
    s = result.summary
    print(f"stopped:          {s['stop_reason']} at step {s['step']}")
    print(f"checkpoint:       {result.fit.checkpoint_dir}")
    print(f"run log:          {result.fit.log_path}")
    if config.recipe == "preference":
        b, a, j = s["before"], s["after"], s["teacher_judged"]
        print(f"reward margin:    {b['reward_margin']:.4f} before -> {a['reward_margin']:.4f} after "
              f"(accuracy {b['reward_accuracy']:.2f} -> {a['reward_accuracy']:.2f})")  # fmt: skip
        print(f"preference rate:  {j['preference_rate']:.2f} (teacher prefers the new student's sample)")
    else:
        val = s["val_loss"]
        print(f"val loss:         {'not evaluated' if math.isnan(val) else f'{val:.4f}'} (student CE); "
              f"teacher {s['teacher_val_loss']:.4f}, unigram {s['unigram_val_loss']:.4f}")  # fmt: skip
        print(f"top-1 agreement:  {s['top1_agreement']:.3f} with the teacher")
    print(f"summary:          {result.out_dir / 'distill_summary.json'}")
    return 130 if s["stop_reason"] == "interrupted" else 0
