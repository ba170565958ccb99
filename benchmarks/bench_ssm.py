"""The Mamba mixer's scans on CPU: the sequential loop, the chunked scan, and transformers' Jamba slow path.

Usage (under a minute; 2 shared cores)::

    .venv/bin/python benchmarks/bench_ssm.py                 # dim 256 (I = 512, N = 16), S in 256 1024 4096
    .venv/bin/python benchmarks/bench_ssm.py --lengths 512 --chunk-sizes 8 16 32

For each sequence length S it times one forward of the whole mixer (projections, conv, scan,
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

from moekit.blocks import MambaConfig, MambaMixer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ssm.jsonl"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


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
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
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
            row["sequential_ms"] = _time(lambda: mixer(x, scan="sequential"), args.repeats)
            for chunk in args.chunk_sizes:
                mixer.config = cfg.replace(chunk_size=chunk)
                out = mixer(x, scan="chunked")
                row[f"chunked{chunk}_max_diff"] = float((out - ref).abs().max())
                row[f"chunked{chunk}_ms"] = _time(lambda: mixer(x, scan="chunked"), args.repeats)
                row[f"sequential_over_chunked{chunk}"] = row["sequential_ms"] / row[f"chunked{chunk}_ms"]
            mixer.config = cfg
            if hf is not None:
                row["hf_max_diff"] = float((hf(x) - ref).abs().max())
                row["hf_slow_ms"] = _time(lambda: hf(x), args.repeats)
                best = min(row[f"chunked{c}_ms"] for c in args.chunk_sizes)
                row["hf_over_chunked"] = row["hf_slow_ms"] / best
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
