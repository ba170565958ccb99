"""``moekit ts-train``: pretrain a forecaster (default: timemoe-small on the built-in series)."""

from __future__ import annotations

import argparse
import math
import sys

HELP = "Pretrain a time-series forecaster (default: timemoe-small on built-in synthetic + statsmodels series, < 10 min)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags; unset flags keep the TSTrainConfig defaults (or the resumed run's)."""
    p.add_argument("--family", help="forecast family from the registry (default timemoe)")
    p.add_argument("--preset", help="model preset of the family (default timemoe-small)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 600)")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<preset>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out exactly (its saved config)"
    )
    p.add_argument("--batch-size", type=int, help="windows per batch (default 32)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, help="model init seed (default 0)")
    p.add_argument("--num-synthetic", type=int, help="synthetic pretraining series (default 256)")
    p.add_argument(
        "--real",
        choices=("pretrain", "none"),
        help="add the statsmodels pretraining series (default pretrain)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's); 1 is much faster on a machine whose cores are busy",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        help="stop with a checkpoint after S seconds (default 540; 0 = none)",
    )


def build_config(args: argparse.Namespace):
    """The TSTrainConfig the flags describe (the saved one, for --resume)."""
    from moekit.train.forecasting import TSTrainConfig, forecast_family, resume_config

    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out DIR (the run folder to continue)")
        config = resume_config(args.out, args.steps)
        changed = [
            f
            for f in ("family", "preset", "batch_size", "lr", "seed", "num_synthetic", "real")
            if getattr(args, f)
        ]
        if changed:
            raise ValueError(
                f"--resume continues the saved run exactly; drop {['--' + f.replace('_', '-') for f in changed]}"
            )
        return config
    # Another family's default preset is the first in its PRESETS; timemoe's is timemoe-small.
    base = TSTrainConfig()
    family = forecast_family(args.family or base.family).name
    fields = {"family": family}
    if args.preset:
        fields["preset"] = args.preset
    elif family != base.family:
        from moekit.train.forecasting import family_presets

        presets = list(family_presets(forecast_family(family)))
        if not presets:
            raise ValueError(f"family {family!r} has no presets")
        fields["preset"] = presets[0]
    for flag, name in (("steps", "max_steps"), ("lr", "lr"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            fields[name] = getattr(args, flag)
    if args.time_limit is not None:
        fields["time_limit_s"] = args.time_limit or None
    data = {}
    if args.batch_size is not None:
        data["batch_size"] = args.batch_size
    if args.num_synthetic is not None:
        data["num_synthetic"] = args.num_synthetic
    if args.real is not None:
        data["real_series"] = args.real
    if data:
        fields["data"] = base.data.replace(**data)
    config = base.replace(**fields)
    config.model_config()  # an unknown preset fails here, before any work
    return config


def run(args: argparse.Namespace) -> int:
    """Trains and prints where the run went and its validation loss."""
    from pathlib import Path

    from moekit.train.forecasting import ts_train

    config = build_config(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{config.preset}")
    limit = f"time limit {config.time_limit_s:g} s" if config.time_limit_s else "no time limit"
    print(
        f"training {config.family}/{config.preset} for {config.max_steps} steps ({limit}) -> {out}",
        file=sys.stderr,
    )
    result = ts_train(config, out, resume=args.resume, progress=sys.stderr.isatty())
    if result.stop_reason == "already_finished":
        print(f"nothing to train: the run already finished at step {result.step}")
    else:
        print(f"stopped:     {result.stop_reason} at step {result.step} ({result.elapsed_s:.0f} s)")
    print(f"checkpoint:  {result.checkpoint_dir}")
    print(f"run log:     {result.log_path}")
    if not math.isnan(result.val_loss):
        print(f"val loss:    {result.val_loss:.4f} (step {result.val_step}, normalised units)")
    print(f"forecast:    moekit forecast --model {out} --input FILE --horizon H --out forecast.csv")
    return 0
