"""Dynamic k at inference: validation perplexity and decode speed at k = 1..4 on a trained model.

Uses the run's own held-out split (``moekit eval``'s default) and greedy batch-1 decoding with
:class:`moekit.models.decode.DecodeSession` (``moe_k`` = k), one torch thread, CPU time.

Run: ``.venv/bin/python benchmarks/bench_dynamic_k.py --model runs/compress-small``
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from moekit.cli.common import evaluation_tokens, load_model_and_tokenizer
from moekit.data import eval_batches
from moekit.models.decode import DecodeSession
from moekit.models.generation import iter_tokens
from moekit.train import TrainConfig, evaluate


def decode_ms_per_token(model, ids: torch.Tensor, k: int, new_tokens: int = 64) -> float:
    """Best-of-3 CPU ms per decoded token (prefill excluded) at ``moe_k = k``."""
    best = float("inf")
    for _ in range(3):
        session = DecodeSession(model, ids, max_new_tokens=new_tokens, moe_k=k)
        tokens = iter_tokens(session, new_tokens)
        next(tokens)  # prefill + first token
        t0 = time.process_time()
        for _ in tokens:
            pass
        best = min(best, (time.process_time() - t0) / (new_tokens - 1))
    return best * 1e3


def main() -> None:
    """Prints a markdown table: k, perplexity, decode ms/token, tokens/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/compress-small")
    parser.add_argument("--ks", default="1,2,3,4")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok, folder = load_model_and_tokenizer(args.model)
    batches = eval_batches(evaluation_tokens(tok, folder, None), args.seq_len, 8, args.batches)
    ids = batches[0][:1, :32]
    trained_k = model.moe_layers[0].config.top_k
    print(
        f"model {folder} (trained with top-{trained_k}); {sum(b[:, 1:].numel() for b in batches)} val tokens"
    )
    print("| k | val perplexity | decode ms/token | tokens/s |")
    print("|---:|---:|---:|---:|")
    for k in (int(x) for x in args.ks.split(",")):
        with torch.no_grad():
            ppl = math.exp(evaluate(model, batches, TrainConfig(), moe_k=k))
        ms = decode_ms_per_token(model, ids, k)
        print(f"| {k}{' (trained)' if k == trained_k else ''} | {ppl:.2f} | {ms:.2f} | {1e3 / ms:.0f} |")


if __name__ == "__main__":
    main()
