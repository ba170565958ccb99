"""``moekit export-gguf``: write a model folder as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse

from moekit.cli.common import load_model_and_tokenizer

HELP = "Export a model folder to GGUF (f32, f16, q8_0, q4_0) for llama.cpp, tokenizer included."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    p.add_argument("--model", required=True, help="a run folder, a checkpoint folder or a model folder")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument(
        "--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"], help="tensor type of the matrices"
    )


def run(args: argparse.Namespace) -> int:
    """Loads the model and writes the file."""
    from moekit.compress.gguf_export import export_gguf

    model, _, folder = load_model_and_tokenizer(args.model)
    path = export_gguf(model, args.out, args.type, folder / "tokenizer.json")
    print(path)
    return 0
