"""SE-MoE ring memory beside the per-expert cache, on one model, one throttled store.

    python benchmarks/bench_ring.py                 # 6 MoE layers x 8 experts, ~104 MB of experts
    python benchmarks/bench_ring.py --quick         # smoke test
    python benchmarks/bench_ring.py --simulate      # simulator only: tokens/s against S and copy/compute

Every configuration decodes the same teacher-forced token stream (batch ``--batch``) with a KV
cache and must give the resident model's argmax at every step. Rows:

* ``ring S``: ``--ring-sections S`` (S whole-layer sections; the next S-1 layers load while one
  computes), with the simulator's ``ring_timeline`` prediction beside it (compute per layer
  calibrated from the resident run);
* ``cache``: the per-expert LRU cache with the same expert memory as S ring sections, with and
  without ``pregate`` prefetch.

Reported: decode tokens/s (tokens = steps x batch), bytes read per token, stall seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from bench_offload import build  # the same random Mixtral-shaped model

from moekit.offload import offload_model, ring_offload_model
from moekit.offload.simulate import ring_sections, ring_timeline


def decode(model, prompt: torch.Tensor, stream: torch.Tensor, runner=None) -> tuple[list[list[int]], float]:
    """Teacher-forced decode of ``stream`` ``[B, N]`` after ``prompt`` ``[B, P]``: argmax per step and
    seconds of the steps; ``runner``'s byte and stall counters restart after the prefill."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        if runner is not None:  # count the steps only (loads the prefill started count as steps')
            runner.stats.bytes_read, runner.stats.stall_s = 0, 0.0
        past, tokens = out.past_key_values, [out.logits[:, -1].argmax(-1).tolist()]
        t0 = time.perf_counter()
        for step in range(stream.shape[1]):
            out = model(stream[:, step : step + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(out.logits[:, -1].argmax(-1).tolist())
        return tokens, time.perf_counter() - t0


def simulate_sweep(num_layers: int = 8, num_tokens: int = 64) -> None:
    """Modelled tokens/s of the ring against S for copy/compute ratios, with SE-MoE's rule for K."""
    sections = [1, 2, 3, 4, 6, num_layers]
    print(f"# ring_timeline: {num_layers} MoE layers, compute 1 ms per layer, {num_tokens} tokens, one link")
    print("| copy / compute | " + " | ".join(f"S={s}" for s in sections) + " | rule K |")
    print("|---|" + "---|" * (len(sections) + 1))
    for ratio in (0.25, 0.5, 1.0, 2.0, 4.0):
        row = []
        for s in sections:
            res = ring_timeline(
                num_tokens, [1000] * num_layers, [1e-3] * num_layers, 1000 / (ratio * 1e-3), s
            )
            row.append(f"{res.tokens_per_s:.1f}")
        rule = ring_sections(ratio * 1e-3, 1e-3, 1, num_layers)
        print(f"| {ratio:g} | " + " | ".join(row) + f" | {rule} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=24)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bandwidth", type=float, default=1e9, help="store bytes/s")
    p.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3, 6])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--simulate", action="store_true", help="only the simulator sweep (no model)")
    args = p.parse_args()
    if args.simulate:
        simulate_sweep()
        return
    torch.set_num_threads(1)  # the copy thread needs the other core, as it would have its own stream
    if args.quick:
        args.dim, args.ffn, args.layers, args.vocab, args.new, args.sections = 64, 128, 3, 500, 6, [1, 2, 3]
    model = build(args)
    expert_bytes = 3 * args.dim * args.ffn * 4
    layer_bytes = 8 * expert_bytes
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=gen)
    stream = torch.randint(0, args.vocab, (args.batch, args.new), generator=gen)
    want, resident_s = decode(model, prompt, stream)
    tokens = args.new * args.batch
    compute_s = resident_s / args.new / args.layers  # one MoE layer's share of a resident step
    load_s = layer_bytes / args.bandwidth
    print(
        f"# {args.layers} MoE layers x 8 experts x {expert_bytes / 1e6:.2f} MB (a layer {layer_bytes / 1e6:.1f} MB); "
        f"store {args.bandwidth / 1e9:.2f} GB/s (a layer loads in {load_s * 1e3:.1f} ms); batch {args.batch}; "
        f"{args.new} decode steps; resident {tokens / resident_s:.2f} tokens/s ({compute_s * 1e3:.2f} ms per layer)"
    )
    rule = ring_sections(load_s, compute_s, layer_bytes, args.layers * layer_bytes)
    print(f"# SE-MoE's rule (smallest K with copy <= (K-1) x compute, budget = all layers): K = {rule}")
    print("| mode | expert memory | tokens/s | simulated tokens/s | MB read per token | stall s |")
    print("|---|---|---|---|---|---|")
    for sections in args.sections:
        budget = min(sections, args.layers) * layer_bytes
        rows = [("ring", None), ("cache", None), ("cache", "pregate")]
        for mode, prefetch in rows:
            if mode == "cache" and sections >= args.layers:
                continue  # everything fits: the cache only takes cold misses, as the ring does
            m = build(args)
            with tempfile.TemporaryDirectory() as store:
                if mode == "ring":
                    runner = ring_offload_model(m, store, sections, bandwidth=args.bandwidth)
                else:
                    runner = offload_model(m, store, budget, prefetch=prefetch, bandwidth=args.bandwidth)
                got, seconds = decode(m, prompt, stream, runner)
                runner.close()
            if got != want:
                raise SystemExit(f"{mode} S={sections}: offloaded tokens differ from resident")
            s = runner.stats
            sim = "-"
            if mode == "ring":
                # prefill + steps through the ring; the steps' time is the timeline after the prefill's
                steps = ring_timeline(
                    args.new + 1,
                    [layer_bytes] * args.layers,
                    [compute_s] * args.layers,
                    args.bandwidth,
                    sections,
                )
                first = ring_timeline(
                    1, [layer_bytes] * args.layers, [compute_s] * args.layers, args.bandwidth, sections
                )
                sim = f"{tokens / (steps.seconds - first.seconds):.2f}"
            name = f"ring S={sections}" if mode == "ring" else f"cache lru{' + pregate' if prefetch else ''}"
            print(
                f"| {name} | {budget / 1e6:.0f} MB | {tokens / seconds:.2f} | {sim} | "
                f"{s.bytes_read / tokens / 1e6:.2f} | {s.stall_s:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
