"""``moekit pregate``: turn a model into a Pre-gated MoE (routers read the previous MoE layer's input)."""

from __future__ import annotations

import argparse

from moekit.cli._surgery import add_io_arguments, load_model, save_model, summary

HELP = (
    "Pre-gated MoE: each MoE layer after the first routes from the previous MoE layer's input "
    "(fine-tune it next with `moekit train --init-from OUT`)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    add_io_arguments(p, calibration=False)


def run(args: argparse.Namespace) -> int:
    """Loads, converts with :func:`moekit.surgery.to_pregated`, saves; prints a summary."""
    from moekit.surgery import to_pregated

    if args.config:
        raise ValueError("moekit pregate takes no --config (to_pregated has no settings)")
    model, folder = load_model(args.model)
    out = to_pregated(model)
    save_model(out, args.out, folder)
    print(f"pregated -> {args.out}: {summary(out)}; fine-tune it with `moekit train --init-from {args.out}`")
    return 0
