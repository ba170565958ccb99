"""``moekit eval``: perplexity of a model on a corpus (default: the run's validation split)."""

from __future__ import annotations

import argparse
import json
import math

from moekit.cli.common import add_model_argument, evaluation_tokens, load_model_and_tokenizer

HELP = "Perplexity of a model on a corpus (default: the training run's held-out validation split)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    add_model_argument(p)
    p.add_argument(
        "--corpus", action="append", help="files, folders or globs (repeatable); default: the run's val split"
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    p.add_argument("--batches", type=int, default=20, help="number of batches (windows spread over the text)")
    p.add_argument("--k", type=int, default=None, help="experts per token for this evaluation (dynamic k)")


def run(args: argparse.Namespace) -> int:
    """Loads the model, scores fixed windows, prints loss and perplexity as JSON."""
    from moekit.data import eval_batches
    from moekit.train import TrainConfig, evaluate

    model, tok, folder = load_model_and_tokenizer(args.model, args.dtype)
    tokens = evaluation_tokens(tok, folder, args.corpus)
    batches = eval_batches(tokens, args.seq_len, args.batch_size, args.batches)
    loss = evaluate(model, batches, TrainConfig(), moe_k=args.k)
    report = {
        "model": str(folder),
        "tokens_scored": sum(int(b[:, 1:].numel()) for b in batches),
        "loss": round(loss, 5),
        "perplexity": round(math.exp(min(loss, 50)), 3),
        "k": args.k,
    }
    print(json.dumps(report))
    return 0
