"""``moekit moe-merge``: combine dense fine-tunes of one base into an MoE (mergekit-moe / BTX)."""

from __future__ import annotations

import argparse

from moekit.cli._surgery import build_config, calibration_batches, load_model, save_model, summary

HELP = "Combine dense fine-tunes of one base into an MoE whose experts are their FFNs (mergekit-moe style)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags (each sets a MixtureConfig field)."""
    p.add_argument("--base", required=True, help="the common dense base (model, run or checkpoint folder)")
    p.add_argument("--experts", nargs="+", required=True, help="dense fine-tunes, one expert each")
    p.add_argument("--out", required=True, help="folder to write the MoE to")
    p.add_argument("--config", metavar="JSON", help="MixtureConfig JSON file or string; flags override it")
    p.add_argument(
        "--prompts",
        nargs="+",
        metavar="PATH",
        help="positive-prompt text per expert (same order as --experts) for the 'hidden' router init",
    )
    p.add_argument("--layers", choices=["all", "every_other", "explicit"], help="which FFNs become MoE")
    p.add_argument("--layer-indices", type=int, nargs="+", help="layers for --layers explicit")
    p.add_argument("--top-k", type=int, help="experts per token")
    p.add_argument("--shared", choices=["average", "base"], help="non-FFN weights: average or base")
    p.add_argument("--router-init", choices=["hidden", "random", "zeros"], help="router initialisation")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per prompt window")
    p.add_argument("--batch-size", type=int, default=4, help="prompt windows per batch")
    p.add_argument("--calib-batches", type=int, default=4, help="prompt batches per expert")


def run(args: argparse.Namespace) -> int:
    """Loads the models, merges, saves."""
    from moekit.surgery import MixtureConfig, merge_dense_models

    base, folder = load_model(args.base)
    models = [load_model(p)[0] for p in args.experts]
    config = build_config(
        MixtureConfig,
        args,
        {
            "layers": args.layers,
            "layer_indices": args.layer_indices,
            "top_k": args.top_k,
            "shared": args.shared,
            "router_init": args.router_init,
        },
    )
    prompts = None
    if config.router_init == "hidden":
        if not args.prompts or len(args.prompts) != len(models):
            raise ValueError(f"--router-init hidden needs --prompts with one path per expert ({len(models)})")
        prompts = [calibration_batches(folder, [p], args) for p in args.prompts]
    out = merge_dense_models(base, models, config, prompts=prompts)
    save_model(out, args.out, folder)
    print(f"merged {len(models)} models -> {args.out}: {summary(out)}")
    return 0
