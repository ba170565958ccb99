"""``moekit grow``: scale-up of a dense model before upcycling (FPI, bert2BERT AKI, AquilaMoE AKI-Pro)."""

from __future__ import annotations

import argparse

from moekit.cli._surgery import add_io_arguments, build_config, load_model, save_model, summary

HELP = (
    "Grow a dense model wider (FFN width, attention heads, model width) or deeper: function-preserving "
    "(zero/fpi) or AKI / AKI-Pro (AquilaMoE)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags (each sets a GrowConfig field)."""
    add_io_arguments(p, calibration=False)
    p.add_argument("--dim", type=int, help="new model width")
    p.add_argument("--ffn-dim", type=int, help="new FFN width")
    p.add_argument(
        "--ffn-scheme",
        choices=["zero", "fpi", "aki"],
        help="FFN widening: zero and fpi are exact; aki copies from layer l+1",
    )
    p.add_argument("--num-heads", type=int, help="new query-head count (adds whole GQA groups)")
    p.add_argument(
        "--attn-scheme", choices=["fpi", "aki"], help="head growth: fpi is exact; aki copies from layer l+1"
    )
    p.add_argument("--num-new-layers", type=int, help="layers to add")
    p.add_argument("--depth-position", choices=["interleave", "stack"], help="where new layers go")
    p.add_argument("--depth-init", choices=["zero_out", "copy"], help="zero_out is exact, copy is not")
    p.add_argument("--seed", type=int, help="seeds the random new weights")


def run(args: argparse.Namespace) -> int:
    """Loads, grows, saves; prints a summary."""
    from moekit.surgery import GrowConfig, grow

    model, folder = load_model(args.model)
    config = build_config(
        GrowConfig,
        args,
        {
            "dim": args.dim,
            "ffn_dim": args.ffn_dim,
            "ffn_scheme": args.ffn_scheme,
            "num_heads": args.num_heads,
            "attn_scheme": args.attn_scheme,
            "num_new_layers": args.num_new_layers,
            "depth_position": args.depth_position,
            "depth_init": args.depth_init,
            "seed": args.seed,
        },
    )
    out = grow(model, config)
    save_model(out, args.out, folder)
    print(f"grown -> {args.out}: {summary(out)}")
    return 0
