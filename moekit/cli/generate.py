"""``moekit generate``: stream text from a trained model."""

from __future__ import annotations

import argparse
import sys

from moekit.cli._offload import add_offload_arguments, maybe_offload
from moekit.cli.common import add_model_argument, load_model_and_tokenizer

HELP = "Generate text from a model folder, streamed to the terminal (--temperature 0 is greedy)."
DECODES = ("greedy", "sample", "scmoe")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    add_model_argument(p)
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument(
        "--image",
        default=None,
        help="an image (PNG/JPEG, or .npy) to ask a vision-language model about; it goes where the "
        "prompt says <image>, else before the prompt",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="sample from the smallest nucleus with mass >= p"
    )
    p.add_argument("--seed", type=int, default=0, help="makes sampling repeatable")
    p.add_argument(
        "--decode",
        choices=DECODES,
        default=None,
        help="greedy, sample, or scmoe (self-contrast of strong vs weak routing, greedy over the contrast "
        "scores); default: sample when --temperature > 0, else greedy",
    )
    p.add_argument("--scmoe-alpha", type=float, default=0.1, help="SCMoE plausibility threshold")
    p.add_argument("--scmoe-beta", type=float, default=0.5, help="SCMoE contrast strength")
    p.add_argument(
        "--scmoe-weak",
        default="rank:3",
        help="SCMoE weak routing: rank:K (only the K-th ranked expert, 1-based) or top:K",
    )
    p.add_argument("--k", type=int, default=None, help="experts per token at inference (dynamic k)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step now (default: auto, see moekit.models.generation; MOEKIT_COMPILE=0 disables)",
    )
    add_offload_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Loads the model and streams the continuation."""
    import torch

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise ValueError("--temperature must be >= 0 (0 is greedy)")
    model, tok, folder = load_model_and_tokenizer(args.model, args.dtype)
    from moekit.cli.common import eos_token_id
    from moekit.models.vision.llava import MoELLaVA

    vlm = isinstance(model, MoELLaVA)
    pixel_values = None
    if args.image is not None:
        if not vlm:
            raise ValueError(f"--image needs a vision-language model; {args.model} is a text-only model")
        from moekit.data.images import preprocess_images, read_image
        from moekit.models.vision.llava import image_preprocess, image_prompt_ids

        image = read_image(args.image)
        pixel_values = preprocess_images(image[None], image_preprocess(model.config, folder))
        pixel_values = pixel_values.to(next(model.parameters()).dtype)
        ids = image_prompt_ids(lambda text: tok.encode(text).ids, args.prompt, 1, model.config)
    else:
        ids = tok.encode(args.prompt).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens; pass a non-empty --prompt")
    eos = eos_token_id(tok, folder)
    context = (model.config.text if vlm else model.config).max_position_embeddings
    room = context - len(ids)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(ids)} tokens but the model has {context} positions; shorten the prompt"
        )
    if args.max_new_tokens > room:
        print(
            f"moekit generate: --max-new-tokens {args.max_new_tokens} exceeds the room left in the "
            f"model's {context}-position context; generating at most {room}",
            file=sys.stderr,
        )
        args.max_new_tokens = room
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

    from moekit.infer.decoding import SelfContrastSession
    from moekit.models.generation import Sampler, generate

    decode = args.decode or ("sample" if args.temperature > 0 else "greedy")
    if decode == "sample" and args.temperature <= 0:
        raise ValueError("--decode sample needs --temperature > 0")
    sampler = Sampler(
        temperature=args.temperature if decode == "sample" else 0.0,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed),
    )
    prompt_ids = torch.tensor([ids])
    if vlm:
        if decode == "scmoe" or args.expert_cache_bytes is not None:
            raise ValueError(
                "a vision-language model decodes greedy or sampled (no --decode scmoe, no offloading)"
            )
        try:
            model.generate(
                prompt_ids,
                pixel_values=pixel_values,
                max_new_tokens=args.max_new_tokens,
                sampler=sampler,
                eos_token_id=eos,
                moe_k=args.k,
                streamer=stream,
            )
        finally:
            sys.stdout.write("\n")
        return 0
    cache, tmp = maybe_offload(model, args)
    source = None
    if decode == "scmoe":
        source = SelfContrastSession(
            model,
            prompt_ids,
            max_new_tokens=args.max_new_tokens,
            alpha=args.scmoe_alpha,
            beta=args.scmoe_beta,
            weak=args.scmoe_weak,
            moe_k=args.k,
        )
    try:
        generate(
            model,
            prompt_ids,
            max_new_tokens=args.max_new_tokens,
            sampler=sampler,
            eos_token_id=eos,
            moe_k=args.k,
            streamer=stream,
            source=source,
            compile=True if args.compile else "auto",
        )
    finally:
        sys.stdout.write("\n")
        if cache is not None:
            print(f"offload: {cache.stats.as_dict()}", file=sys.stderr)
            cache.close()
        if tmp is not None:
            tmp.cleanup()
    return 0
