"""``moekit upcycle``: turn a dense model folder into an MoE (sparse upcycling)."""

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

HELP = "Sparse-upcycle a dense model: its FFNs become MoE layers (copies, noisy copies or an FFN split)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags (each sets an UpcycleConfig field)."""
    add_io_arguments(p)
    p.add_argument("--layers", choices=["all", "every_other", "explicit"], help="which FFNs to upcycle")
    p.add_argument("--layer-indices", type=int, nargs="+", help="layers for --layers explicit")
    p.add_argument("--num-experts", type=int, help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, help="experts per token (default 2)")
    p.add_argument("--expert-init", choices=["copy", "noise", "split"], help="expert initialisation")
    p.add_argument("--noise-std", type=float, help="relative noise for --expert-init noise")
    p.add_argument("--router-init", choices=["zeros", "random", "kmeans"], help="router initialisation")
    p.add_argument(
        "--exact-split",
        action="store_true",
        help="function-preserving split: k=E, zero router, no renormalisation, routed_scaling_factor=E",
    )
    p.add_argument("--seed", type=int, help="seeds noise, router and k-means")


def run(args: argparse.Namespace) -> int:
    """Loads, upcycles, saves; prints a summary."""
    from moekit.surgery import UpcycleConfig, upcycle

    model, folder = load_model(args.model)
    if args.exact_split:
        if args.num_experts is None:
            raise ValueError("--exact-split needs --num-experts")
        config = UpcycleConfig.exact_split(args.num_experts)
    else:
        config = build_config(
            UpcycleConfig,
            args,
            {
                "layers": args.layers,
                "layer_indices": args.layer_indices,
                "num_experts": args.num_experts,
                "top_k": args.top_k,
                "expert_init": args.expert_init,
                "noise_std": args.noise_std,
                "router_init": args.router_init,
                "seed": args.seed,
            },
        )
    calib = calibration_batches(folder, args.calib, args) if config.router_init == "kmeans" else None
    out = upcycle(model, config, calibration=calib)
    save_model(out, args.out, folder)
    print(f"upcycled -> {args.out}: {summary(out)}")
    return 0
