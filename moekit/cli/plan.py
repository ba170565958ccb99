"""``moekit plan``: plan expert placement over devices from a routing trace."""

from __future__ import annotations

import argparse
import json

HELP = "Plan which device hosts each expert (ILP / greedy / round-robin, optional replicas) from a routing trace."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    p.add_argument("--trace", required=True, help="routing trace from `moekit trace` (safetensors)")
    p.add_argument("--devices", type=int, required=True, help="number of devices (must divide the experts)")
    p.add_argument("--out", default="plan.json", help="where to write the plan (JSON)")
    p.add_argument(
        "--load-slack", type=float, default=0.1, help="allowed per-layer load above the mean (0.1 = 10%%)"
    )
    p.add_argument(
        "--time-limit", type=float, default=30.0, help="ILP time limit in seconds; greedy is the fallback"
    )
    p.add_argument(
        "--slots-per-device", type=int, default=None, help="expert slots per device; spare slots get replicas"
    )
    p.add_argument("--dim", type=int, default=1, help="model width, to report all-to-all bytes per step")
    p.add_argument(
        "--traffic",
        choices=["stay", "home"],
        default="home",
        help="traffic model: 'home' (tokens return to their rank after each layer, as moekit's executor) "
        "or 'stay' (tokens stay on their last expert's device, MoETuner)",
    )


def run(args: argparse.Namespace) -> int:
    """Plans, writes the plan, prints every candidate's simulated cost."""
    from moekit.analysis import load_trace
    from moekit.parallel.placement import plan_placement

    trace = load_trace(args.trace)
    result = plan_placement(
        trace,
        args.devices,
        load_slack=args.load_slack,
        time_limit_s=args.time_limit,
        slots_per_device=args.slots_per_device,
        dim=args.dim,
        traffic=args.traffic,
    )
    result.placement.to_json(args.out)
    base = result.reports["round_robin"]
    print(
        "| placement | mean imbalance | worst layer imbalance | token moves | bytes/step | moves vs round-robin | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, rep in result.reports.items():
        print(
            f"| {name} | {rep.imbalance:.3f} | {rep.max_imbalance:.3f} | {rep.token_moves:.0f} | "
            f"{rep.bytes_per_step:.3g} | {rep.token_moves / max(base.token_moves, 1):.3f} | "
            f"{result.seconds.get(name, 0.0):.2f} |"
        )
    print(f"chose {result.placement.method}; plan written to {args.out}")
    print(
        json.dumps({"chosen": result.placement.method, **result.reports[result.placement.method].as_dict()})
    )
    return 0
