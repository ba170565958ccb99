"""``moekit convert``: Hugging Face <-> moekit model folders (see :mod:`moekit.convert`)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Convert a Hugging Face or moekit model folder to an HF folder (--format hf) or a moekit folder."

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    p.add_argument(
        "--from",
        dest="src",
        required=True,
        help="input folder: HF safetensors, a moekit model, or a run folder (its last checkpoint)",
    )
    p.add_argument("--to", dest="dst", required=True, help="output folder (created)")
    p.add_argument("--format", choices=("hf", "moekit"), default="hf", help="output format")
    p.add_argument(
        "--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep the input's)"
    )
    p.add_argument("--family", default=None, help="HF model_type to write (default: chosen from the config)")
    p.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="HF output: shard the safetensors above this size"
    )


def run(args: argparse.Namespace) -> int:
    """Loads ``--from`` and writes ``--to``; prints what it wrote."""
    import torch

    from moekit.convert import save_hf
    from moekit.convert.checkpoint import copy_tokenizer_files
    from moekit.loader import from_pretrained, inspect_folder

    dst = Path(args.dst)
    info = inspect_folder(args.src)  # a run folder means its last checkpoint
    src = info.model_dir
    if info.kind == "quantized":
        raise ValueError(
            f"--from {args.src} is a quantized folder; convert the float model it came from "
            "(or use `moekit export-gguf` for a quantized file llama.cpp reads)"
        )
    if args.format == "moekit" and args.family is not None:
        raise ValueError("--family only applies to --format hf")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = from_pretrained(src, dtype=dtype)
    from moekit.models import MoEForCausalLM

    if args.format == "hf" and not isinstance(model, MoEForCausalLM):
        model.save_pretrained(dst, format="hf")  # the family's own exporter (e.g. CLIP)
    elif args.format == "hf":
        save_hf(
            model,
            dst,
            family=args.family,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            tokenizer_dir=src,
        )
    else:
        model.save_pretrained(dst)
        copy_tokenizer_files(src, dst)
    print(f"wrote {args.format} folder {dst} ({model.num_parameters():,} parameters)")
    return 0
