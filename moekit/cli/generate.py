"""``moekit generate``: stream text from a trained model."""

from __future__ import annotations

import argparse
import sys

from moekit.cli.common import add_model_argument, load_model_and_tokenizer

HELP = "Generate text from a model folder, streamed to the terminal (--temperature 0 is greedy)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    add_model_argument(p)
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="sample from the smallest nucleus with mass >= p"
    )
    p.add_argument("--seed", type=int, default=0, help="makes sampling repeatable")


def run(args: argparse.Namespace) -> int:
    """Loads the model and streams the continuation."""
    import torch

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise ValueError("--temperature must be >= 0 (0 is greedy)")
    model, tok, _ = load_model_and_tokenizer(args.model, args.dtype)
    from moekit.train.tokenizer import special_token_id

    ids = tok.encode(args.prompt).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens; pass a non-empty --prompt")
    eos = special_token_id(tok)
    generated: list[int] = []
    printed = ""
    sys.stdout.write(args.prompt)

    def stream(new_B):
        nonlocal printed
        token = int(new_B[0])
        if token == eos:
            return
        generated.append(token)
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text

    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        model.generate(
            torch.tensor([ids]),
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=max(args.temperature, 1e-6),
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=eos,
            generator=gen,
            streamer=stream,
        )
    sys.stdout.write("\n")
    return 0
