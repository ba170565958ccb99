"""``moekit serve``: an OpenAI-compatible HTTP server (``/v1/completions``, ``/v1/chat/completions``)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from moekit.cli._offload import add_offload_arguments, maybe_offload
from moekit.cli.common import add_model_argument, load_model_and_tokenizer

HELP = "Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming), on 127.0.0.1 by default."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    add_model_argument(p, required=False)
    p.add_argument(
        "--mixture",
        metavar="CONFIG",
        help="serve a mixture of models (`moekit mixture profile`) instead of --model; requests pick "
        "experts by the X-Latency-Class header",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0-65535; 0 picks a free one)")
    p.add_argument(
        "--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for"
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="prompt + max_tokens bound (default: the model's positions)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("MOEKIT_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOEKIT_API_KEY; none if unset)",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=2 * 2**20, help="larger request bodies get 413 (default 2 MiB)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait behind the running ones; more get 429 with Retry-After",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="continuous batching: requests decoded together at most, joining and leaving at token "
        "boundaries (1: one at a time; --compile also serves one at a time)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        metavar="N",
        help="chunked prefill: a prompt joining the running batch is prefilled at most N tokens per "
        "decode step, so running requests keep streaming while a long prompt is read (default: "
        "each prompt in one go; e.g. 64)",
    )
    p.add_argument("--model-name", default=None, help="model id clients send (default: the folder name)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (faster tokens; the first request compiles)",
    )
    add_offload_arguments(p)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def run(args: argparse.Namespace) -> int:
    """Loads the model (offloaded if asked) and serves until interrupted."""
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0 to 65535)")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be a positive number of tokens, got {args.prefill_chunk}")
    if not is_loopback(args.host) and not args.api_key:
        bar = "!" * 78
        print(
            f"{bar}\nmoekit serve: WARNING: binding {args.host} exposes the model to the network WITHOUT an "
            "API key.\nAnyone who can reach this port can use it. Set --api-key or MOEKIT_API_KEY.\n"
            f"{bar}",
            file=sys.stderr,
        )

    from moekit.infer.server import ServerConfig, chat_template_of, create_app

    if args.mixture:
        return _serve_mixture(args)
    if not args.model:
        raise ValueError("pass --model DIR (or --mixture CONFIG)")
    model, tok, folder = load_model_and_tokenizer(args.model, args.dtype)
    cache, tmp = maybe_offload(model, args)
    # runs/NAME/checkpoints/last serves as "NAME"; any other folder under its own name.
    name = folder.parent.parent.name if folder.name == "last" else folder.name
    config = ServerConfig(
        model_name=args.model_name or name,
        max_tokens_limit=args.max_tokens_limit,
        max_context=args.max_context,
        chat_template=chat_template_of(folder),
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
        api_key=args.api_key,
        compile=args.compile,
        max_batch=args.max_batch,
        prefill_chunk=args.prefill_chunk,
    )

    def report() -> None:
        if cache is not None:
            print(f"moekit serve: offload counters {cache.stats.as_dict()}", file=sys.stderr)

    from moekit.cli.common import eos_token_id
    from moekit.models.vision.llava import MoELLaVA, image_preprocess

    prep = image_preprocess(model.config, folder) if isinstance(model, MoELLaVA) else None
    app = create_app(
        model, tok, config, eos_token_id=eos_token_id(tok, folder), on_shutdown=report, image_preprocess=prep
    )
    print(
        f"moekit serve: model {config.model_name!r} from {folder} on http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        if cache is not None:
            cache.close()
        if tmp is not None:
            tmp.cleanup()
    return 0


def _serve_mixture(args: argparse.Namespace) -> int:
    """``--mixture CONFIG``: the same server over :class:`moekit.mixture.serve.MixtureEngine`."""
    import uvicorn

    from moekit.cli._mixture_serve import build_mixture_app

    app, name = build_mixture_app(args)
    print(
        f"moekit serve: mixture {name!r} from {args.mixture} on http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
