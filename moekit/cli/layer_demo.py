"""``moekit layer-demo``: build one MoE layer from flags, run it, print routing statistics."""

from __future__ import annotations

import argparse
import json
import time

HELP = "Build one MoE layer from flags (or a MoEConfig JSON), run a batch through it, print routing stats."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    p.add_argument("--config", help="a MoEConfig JSON file (flags below are ignored when given)")
    p.add_argument("--dim", type=int, default=256, help="model width D")
    p.add_argument("--ffn-dim", type=int, default=512, help="expert hidden width F")
    p.add_argument("--experts", type=int, default=8, help="number of FFN experts")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (token choice)")
    p.add_argument(
        "--router",
        default="topk",
        choices=["topk", "top_p", "random_fixed", "expert_choice"],
        help="router type",
    )
    p.add_argument("--top-p", type=float, default=0.4, help="threshold for --router top_p")
    p.add_argument(
        "--capacity-factor", type=float, default=None, help="drop tokens beyond this capacity factor"
    )
    p.add_argument(
        "--drop-policy",
        default="score",
        choices=["score", "position", "random"],
        help="survivors at capacity",
    )
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the batch")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
    """Builds the layer, runs one forward and backward, prints statistics as JSON."""
    import torch

    from moekit.layers import MoEConfig, MoELayer

    torch.manual_seed(args.seed)
    if args.config:
        cfg = MoEConfig.from_json(args.config)
    else:
        cfg = MoEConfig(
            dim=args.dim,
            ffn_dim=args.ffn_dim,
            num_experts=args.experts,
            top_k=args.top_k,
            router_type=args.router,
            top_p=args.top_p,
            capacity_factor=args.capacity_factor,
            drop_policy=args.drop_policy,
        )
    layer = MoELayer(cfg)
    x = torch.randn(args.tokens, cfg.dim, requires_grad=True)
    t0 = time.perf_counter()
    out = layer(x)
    t1 = time.perf_counter()
    loss = out.hidden.square().mean() + 0.01 * out.aux_losses["load_balance"]
    loss.backward()
    t2 = time.perf_counter()
    r = out.routing
    report = {
        "config": cfg.to_dict(),
        "tokens": args.tokens,
        "tokens_per_expert": r.tokens_per_expert.tolist(),
        "num_dropped": int(r.num_dropped),
        "experts_per_token": round(float(r.experts_per_token), 4),
        "router_entropy_nats": round(float(r.router_entropy), 4),
        "aux_losses": {k: round(float(v.detach()), 5) for k, v in out.aux_losses.items()},
        "forward_ms": round((t1 - t0) * 1e3, 2),
        "backward_ms": round((t2 - t1) * 1e3, 2),
    }
    print(json.dumps(report, indent=2))
    return 0
