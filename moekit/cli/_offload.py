"""Expert-offloading flags shared by ``moekit generate`` and ``moekit serve`` (see moekit.offload)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    """Expert-offloading flags shared by ``generate`` and ``serve`` (see moekit.offload)."""
    p.add_argument(
        "--expert-cache-bytes",
        default=None,
        help="offload experts and keep this many bytes of them resident: a byte count (e.g. 2e8) or a "
        "percentage of all expert bytes (e.g. 50%%); default: no offloading",
    )
    p.add_argument(
        "--ring-sections",
        type=int,
        default=None,
        metavar="S",
        help="offload experts as SE-MoE ring memory instead of a per-expert cache: S whole-layer sections, "
        "the next S-1 layers loading while one computes (not with --expert-cache-bytes)",
    )
    p.add_argument(
        "--policy", choices=["lru", "lfu", "edgemoe"], default="lru", help="expert cache eviction policy"
    )
    p.add_argument(
        "--prefetch",
        choices=["none", "pregate", "stats", "edgemoe"],
        default="none",
        help="prefetch the next layer's experts (stats and edgemoe need --trace)",
    )
    p.add_argument("--trace", default=None, help="routing trace (moekit trace) for --prefetch stats")
    p.add_argument("--store", default=None, help="expert store folder (default: a temporary folder)")
    p.add_argument(
        "--store-bandwidth",
        type=float,
        default=None,
        help="throttle store reads to this many bytes/s (e.g. 2e9)",
    )


def parse_cache_bytes(text: str, total_expert_bytes: int) -> int:
    """``"123"``/``"2e8"`` -> bytes; ``"50%"`` -> that share of ``total_expert_bytes``."""
    text = text.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:  # also false for nan
                raise ValueError
            return int(total_expert_bytes * share / 100)
        value = float(text)
        if not math.isfinite(value):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"--expert-cache-bytes {text!r}: give a byte count (e.g. 2e8) or a percentage in (0, 100] (e.g. 50%)"
        ) from None
    if value <= 0:
        raise ValueError(f"--expert-cache-bytes must be positive, got {text!r}")
    return int(value)


def maybe_offload(model, args: argparse.Namespace):
    """Applies offloading when ``--expert-cache-bytes`` or ``--ring-sections`` is given; returns
    ``(cache or ring, tempdir)`` or Nones (both have ``stats.as_dict()`` and ``close()``)."""
    ring = getattr(args, "ring_sections", None)
    if ring is not None:
        if args.expert_cache_bytes is not None or args.prefetch != "none":
            raise ValueError(
                "--ring-sections is its own offloading mode: drop --expert-cache-bytes/--prefetch"
            )
        if ring < 1:
            raise ValueError(f"--ring-sections must be a positive number of layer sections, got {ring}")
    elif args.expert_cache_bytes is None:
        if args.prefetch != "none" or args.store or args.store_bandwidth:
            raise ValueError(
                "--prefetch/--store/--store-bandwidth need --expert-cache-bytes or --ring-sections (offloading)"
            )
        return None, None
    import tempfile

    from moekit.offload import offload_model

    if not model.moe_layers:
        raise ValueError("offloading: the model has no MoE layers to offload")
    if ring is not None:
        from moekit.offload.ring import ring_offload_model

        tmp = None if args.store else tempfile.TemporaryDirectory(prefix="moekit-experts-")
        store = args.store or tmp.name
        if Path(store).exists() and not Path(store).is_dir():
            raise ValueError(f"--store {store} is an existing file; pass a folder (it is created if missing)")
        return ring_offload_model(model, store, ring, bandwidth=args.store_bandwidth), tmp
    total = sum(p.numel() * p.element_size() for mlp in model.moe_layers for p in mlp.experts.parameters())
    budget = parse_cache_bytes(args.expert_cache_bytes, total)
    trace = None
    if args.prefetch in ("stats", "edgemoe"):
        if not args.trace:
            raise ValueError(
                f"--prefetch {args.prefetch} needs --trace FILE (a routing trace from `moekit trace`)"
            )
        from moekit.analysis import load_trace

        trace = load_trace(args.trace)
    tmp = None
    store = args.store
    if store is not None and Path(store).exists() and not Path(store).is_dir():
        raise ValueError(f"--store {store} is an existing file; pass a folder (it is created if missing)")
    if store is None:
        tmp = tempfile.TemporaryDirectory(prefix="moekit-experts-")
        store = tmp.name
    cache = offload_model(
        model,
        store,
        budget,
        policy=args.policy,
        prefetch=None if args.prefetch == "none" else args.prefetch,
        bandwidth=args.store_bandwidth,
        trace=trace,
    )
    return cache, tmp
