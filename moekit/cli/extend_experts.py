"""``moekit extend-experts``: add experts for a new task (MoExtend) and save the consolidated model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moekit.cli._surgery import (
    add_calibration_arguments,
    add_io_arguments,
    build_config,
    calibration_batches,
    load_model,
    save_model,
    summary,
)

HELP = (
    "Extend an MoE with new experts for a new task (MoExtend); layers chosen by the routing shift of "
    "router tuning on the new data (or, with --shift-source data, of old against new data)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags (each sets an ExtendConfig field)."""
    add_io_arguments(p, calibration=False)
    add_calibration_arguments(p)
    p.add_argument(
        "--new-data", action="append", metavar="PATH", required=True, help="new-task text (repeatable)"
    )
    p.add_argument("--num-new-experts", type=int, help="new experts per extended layer")
    p.add_argument("--layers", choices=["all", "explicit", "shift"], help="which MoE layers to extend")
    p.add_argument("--layer-indices", type=int, nargs="+", help="layers for --layers explicit")
    p.add_argument("--shift-fraction", type=float, help="share of MoE layers to extend for --layers shift")
    p.add_argument(
        "--shift-source",
        choices=["router_tuning", "data"],
        help="router_tuning: routing before/after tuning only the routers on --new-data (MoExtend); "
        "data: the untouched router on --calib (old) against --new-data",
    )
    p.add_argument("--shift-metric", choices=["std", "js", "kl"], help="how the shift is measured")
    p.add_argument("--tune-steps", type=int, help="router-tuning steps for --shift-source router_tuning")
    p.add_argument("--tune-lr", type=float, help="router-tuning learning rate")
    p.add_argument("--expert-init", choices=["most_used", "mean", "random"], help="new expert init")
    p.add_argument(
        "--router-init",
        choices=["copy_source", "random", "isolated", "contrast"],
        help="new router rows init",
    )
    p.add_argument("--new-bias", type=float, help="initial logit bias of the new experts")


def run(args: argparse.Namespace) -> int:
    """Loads, extends, consolidates, saves, and writes extension.json (layers, new expert ids)."""
    from moekit.surgery import ExtendConfig, consolidate_extension, extend_experts
    from moekit.surgery.extend import extended_layers

    model, folder = load_model(args.model)
    config = build_config(
        ExtendConfig,
        args,
        {
            "num_new_experts": args.num_new_experts,
            "layers": args.layers,
            "layer_indices": args.layer_indices,
            "shift_fraction": args.shift_fraction,
            "shift_source": args.shift_source,
            "shift_metric": args.shift_metric,
            "tune_steps": args.tune_steps,
            "tune_lr": args.tune_lr,
            "expert_init": args.expert_init,
            "router_init": args.router_init,
            "new_bias": args.new_bias,
        },
    )
    new = calibration_batches(folder, args.new_data, args)
    needs_old = (
        config.layers == "shift" and config.shift_source == "data"
    ) or config.router_init == "contrast"
    old = calibration_batches(folder, args.calib, args) if needs_old else None
    ext = extend_experts(model, config, new_data=new, old_data=old)
    layers = extended_layers(ext)
    out = consolidate_extension(ext)
    save_model(out, args.out, folder)
    new_ids = {}
    for i in layers:
        total = out.config.moe_config(i).num_experts
        new_ids[str(i)] = list(range(total - config.num_new_experts, total))
    info = {"extended_layers": layers, "new_expert_ids": new_ids, "config": config.to_dict()}
    out_path = Path(args.out) / "extension.json"
    out_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"extended layers {layers} -> {args.out}: {summary(out)}; see {out_path}")
    return 0
