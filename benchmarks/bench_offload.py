"""Expert offloading on a Mixtral-shaped model whose experts do not fit the cache budget.

    python benchmarks/bench_offload.py                    # ~415 MB of experts, store at 2 GB/s
    python benchmarks/bench_offload.py --quick            # small smoke test

Each configuration decodes the same token stream after the same prompt, token by token with a
KV cache (teacher forcing, so routing stays varied on random weights), checks that every step's
argmax equals the resident model's, and reports decode tokens/s, hit rate, prefetch accuracy and
stall time.
The store is throttled to ``--bandwidth`` bytes/s: reading at page-cache speed would hide the
cost of a miss. Beside each measured row the trace-replay simulator's prediction is printed
(hardware profile calibrated once, from the resident run and a GEMV measured in the same run),
and each policy's hit rate is set beside Belady's optimum on the same decode trace.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from moekit.analysis import RoutingTrace
from moekit.layers import MoEConfig
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.offload import offload_model
from moekit.offload.simulate import (
    HardwareProfile,
    belady_hit_rate,
    oracle_prefetcher,
    replay,
    transition_prefetcher,
)


def build(args) -> MoEForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
        ffn_dim=2 * args.ffn,
        moe=MoEConfig(dim=args.dim, ffn_dim=args.ffn, num_experts=8, top_k=2),
    )
    return MoEForCausalLM(cfg).eval()


def decode(model, prompt, stream):
    """Token-by-token decode with a KV cache over a fixed token stream (teacher forcing).

    Greedy generation on random weights soon repeats one token, and then routing repeats and any
    cache looks perfect; feeding varied tokens keeps routing realistic. Returns the argmax at
    every step (to check offloaded == resident), seconds for the decode steps, routing per step.
    """
    routing: list[list[list[int]]] = []
    hooks = []
    for index, layer in enumerate(model.moe_layers):

        def hook(m, a, out, index=index):
            if routing and len(routing[-1]) <= index:
                routing[-1].append(out.routing.expert_ids[-1].tolist())

        hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past = out.past_key_values
        tokens = [int(out.logits[:, -1].argmax(-1))]
        t0 = time.perf_counter()
        for token in stream.tolist():
            routing.append([])
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[:, -1].argmax(-1)))
        seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    return tokens, seconds, routing


def trace_of(routing, num_experts) -> RoutingTrace:
    return RoutingTrace.from_steps(routing, num_experts, "decode")


def gemv_bandwidth(nbytes: int) -> float:
    w = torch.randn(nbytes // 4 // 1024, 1024)
    v = torch.randn(1024)
    for _ in range(3):
        torch.mv(w, v)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mv(w, v)
    return nbytes * 10 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--bandwidth", type=float, default=2e9, help="store bytes/s")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for compute (default 1: the loader thread needs a core of its own, as it would in a real deployment)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.dim, args.ffn, args.layers, args.vocab, args.new = 64, 128, 3, 500, 12
    model = build(args)
    expert_bytes = 3 * args.dim * args.ffn * 4
    total_expert_bytes = expert_bytes * 8 * args.layers
    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    stream = torch.randint(0, args.vocab, (args.new - 1,))
    want, resident_s, routing = decode(model, prompt, stream)
    num_steps = args.new - 1
    resident_tps = num_steps / resident_s
    trace = trace_of(routing, 8)
    mem_bw = gemv_bandwidth(min(total_expert_bytes, 256 * 2**20))
    expert_s = expert_bytes / mem_bw
    used_per_layer = sum(len(s[0]) for s in routing) / len(routing)
    non_expert_s = max(0.0, resident_s / num_steps / args.layers - used_per_layer * expert_s)
    hw = HardwareProfile(storage_bw=args.bandwidth, mem_bw=mem_bw, non_expert_s=non_expert_s)
    print(
        f"# offloading: {args.layers} MoE layers x 8 experts x {expert_bytes / 1e6:.1f} MB = "
        f"{total_expert_bytes / 1e6:.0f} MB of experts; store throttled to {args.bandwidth / 1e9:.1f} GB/s; "
        f"GEMV bandwidth {mem_bw / 1e9:.1f} GB/s; {num_steps} decode steps; {torch.get_num_threads()} compute thread(s)"
    )
    print(f"resident: {resident_tps:.2f} tokens/s")
    print(
        "| budget | policy | prefetch | tokens/s | simulated tokens/s | sim error | hit rate | Belady hit rate "
        "| prefetch accuracy | stall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for share in (0.25, 0.5):
        budget = int(share * total_expert_bytes)
        opt = belady_hit_rate(trace, budget // expert_bytes)
        for policy in ("lru", "lfu"):
            for prefetch in (None, "pregate", "stats"):
                m = build(args)
                with tempfile.TemporaryDirectory() as store:
                    cache = offload_model(
                        m,
                        store,
                        budget,
                        policy=policy,
                        prefetch=prefetch,
                        bandwidth=args.bandwidth,
                        trace=trace,
                    )
                    log = _record_predictions(m)
                    got, seconds, _ = decode(m, prompt, stream)
                    cache.close()
                if got != want:
                    raise SystemExit(f"offloaded tokens differ from resident ({policy}, {prefetch})")
                tps = num_steps / seconds
                predictor = transition_prefetcher(trace) if prefetch == "stats" else None
                if prefetch == "pregate":
                    predictor = _replay_predictions(log)
                sim = replay(trace, budget, expert_bytes, hw, policy=policy, prefetch=predictor)
                s = cache.stats
                print(
                    f"| {share:.0%} | {policy} | {prefetch or 'none'} | {tps:.2f} | {sim.tokens_per_s:.2f} | "
                    f"{(sim.tokens_per_s - tps) / tps:+.0%} | {s.hit_rate:.3f} | {opt:.3f} | "
                    f"{s.prefetch_accuracy:.2f} | {s.stall_s:.2f} |",
                    flush=True,
                )
    print("\nsimulated ceiling: a perfect predictor (oracle prefetch) on the same trace and hardware")
    print("| budget | policy | on-demand (sim) | oracle prefetch (sim) | ceiling speed-up |")
    print("|---|---|---|---|---|")
    for share in (0.25, 0.5):
        budget = int(share * total_expert_bytes)
        for policy in ("lru", "lfu"):
            base = replay(trace, budget, expert_bytes, hw, policy=policy).tokens_per_s
            best = replay(trace, budget, expert_bytes, hw, policy=policy, prefetch=oracle_prefetcher(trace))
            print(
                f"| {share:.0%} | {policy} | {base:.2f} | {best.tokens_per_s:.2f} | "
                f"{best.tokens_per_s / base:.2f}x |"
            )


def _record_predictions(model) -> list[dict[int, list[int]]]:
    """Logs what the live predictor asked for, per forward and layer, so the replay can reuse it
    (pre-gating needs hidden states, which a trace does not hold)."""
    log: list[dict[int, list[int]]] = []
    for layer in model.moe_layers:
        experts = layer.experts
        if experts.predictor is None:
            continue
        inner = experts.predictor

        def wrapped(index, x, ids, inner=inner):
            if index == 0:
                log.append({})
            out = inner(index, x, ids)
            log[-1][index] = list(out)
            return out

        experts.predictor = wrapped
    return log


def _replay_predictions(log):
    def predict(token: int, layer: int, experts: list[int]) -> list[int]:
        step = token + 1  # log[0] is the prompt's forward
        return log[step].get(layer, []) if step < len(log) else []

    return predict


if __name__ == "__main__":
    main()
