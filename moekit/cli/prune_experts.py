"""``moekit prune-experts``: keep the most-used experts of every MoE layer."""

from __future__ import annotations

import argparse

from moekit.cli._surgery import (
    add_io_arguments,
    build_config,
    calibration_batches,
    load_model,
    save_model,
    summary,
)

HELP = (
    "Prune experts: keep the M most-used experts per MoE layer (by tokens or gate mass on calibration text)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags (each sets a PruneConfig field)."""
    add_io_arguments(p)
    p.add_argument("--keep", type=int, help="experts to keep per MoE layer (num_keep)")
    p.add_argument(
        "--metric", choices=["tokens", "gate_mass", "random"], help="usage statistic (default tokens)"
    )
    p.add_argument("--seed", type=int, help="seed for --metric random")


def run(args: argparse.Namespace) -> int:
    """Loads, measures usage, prunes, saves; prints the kept experts."""
    from moekit.surgery import PruneConfig, prune_experts

    model, folder = load_model(args.model)
    config = build_config(
        PruneConfig, args, {"num_keep": args.keep, "metric": args.metric, "seed": args.seed}
    )
    calib = calibration_batches(folder, args.calib, args) if config.metric != "random" else None
    out = prune_experts(model, config, calibration=calib)
    save_model(out, args.out, folder)
    print(f"pruned -> {args.out}: {summary(out)}; kept experts per MoE layer: {out.pruned_experts}")
    return 0
