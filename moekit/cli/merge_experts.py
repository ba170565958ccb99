"""``moekit merge-experts``: merge similar experts of every MoE layer into fewer experts."""

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

HELP = "Merge similar experts (weight or output cosine, agglomerative) into fewer experts per MoE layer."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags (each sets a MergeConfig field)."""
    add_io_arguments(p)
    p.add_argument("--num-experts", type=int, help="experts left per MoE layer")
    p.add_argument("--similarity", choices=["weight", "output"], help="how experts are compared")
    p.add_argument("--usage-weighted", action="store_true", default=None, help="usage-weighted averages")
    p.add_argument("--router-merge", choices=["mean", "mean_logn_bias"], help="how router rows are merged")


def run(args: argparse.Namespace) -> int:
    """Loads, merges, saves; prints the groups."""
    from moekit.surgery import MergeConfig, merge_experts

    model, folder = load_model(args.model)
    config = build_config(
        MergeConfig,
        args,
        {
            "num_experts": args.num_experts,
            "similarity": args.similarity,
            "usage_weighted": args.usage_weighted,
            "router_merge": args.router_merge,
        },
    )
    needs = config.similarity == "output" or config.usage_weighted
    calib = calibration_batches(folder, args.calib, args) if needs else None
    out = merge_experts(model, config, calibration=calib)
    save_model(out, args.out, folder)
    print(f"merged -> {args.out}: {summary(out)}; groups per MoE layer: {out.merged_groups}")
    return 0
