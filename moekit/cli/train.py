"""``moekit train``: train a preset on a corpus (default: moe-small on the Python standard library)."""

from __future__ import annotations

import argparse
import math
import os
import sys

HELP = "Train a model preset on a text corpus (default: moe-small on the Python stdlib, ~10 min on 2 cores)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags. Each one sets a ``TrainConfig`` field; unset flags keep the config's value."""
    p.add_argument("--config", metavar="FILE", help="a TrainConfig JSON file; flags given here override it")
    p.add_argument(
        "--no-report", action="store_true", help="skip writing the report (plots + report.md) at the end"
    )
    p.add_argument("--preset", help="model preset (default moe-small; see moekit.models.list_presets())")
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from this model folder (e.g. `moekit upcycle` output or an imported HF model) instead of a preset",
    )
    p.add_argument(
        "--corpus",
        action="append",
        metavar="PATH",
        help="a text file, folder or quoted glob; repeat for several (default: the Python stdlib source)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="run folder for checkpoints and train_log.jsonl (default runs/<preset>)"
    )
    p.add_argument("--steps", type=int, help="optimizer steps to train (the step budget)")
    p.add_argument("--max-tokens", type=int, help="training-token budget instead of --steps")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--lr", type=float, help="peak learning rate (cosine decay to min_lr after warmup)")
    p.add_argument(
        "--seed", type=int, help="seed for init, data order and every RNG (runs are deterministic)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from checkpoints/last (its saved config is the base)",
    )
    p.add_argument(
        "--freeze",
        action="append",
        metavar="GROUP",
        help="freeze a parameter group (router, experts, shared, attention, embeddings, norms, dense_ffn, "
        "non_experts, all_but_router, all_but_experts) or 're:REGEX'; repeatable",
    )
    p.add_argument(
        "--aux-loss-coef", type=float, help="load-balance loss coefficient (default: the preset's)"
    )
    p.add_argument("--z-loss-coef", type=float, help="router z-loss coefficient (default: the preset's)")
    p.add_argument(
        "--seq-balance-coef",
        type=float,
        help="sequence-wise balance loss coefficient (default: the preset's)",
    )
    p.add_argument(
        "--entropy-loss-coef",
        type=float,
        help="top-p routing's entropy loss coefficient (default: the preset's)",
    )
    p.add_argument(
        "--k-schedule",
        metavar="SPEC",
        help="experts per token over training, TYPE:K_MIN:K_MAX[:HORIZON] with TYPE linear|cosine|step|constant, "
        "or a JSON object (for SMoE-Dropout's random-fixed router)",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (weights and optimizer stay fp32)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument(
        "--time-limit", type=float, metavar="SECONDS", help="stop with a checkpoint after this long (0: none)"
    )


def build_config(args: argparse.Namespace):
    """The TrainConfig of this invocation: the base (``--config``, the resumed run's, or the defaults)
    with every given flag applied."""
    from moekit.train import KSchedule, TrainConfig
    from moekit.train.checkpoint import load_checkpoint

    if args.config:
        base = TrainConfig.from_json(args.config).to_dict()
    else:
        base = TrainConfig().to_dict()
    if args.preset:
        base["preset"] = args.preset
    if getattr(args, "init_from", None):
        base["init_from"] = args.init_from
    if args.out:
        base["out_dir"] = args.out
    if args.resume:
        # The resumed run's own settings are the base, so `--resume` alone continues it unchanged.
        probe = TrainConfig.from_dict(base)
        saved = load_checkpoint(probe.resolved_out_dir() / "checkpoints").state["config"]
        # A model flag that names another model than the run's is refused, not silently dropped.
        asked = {"preset": args.preset, "init_from": getattr(args, "init_from", None)}
        for key, value in asked.items():
            if value is not None and value != saved.get(key):
                flag = "--" + key.replace("_", "-")
                raise ValueError(
                    f"cannot resume: {flag} {value} differs from the run's {key} {saved.get(key)!r}; "
                    f"drop {flag} to continue the run, or train into a new --out folder"
                )
        base = {**saved, "out_dir": base["out_dir"]}
    changes = {
        "corpus": args.corpus,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "freeze": args.freeze,
        "aux_loss_coef": args.aux_loss_coef,
        "z_loss_coef": args.z_loss_coef,
        "seq_balance_coef": getattr(args, "seq_balance_coef", None),
        "entropy_loss_coef": getattr(args, "entropy_loss_coef", None),
    }
    base.update({k: v for k, v in changes.items() if v is not None})
    if args.steps is not None:
        base["max_steps"] = args.steps
        if args.max_tokens is None:
            base["max_tokens"] = None
    if args.max_tokens is not None:
        base["max_tokens"] = args.max_tokens
        if args.steps is None:
            base["max_steps"] = None
    if args.k_schedule:
        base["k_schedule"] = KSchedule.parse(args.k_schedule).to_dict()
    if args.bf16:
        base["dtype"] = "bf16"
    if args.grad_checkpointing:
        base["gradient_checkpointing"] = True
    if args.time_limit is not None:
        base["time_limit_s"] = args.time_limit if args.time_limit > 0 else None
    return TrainConfig.from_dict(base)


def baseline_phrase(val_loss: float, unigram_loss: float) -> str:
    """How the val loss compares with the unigram baseline, in words that are right either way."""
    if math.isnan(val_loss):
        return "the model was not evaluated"
    gap = unigram_loss - val_loss
    if gap > 0:
        return f"the model is {gap:.3f} nats/token below it"
    if gap < 0:
        return f"the model is {-gap:.3f} nats/token above it (not yet better than unigram statistics)"
    return "the model is level with it"


def main_job_reference(config):
    """The docs' reference numbers for this run's preset when it trains on the main job's default
    budget and data (anything else changed: None, since the numbers would not compare)."""
    from moekit.models.presets import reference_run
    from moekit.train import TrainConfig

    default = TrainConfig()
    same = ("init_from", "model_overrides", "corpus", "max_corpus_bytes", "val_fraction", "seq_len")
    same += ("batch_size", "grad_accum", "max_steps", "max_tokens", "lr", "min_lr", "warmup_steps")
    same += ("aux_loss_coef", "z_loss_coef", "k_schedule", "freeze", "dtype", "tokenizer_dir")
    if any(getattr(config, f) != getattr(default, f) for f in same):
        return None
    return reference_run(config.preset)


def run(args: argparse.Namespace) -> int:
    """Trains and prints where the checkpoint and log went, the final val loss and the unigram baseline."""
    from moekit.train import train
    from moekit.train.checkpoint import CheckpointWriteError

    config = build_config(args)
    out = config.resolved_out_dir()
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks
    if is_main:
        limit = f"time limit {config.time_limit_s:g} s" if config.time_limit_s else "no time limit"
        print(
            f"training {config.init_from or config.preset} for {config.total_steps} steps x "
            f"{config.tokens_per_step} tokens ({limit}) -> {out}",
            file=sys.stderr,
        )
    try:
        result = train(config, resume=args.resume, progress=sys.stderr.isatty())
    except CheckpointWriteError as e:
        print(f"moekit train: error: {e.strerror}", file=sys.stderr)
        return 1
    if not is_main:
        return 0
    if result.stop_reason == "already_finished":
        print(
            f"nothing to train: the run already finished at step {result.step} ({result.num_tokens:,} tokens)"
        )
    else:
        print(f"stopped:          {result.stop_reason} at step {result.step} ({result.num_tokens:,} tokens)")
    print(f"checkpoint:       {result.checkpoint_dir}")
    print(f"run log:          {result.log_path}")
    if math.isnan(result.val_loss):
        print("val loss:         not evaluated (stopped before the first evaluation)")
    else:
        at = "" if result.val_step == result.step else f" at step {result.val_step}"
        print(
            f"val loss:         {result.val_loss:.4f} nats/token (perplexity {result.val_perplexity:.2f}){at}"
        )
    print(
        f"unigram baseline: {result.unigram_loss:.4f} nats/token (perplexity {math.exp(result.unigram_loss):.2f}); "
        f"{baseline_phrase(result.val_loss, result.unigram_loss)}"
    )
    reference = main_job_reference(config)
    if reference is not None:
        early = (
            "" if result.stop_reason == "max_steps" else f"; this run stopped early ({result.stop_reason})"
        )
        print(
            f"reference:        after all {config.total_steps} steps docs/benchmarks.md measured "
            f"{reference.preset} at {reference.val_loss:.4f} and its dense twin {reference.twin} at "
            f"{reference.twin_val_loss:.4f} (means of {reference.num_seeds} seeds){early}"
        )
    if result.num_steps_run:
        print(f"throughput:       {result.tokens_per_s:,.0f} tokens/s over {result.elapsed_s:.0f} s")
    if not args.no_report and result.stop_reason not in ("interrupted", "already_finished"):
        from moekit.cli.report import report_for_run

        md = report_for_run(result.out_dir)
        print(f"report:           {md} (loss, expert load and router entropy plots beside it)")
    return 130 if result.stop_reason == "interrupted" else 0
