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
* **simulated decode** (``moekit.offload.simulate.replay``) of the same steps with the predictions
  the ``pregate`` predictor made on them, on a machine whose loads overlap compute for free (one
  copy engine, no interpreter in the way): the speed-up a GPU system with a copy stream would see.
  The profile is calibrated on the resident run (per-layer non-expert time, GEMV bandwidth).
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


def decode(model, prompt: torch.Tensor, stream: torch.Tensor, record=None) -> tuple[list[int], float]:
    """Teacher-forced token-by-token decode with a KV cache: (argmax per step, seconds of the steps).

    ``record``: a list that gets, per step, ``(used experts per layer, pregate prediction per layer)``."""
    with torch.no_grad():
        out = model(prompt[None], use_cache=True)
        past, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for token in stream.tolist():
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            if record is not None:
                record.append([info.expert_ids[-1].tolist() for info in out.routing])
        return tokens, time.perf_counter() - t0


def pregate_guesses(model, prompt: torch.Tensor, stream: torch.Tensor) -> list[list[list[int]]]:
    """Per decode step and MoE layer l, the experts of layer l+1 that the pregate predictor names."""
    guesses: list[list[list[int]]] = []
    inputs: list[torch.Tensor] = []

    def keep(module, args, out) -> None:
        inputs.append(out.moe_input)

    hooks = [layer.register_forward_hook(keep) for layer in model.moe_layers]
    with torch.no_grad():
        out = model(prompt[None], use_cache=True)
        past = out.past_key_values
        for token in stream.tolist():
            inputs.clear()
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            row = []
            for index in range(len(model.moe_layers) - 1):
                nxt = model.moe_layers[index + 1]
                ids = nxt.router(inputs[index].reshape(-1, model.config.dim)).expert_ids_TK[
                    -1, : nxt.config.top_k
                ]
                row.append(ids.tolist())
            guesses.append(row)
    for h in hooks:
        h.remove()
    return guesses


def simulated(
    model, steps, guesses, resident_s: float, bandwidth: float, budget: float
) -> tuple[float, float]:
    """Modelled tokens/s without prefetch and with the recorded pregate guesses."""
    from moekit.analysis import RoutingTrace
    from moekit.offload.simulate import HardwareProfile, replay

    mlp = model.moe_layers[0]
    expert_bytes = (
        mlp.experts.w_in[0].numel() + mlp.experts.w_out[0].numel()
    ) * mlp.experts.w_in.element_size()
    w = torch.randn(max(1, 64 * 2**20 // 4 // 1024), 1024)
    v = torch.randn(1024)
    torch.mv(w, v)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mv(w, v)
    mem_bw = w.numel() * 4 * 10 / (time.perf_counter() - t0)
    num_l = len(model.moe_layers)
    used = sum(len(layer) for step in steps for layer in step) / len(steps) / num_l
    non_expert_s = max(0.0, resident_s / len(steps) / num_l - used * expert_bytes / mem_bw)
    hw = HardwareProfile(storage_bw=bandwidth, mem_bw=mem_bw, non_expert_s=non_expert_s)
    trace = RoutingTrace.from_steps(steps, mlp.config.num_experts, "decode")
    total = expert_bytes * mlp.config.num_experts * num_l
    cache = int(budget * total)

    def predict(token: int, layer: int, experts: list[int]) -> list[int]:
        return guesses[token][layer] if layer < len(guesses[token]) else []

    plain = replay(trace, cache, expert_bytes, hw)
    fetched = replay(trace, cache, expert_bytes, hw, prefetch=predict)
    return plain.tokens_per_s, fetched.tokens_per_s


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
    sims: list[str] = []
    for folder in args.model:
        tokens = held_out_tokens(folder)
        n = args.seq_len
        starts = torch.linspace(0, len(tokens) - n - 1, args.windows).long()
        windows = torch.stack([tokens[s : s + n] for s in starts.tolist()])
        model = from_pretrained(folder).eval()
        recall = prediction_recall(model, windows)
        prompt, stream = tokens[: args.prompt], tokens[args.prompt : args.prompt + args.new]
        steps: list[list[list[int]]] = []
        want, resident_s = decode(model, prompt, stream, record=steps)
        print(
            f"| {folder} | {model.config.pregated} | {recall:.3f} | resident | {len(stream) / resident_s:.2f} "
            "| - | - | - |"
        )
        sim_plain, sim_pregate = simulated(
            model, steps, pregate_guesses(model, prompt, stream), resident_s, args.bandwidth, args.budget
        )
        sims.append(f"| {folder} | {sim_plain:.2f} | {sim_pregate:.2f} | {sim_pregate / sim_plain:.2f}x |")
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
    print("\nsimulated (trace replay of the same steps and guesses, loads overlapping compute for free)")
    print("| model | no prefetch tokens/s | pregate prefetch tokens/s | speed-up |")
    print("|---|---|---|---|")
    print("\n".join(sims))


if __name__ == "__main__":
    main()
