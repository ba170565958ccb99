"""``moekit serve --mixture CONFIG``: builds the app over a :class:`~moekit.mixture.serve.MixtureEngine`.

Kept apart from ``serve.py`` so the single-model server stays as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_mixture_app(args: argparse.Namespace):
    """``(app, model name)`` for ``args.mixture`` with ``moekit serve``'s limits."""
    from moekit.infer.server import ServerConfig, create_app
    from moekit.mixture import Mixture
    from moekit.mixture.serve import MixtureEngine

    if args.model:
        raise ValueError("pass either --model or --mixture, not both")
    mixture = Mixture.load(args.mixture, dtype=args.dtype)
    name = args.model_name or Path(args.mixture).stem
    config = ServerConfig(
        model_name=name,
        max_tokens_limit=args.max_tokens_limit,
        max_context=args.max_context,
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
        api_key=args.api_key,
    )
    engine = MixtureEngine(
        mixture,
        max_context=config.max_context,
        max_tokens_limit=config.max_tokens_limit,
        max_queue=config.max_queue,
    )
    first = mixture.models[mixture.config.names[0]]
    return create_app(
        first, mixture.tokenizer, config, eos_token_id=mixture.eos_token_id, engine=engine
    ), name
