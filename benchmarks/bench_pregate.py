"""Pre-gated MoE on models trained here: next-layer prediction accuracy and offloaded decode speed.

    python benchmarks/bench_pregate.py --model ORIGINAL_TUNED --model PREGATED_TUNED [--bandwidth 2e8]

For each model folder (any folder ``moekit.from_pretrained`` opens):

* **prediction recall**: on held-out windows of the run's validation split, the share of layer
  l+1's routed experts that the ``pregate`` predictor (layer l+1's router applied to layer l's
  MoE input, top-k) names. For a model with ``ModelConfig.pregated`` that is its routing itself
  (1.0 by construction, checked here); for an ordinary model it is today's training-free guess.
* **offloaded decode**: a held-out token stream decoded one token at a time with a KV cache
  (teacher forcing), experts offloaded to a store throttled to ``--bandwidth`` with a cache of
  ``--budget`` of the expert bytes, prefetch ``none`` vs ``pregate``: tokens/s, hit rate,
  prefetch accuracy and stall seconds; every step's argmax is checked against the resident model.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def held_out_tokens(folder) -> torch.Tensor:
    from moekit.cli.common import evaluation_tokens
    from moekit.loader import inspect_folder, load_tokenizer

    model_dir = inspect_folder(folder).model_dir
    return torch.as_tensor(evaluation_tokens(load_tokenizer(model_dir), model_dir, None))


def prediction_recall(model, windows: torch.Tensor) -> float:
    """Share of layer l+1's routed (token, expert) pairs named by top-k of its router on layer l's input."""
    inputs, routed = [], []

    def keep(module, args, out) -> None:
        inputs.append(out.moe_input)
        routed.append(out)

    hooks = [layer.register_forward_hook(keep) for layer in model.moe_layers]
    hit = total = 0
    with torch.no_grad():
        for row in windows:
            inputs.clear()
            routed.clear()
            model(row[None])
            for index in range(len(model.moe_layers) - 1):
                nxt = model.moe_layers[index + 1]
                x_TD = inputs[index].reshape(-1, model.config.dim)
                pred_TK = nxt.router(x_TD).expert_ids_TK[:, : nxt.config.top_k]
                used_TK = routed[index + 1].routing.expert_ids
                hit += int(
                    (pred_TK[:, :, None] == used_TK[:, None, :]).any(1).logical_and(used_TK >= 0).sum()
                )
                total += int((used_TK >= 0).sum())
    for h in hooks:
        h.remove()
    return hit / max(1, total)


def decode(model, prompt: torch.Tensor, stream: torch.Tensor) -> tuple[list[int], float]:
    """Teacher-forced token-by-token decode with a KV cache: (argmax per step, seconds of the steps)."""
    with torch.no_grad():
        out = model(prompt[None], use_cache=True)
        past, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for token in stream.tolist():
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens, time.perf_counter() - t0


def main() -> None:
    from moekit.loader import from_pretrained
    from moekit.offload import offload_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="model folder (repeat)")
    p.add_argument("--windows", type=int, default=16, help="held-out windows for the recall")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64, help="decode steps")
    p.add_argument("--budget", type=float, default=0.5, help="cache share of all expert bytes")
    p.add_argument("--bandwidth", type=float, default=2e8, help="store bytes/s")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        f"# {args.windows} held-out windows of {args.seq_len} tokens; decode {args.new} steps after a "
        f"{args.prompt}-token prompt; cache {args.budget:.0%} of expert bytes; store {args.bandwidth / 1e6:.0f} MB/s"
    )
    print(
        "| model | pregated | next-layer recall | prefetch | tokens/s | hit rate | prefetch accuracy | stall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for folder in args.model:
        tokens = held_out_tokens(folder)
        n = args.seq_len
        starts = torch.linspace(0, len(tokens) - n - 1, args.windows).long()
        windows = torch.stack([tokens[s : s + n] for s in starts.tolist()])
        model = from_pretrained(folder).eval()
        recall = prediction_recall(model, windows)
        prompt, stream = tokens[: args.prompt], tokens[args.prompt : args.prompt + args.new]
        want, resident_s = decode(model, prompt, stream)
        print(
            f"| {folder} | {model.config.pregated} | {recall:.3f} | resident | {len(stream) / resident_s:.2f} "
            "| - | - | - |"
        )
        total = sum(
            p.numel() * p.element_size() for mlp in model.moe_layers for p in mlp.experts.parameters()
        )
        for prefetch in (None, "pregate"):
            m = from_pretrained(folder).eval()
            with tempfile.TemporaryDirectory() as store:
                cache = offload_model(
                    m, store, int(args.budget * total), prefetch=prefetch, bandwidth=args.bandwidth
                )
                got, seconds = decode(m, prompt, stream)
                cache.close()
            if got != want:
                raise SystemExit(f"{folder}: offloaded tokens differ from resident ({prefetch})")
            s = cache.stats
            print(
                f"| {folder} | {model.config.pregated} | {recall:.3f} | {prefetch or 'none'} | "
                f"{len(stream) / seconds:.2f} | {s.hit_rate:.3f} | {s.prefetch_accuracy:.3f} | {s.stall_s:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
