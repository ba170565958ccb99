"""Entry point of the ``moekit`` command.

Each verb is a module ``moekit.cli.<verb>`` that defines ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their verb runs, so ``moekit --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb name -> module name under moekit.cli
VERBS: dict[str, str] = {
    "train": "train",
    "generate": "generate",
    "eval": "evaluate",
    "trace": "trace",
    "report": "report",
    "serve": "serve",
    "convert": "convert",
    "quantize": "quantize",
    "export-gguf": "export_gguf",
    "plan": "plan",
    "upcycle": "upcycle",
    "grow": "grow",
    "prune-experts": "prune_experts",
    "merge-experts": "merge_experts",
    "extend-experts": "extend_experts",
    "moe-merge": "moe_merge",
    "pregate": "pregate",
    "layer-demo": "layer_demo",
    "distill": "distill",
    "vision-train": "vision_train",
    "ts-train": "ts_train",
    "forecast": "forecast",
    "ts-eval": "ts_eval",
    "blind": "blind",
    "mixture": "mixture",
}


def _available() -> dict[str, object]:
    mods = {}
    for verb, module in VERBS.items():
        try:
            mods[verb] = importlib.import_module(f"moekit.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"moekit.cli.{module}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    """Builds the argument parser with one subparser per available verb."""
    import moekit

    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit.")
    parser.add_argument("--version", action="version", version=f"moekit {moekit.__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, mod in _available().items():
        p = sub.add_parser(verb, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"moekit {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
