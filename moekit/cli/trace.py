"""``moekit trace``: record every MoE layer's routing on a corpus to a safetensors trace."""

from __future__ import annotations

import argparse

from moekit.cli.common import add_model_argument, evaluation_tokens, load_model_and_tokenizer

HELP = "Record per-layer, per-token expert ids and weights on a corpus (the trace format all tools read)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    add_model_argument(p)
    p.add_argument(
        "--corpus", action="append", help="files, folders or globs (repeatable); default: the run's val split"
    )
    p.add_argument("--out", default="trace.safetensors", help="where to write the trace")
    p.add_argument("--tokens", type=int, default=32768, help="tokens to trace")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")


def run(args: argparse.Namespace) -> int:
    """Runs the model over windows of the corpus and writes the trace."""
    import torch

    from moekit.analysis import record_trace, save_trace

    model, tok, folder = load_model_and_tokenizer(args.model, args.dtype)
    tokens = evaluation_tokens(tok, folder, args.corpus)
    num_seq = max(1, min(args.tokens // args.seq_len, len(tokens) // args.seq_len))
    if len(tokens) < args.seq_len:
        raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than --seq-len {args.seq_len}")
    windows = torch.from_numpy(tokens[: num_seq * args.seq_len].reshape(num_seq, args.seq_len))
    batches = [(w, None) for w in windows.split(args.batch_size)]
    trace = record_trace(model, batches, description=str(folder))
    path = save_trace(trace, args.out)
    print(f"traced {trace.num_tokens} tokens over {trace.num_layers} MoE layers -> {path}")
    return 0
