"""One MoE layer, side by side in one run: moekit vs dense FFN vs transformers vs the bandwidth bound.

Shape: dim 1024, expert FFN 2816, 8 experts, top-2, fp32 CPU (defaults; see --help).

    python benchmarks/bench_layer.py                 # full table (a few minutes on 2 cores)
    python benchmarks/bench_layer.py --quick         # small sizes, to check the script runs

Every row is timed in interleaved rounds (candidate A, B, C, A, B, C, ...) and reports the
median, so slow drifts of the machine hit all candidates alike. Ratios are time / moekit time
unless stated otherwise. "moekit auto" is the layer's default backend.

* dense: a SwiGLU FFN of width k*F, i.e. the same active FLOPs as the MoE layer.
* hf-eager / hf-grouped_mm: transformers' ``MixtralSparseMoeBlock`` with the same weights.
* GEMV bound (decode): one ``torch.mv`` over a matrix holding exactly the bytes of the experts
  the step touches, measured in the same run: the practical memory-bandwidth bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.layers import FeedForward, MoEConfig, MoELayer, dense_equivalent


def timed_rounds(candidates: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in interleaved rounds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def build(args):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=args.dim, ffn_dim=args.ffn, num_experts=args.experts, top_k=args.k, backend="auto")
    moe = MoELayer(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.02)
        moe.experts.w_in.normal_(std=0.02)
        moe.experts.w_out.normal_(std=0.02)
    moe_grouped = MoELayer(cfg.replace(backend="grouped_mm"))
    moe_grouped.load_state_dict(moe.state_dict())
    moe_sorted = MoELayer(cfg.replace(backend="sorted"))
    moe_sorted.load_state_dict(moe.state_dict())
    dense = FeedForward(dense_equivalent(cfg))
    hf = {}
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        for impl in ("eager", "grouped_mm"):
            hcfg = MixtralConfig(
                hidden_size=args.dim,
                intermediate_size=args.ffn,
                num_local_experts=args.experts,
                num_experts_per_tok=args.k,
            )
            hcfg._experts_implementation = impl
            block = MixtralSparseMoeBlock(hcfg)
            with torch.no_grad():
                block.gate.weight.copy_(moe.router.weight)
                block.experts.gate_up_proj.copy_(moe.experts.w_in)  # same [E, 2F, D] layout, gate first
                block.experts.down_proj.copy_(moe.experts.w_out)
            hf[impl] = block
    except ImportError:
        print("transformers not installed: skipping the transformers columns")
    return cfg, moe, moe_sorted, moe_grouped, dense, hf


def check_same_outputs(moe, moe_grouped, hf, dim):
    x = torch.randn(1, 64, dim)
    ref = moe(x).hidden
    torch.testing.assert_close(moe_grouped(x).hidden, ref, rtol=1e-4, atol=1e-5)
    for block in hf.values():
        torch.testing.assert_close(block(x), ref, rtol=1e-4, atol=1e-5)


def gemv_bound_fn(cfg, moe, x_TD):
    """A GEMV over exactly the bytes of the experts this input touches."""
    with torch.no_grad():
        ids = moe(x_TD).routing.expert_ids
    touched = torch.unique(ids[ids >= 0]).numel()
    rows = touched * 3 * cfg.ffn_dim  # gate, up and down: 3*F*D floats per expert
    w = torch.randn(rows, cfg.dim)
    v = torch.randn(cfg.dim)
    return (lambda: torch.mv(w, v)), touched, rows * cfg.dim * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--decode", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--decode-rounds", type=int, default=50)
    p.add_argument(
        "--train-rounds", type=int, default=9, help="rounds of the forward+backward row (the noisiest)"
    )
    p.add_argument("--train-only", action="store_true", help="only the forward+backward row")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one moekit step")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="small shapes to smoke-test the script")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="moekit.train.cpu_memory.keep_freed_memory() first (process-wide: every candidate gets it)",
    )
    args = p.parse_args()
    if args.keep_freed_memory:
        from moekit.train.cpu_memory import keep_freed_memory

        print(f"# keep_freed_memory: {keep_freed_memory()}")
    if args.quick:
        args.dim, args.ffn, args.prefill, args.rounds, args.decode_rounds = 128, 256, 128, 2, 3
        args.train_rounds = 2
    torch.set_num_threads(args.threads)
    cfg, moe, moe_sorted, moe_grouped, dense, hf = build(args)
    check_same_outputs(moe, moe_grouped, hf, args.dim)
    check_same_outputs(moe, moe_sorted, {}, args.dim)
    print(
        f"# one MoE layer: D={args.dim} F={args.ffn} E={args.experts} k={args.k}, fp32, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    print(
        "| case | moekit auto (ms) | moekit sorted / auto | moekit grouped_mm / auto | dense same FLOPs / moekit "
        "| hf eager / moekit | hf grouped_mm / moekit | GEMV bound (ms) | moekit / bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    def row(name, res, bound=None):
        base = res["moekit"]
        cells = [
            f"{base * 1e3:.2f}",
            f"{res['sorted'] / base:.2f}",
            f"{res['grouped'] / base:.2f}",
            f"{res['dense'] / base:.2f}" if "dense" in res else "-",
            f"{res['hf-eager'] / base:.2f}" if "hf-eager" in res else "-",
            f"{res['hf-grouped_mm'] / base:.2f}" if "hf-grouped_mm" in res else "-",
            f"{res['bound'] * 1e3:.2f}" if "bound" in res else "-",
            f"{base / res['bound']:.2f}" if "bound" in res else "-",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

    if not args.train_only:
        forward_rows(args, cfg, moe, moe_sorted, moe_grouped, dense, hf, row)
    train_row(args, moe, moe_sorted, moe_grouped, dense, hf, row)


def forward_rows(args, cfg, moe, moe_sorted, moe_grouped, dense, hf, row) -> None:
    """The forward rows: prefill at T=--prefill, then each decode size."""
    with torch.inference_mode():
        x = torch.randn(1, args.prefill, args.dim)
        cands = {
            "moekit": lambda: moe(x),
            "sorted": lambda: moe_sorted(x),
            "grouped": lambda: moe_grouped(x),
            "dense": lambda: dense(x),
        }
        cands.update({f"hf-{k}": (lambda b=b: b(x)) for k, b in hf.items()})
        row(f"forward T={args.prefill}", timed_rounds(cands, args.rounds))
        for t in args.decode:
            xd = torch.randn(1, t, args.dim)
            bound, touched, nbytes = gemv_bound_fn(cfg, moe, xd.view(t, -1))
            cands = {
                "moekit": lambda xd=xd: moe(xd),
                "sorted": lambda xd=xd: moe_sorted(xd),
                "grouped": lambda xd=xd: moe_grouped(xd),
                "dense": lambda xd=xd: dense(xd),
                "bound": bound,
            }
            cands.update({f"hf-{k}": (lambda b=b, xd=xd: b(xd)) for k, b in hf.items()})
            row(
                f"decode T={t} ({touched} experts, {nbytes / 1e6:.0f} MB)",
                timed_rounds(cands, args.decode_rounds, 5),
            )


def train_row(args, moe, moe_sorted, moe_grouped, dense, hf, row) -> None:
    """Forward + backward at prefill size. Parameter gradients accumulate across calls (the
    benchmark never zeroes them), for every candidate alike."""
    x = torch.randn(1, args.prefill, args.dim, requires_grad=True)
    g = torch.randn(1, args.prefill, args.dim)

    def fb(fn):
        def run():
            out = fn(x)
            out.backward(g)
            x.grad = None

        return run

    cands = {
        "moekit": fb(lambda x: moe(x).hidden),
        "sorted": fb(lambda x: moe_sorted(x).hidden),
        "grouped": fb(lambda x: moe_grouped(x).hidden),
        "dense": fb(dense),
    }
    for k, b in hf.items():
        try:
            fb(b)()
            cands[f"hf-{k}"] = fb(b)
        except Exception as e:  # a backend without a CPU backward is reported, not fatal
            print(f"(hf {k} backward unavailable: {type(e).__name__})")
    res = timed_rounds(cands, args.train_rounds, warmup=1)
    for m in (moe, moe_sorted, moe_grouped, dense, *hf.values()):
        m.zero_grad(set_to_none=True)
    row(f"forward+backward T={args.prefill}", res)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            cands["moekit"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        moe.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
