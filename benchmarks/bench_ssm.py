"""The Mamba mixer's scans on CPU: the sequential loop, the chunked scan, and transformers' Jamba slow path.

Usage (under a minute; 2 shared cores)::

    .venv/bin/python benchmarks/bench_ssm.py --dim 64 --lengths 1024 4096    # I = 128, N = 16
    .venv/bin/python benchmarks/bench_ssm.py --dim 256 --lengths 1024       # I = 512
    .venv/bin/python benchmarks/bench_ssm.py --chunk-sizes 8 16 32

For each sequence length S it times (CPU time of one thread, best of ``--repeats``) one forward of the whole mixer (projections, conv, scan,
gate) with every scan on the same weights, checks that they agree, and prints one JSON line with
milliseconds and the ratios side by side. transformers' ``JambaMambaMixer`` (no CUDA kernels here,
so its pure-PyTorch loop over time) gets the same weights. Results are appended to
``benchmarks/results/ssm.jsonl`` and read in docs/ssm.md.
"""

# ruff: noqa: B023  (the timed lambdas run inside the loop that defines them)
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moekit.blocks import MambaConfig, MambaMixer, scan_chunked, scan_sequential

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ssm.jsonl"


def _time_interleaved(fns: dict, repeats: int) -> dict:
    """Best-of-``repeats`` CPU milliseconds (this process's CPU time, not wall time) of each
    function, run in turn. On a shared machine wall time mostly measures the other tenants; with
    one thread, CPU time is the work itself."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            best[name] = min(best[name], (time.process_time() - start) * 1e3)
    return best


def _hf_mixer(cfg: MambaConfig, ours: MambaMixer):
    try:
        from transformers import JambaConfig
        from transformers.models.jamba.modeling_jamba import JambaMambaMixer
    except ImportError:
        return None
    hf_cfg = JambaConfig(
        hidden_size=cfg.dim,
        mamba_d_state=cfg.state_dim,
        mamba_d_conv=cfg.conv_kernel,
        mamba_expand=cfg.expand,
        mamba_dt_rank=cfg.time_step_rank,
        use_mamba_kernels=False,
    )
    hf = JambaMambaMixer(hf_cfg, layer_idx=0)
    hf.load_state_dict(ours.state_dict())
    return hf.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--state-dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(dim=args.dim, state_dim=args.state_dim, dt_bc_norm=True)
    mixer = MambaMixer(cfg, 0).eval()
    hf = _hf_mixer(cfg, mixer)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.dim) * 0.5
        row: dict = {
            "dim": args.dim,
            "inner": cfg.inner_dim,
            "state": cfg.state_dim,
            "batch": args.batch,
            "S": length,
        }
        with torch.no_grad():
            ref = mixer(x, scan="sequential")
            fns = {"sequential": lambda: mixer(x, scan="sequential")}
            for chunk in args.chunk_sizes:
                chunked = MambaMixer(cfg.replace(chunk_size=chunk), 0).eval()
                chunked.load_state_dict(mixer.state_dict())
                row[f"chunked{chunk}_max_diff"] = float((chunked(x, scan="chunked") - ref).abs().max())
                fns[f"chunked{chunk}"] = lambda m=chunked: m(x, scan="chunked")
            if hf is not None:
                row["hf_max_diff"] = float((hf(x) - ref).abs().max())
                fns["hf_slow"] = lambda: hf(x)
            best = _time_interleaved(fns, args.repeats)
            # The scan alone, on inputs of the same shapes (time steps around Mamba's init range).
            g = torch.Generator().manual_seed(length)
            xs = torch.randn(args.batch, length, cfg.inner_dim, generator=g)
            dt = torch.nn.functional.softplus(torch.randn(xs.shape, generator=g) - 3.5)
            bc = torch.randn(2, args.batch, length, cfg.state_dim, generator=g)
            A = -torch.exp(mixer.A_log)
            scans = {
                "scan_sequential": lambda: scan_sequential(xs, dt, A, bc[0], bc[1]),
                "scan_chunked": lambda: scan_chunked(xs, dt, A, bc[0], bc[1], chunk_size=cfg.chunk_size),
            }
            best |= _time_interleaved(scans, args.repeats)
        row |= {f"{name}_ms": ms for name, ms in best.items()}
        row["scan_sequential_over_chunked"] = best["scan_sequential"] / best["scan_chunked"]
        fastest = min(best[f"chunked{c}"] for c in args.chunk_sizes)
        row["sequential_over_chunked"] = best["sequential"] / fastest
        if hf is not None:
            row["hf_over_chunked"] = best["hf_slow"] / fastest
        line = json.dumps(
            {
                k: (float(f"{v:.3g}") if "diff" in k else round(v, 2)) if isinstance(v, float) else v
                for k, v in row.items()
            }
        )
        print(line, flush=True)
        with RESULTS.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
