"""Expert placement on a routing trace of a trained model: ILP vs greedy vs round-robin, then real
step time of 2 gloo processes under the round-robin and the planned placement.

    python benchmarks/bench_placement.py --model runs/moe-small
    python benchmarks/bench_placement.py --quick          # random model, small, smoke test

1. Records a trace on the run's validation split (home device of a sequence = its index mod N).
2. For N = 2 and 4 devices and both traffic models, plans with every method and prints the
   simulated imbalance and cross-device traffic.
3. Splits the trace into windows and plans each with the ILP and with greedy, to count how often
   and by how much the ILP itself beats greedy.
4. Runs forward+backward with expert parallelism on 2 gloo processes, each rank on its own
   sequences, with the experts placed round-robin and as planned (``traffic="home"``), and
   reports the median step time of each.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch

from moekit.analysis import RoutingTrace, record_trace
from moekit.parallel.placement import (
    Placement,
    greedy,
    plan_placement,
    round_robin,
    simulate,
    solve_ilp,
    trace_stats,
)


def load_model(path: str | None, quick: bool):
    """``(model, tokens, label)``: the trained model at ``path``, or with ``--quick`` a random one.

    A missing ``path`` is an error, not a silent fallback: the tables would otherwise be labelled
    with a model they do not describe.
    """
    from moekit.models import MoEForCausalLM, get_preset

    if quick:
        torch.manual_seed(0)
        model = MoEForCausalLM(get_preset("moe-tiny")).eval()
        tokens = torch.randint(0, model.config.vocab_size, (200_000,))
        return model, tokens, "random moe-tiny on random tokens (--quick)"
    if not path or not os.path.exists(path):
        raise SystemExit(
            f"bench_placement: {path} does not exist; train it first (`make run`) or pass --quick "
            "for a random-model smoke test"
        )
    from moekit.cli.common import evaluation_tokens, load_model_and_tokenizer

    model, tok, folder = load_model_and_tokenizer(path)
    tokens = torch.from_numpy(evaluation_tokens(tok, folder, None))
    return model, tokens, f"{path} on its held-out split"


def sub_trace(trace: RoutingTrace, lo: int, hi: int) -> RoutingTrace:
    keep = (trace.sequence_ids >= lo) & (trace.sequence_ids < hi)
    return RoutingTrace(
        tokens=trace.tokens[keep],
        sequence_ids=trace.sequence_ids[keep] - lo,
        expert_ids=[ids[keep] for ids in trace.expert_ids],
        weights=[w[keep] for w in trace.weights],
        layer_indices=trace.layer_indices,
        num_experts=trace.num_experts,
    )


def _worker(rank: int, world: int, port: int, model_state, cfg_dict, plan_json, batches, out_path, steps):
    import torch.distributed as dist

    from moekit.models import ModelConfig, MoEForCausalLM
    from moekit.parallel import parallelize_experts
    from moekit.parallel.placement import apply_placement

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = MoEForCausalLM(ModelConfig.from_dict(cfg_dict))
    model.load_state_dict(model_state)
    apply_placement(model, Placement.from_json(plan_json))
    parallelize_experts(model)
    model.train()
    local = batches[rank]
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        out = model(local[:, :-1], labels=local[:, :-1])
        out.loss.backward()
        dist.barrier()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    if rank == 0:
        with open(out_path, "w") as f:
            f.write(str(statistics.median(times[1:])))
    dist.destroy_process_group()


def step_time(model, plan: Placement, batches, steps: int) -> float:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        plan_path = os.path.join(tmp, "plan.json")
        plan.to_json(plan_path)
        out = os.path.join(tmp, "t.txt")
        mp.spawn(
            _worker,
            args=(2, port, model.state_dict(), model.config.to_dict(), plan_path, batches, out, steps),
            nprocs=2,
        )
        return float(open(out).read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/moe-small")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--time-limit", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.seq_len, args.time_limit, args.steps = 2048, 64, 5.0, 3
    model, tokens, label = load_model(args.model, args.quick)
    num_seq = min(args.tokens // args.seq_len, len(tokens) // args.seq_len)
    windows = tokens[: num_seq * args.seq_len].reshape(num_seq, args.seq_len)
    trace = record_trace(model, [(w, None) for w in windows.split(8)], label)
    cfg = model.config
    print(
        f"# trace of {label}: {trace.num_tokens} tokens, {trace.num_layers} MoE layers x {trace.num_experts[0]} experts"
    )
    for traffic in ("home", "stay"):
        for devices in (2, 4):
            res = plan_placement(
                trace, devices, load_slack=0.1, time_limit_s=args.time_limit, dim=cfg.dim, traffic=traffic
            )
            print(f"\n## {devices} devices, traffic model '{traffic}' (chose {res.placement.method})")
            print(
                "| placement | mean imbalance | worst layer | token moves | all-to-all MB/step (bf16) | vs round-robin |"
            )
            print("|---|---|---|---|---|---|")
            base = res.reports["round_robin"].token_moves
            for name, rep in res.reports.items():
                print(
                    f"| {name} | {rep.imbalance:.3f} | {rep.max_imbalance:.3f} | {rep.token_moves:.0f} | "
                    f"{rep.bytes_per_step / 1e6:.2f} | {rep.token_moves / max(base, 1):.3f} |"
                )
    # ILP against greedy on windows of the trace.
    num_windows = 8
    per = max(2, num_seq // num_windows)
    wins, gains = 0, []
    for w in range(num_windows):
        sub = sub_trace(trace, w * per, (w + 1) * per)
        if sub.num_tokens == 0:
            continue
        stats = trace_stats(sub, 4)
        ilp = solve_ilp(stats, 4, 0.1, args.time_limit / 2, traffic="home")
        g = greedy(stats, 4, 0.1, traffic="home")
        gm = simulate(stats, g, traffic="home").token_moves
        im = simulate(stats, ilp, traffic="home").token_moves if ilp is not None else float("inf")
        if im < gm - 1e-9:
            wins += 1
            gains.append(1 - im / gm)
    mean_gain = f"{100 * sum(gains) / len(gains):.1f}%" if gains else "-"
    print(
        f"\nILP beat greedy on {wins}/{num_windows} windows (4 devices, 'home'); mean traffic saved where it won: {mean_gain}"
    )
    # Real step time on 2 gloo processes.
    plan = plan_placement(trace, 2, load_slack=0.1, time_limit_s=args.time_limit, traffic="home").placement
    rr = round_robin(trace.num_layers, trace.num_experts[0], 2)
    batches = [windows[(torch.arange(num_seq) % 2) == r][:8] for r in range(2)]
    batches = [torch.cat([b, b[:, :1]], 1) for b in batches]
    t_rr = step_time(model, rr, batches, args.steps)
    t_plan = step_time(model, plan, batches, args.steps)
    print("\n| placement (2 gloo ranks, fwd+bwd) | median step (s) |")
    print("|---|---|")
    print(f"| round-robin | {t_rr:.3f} |")
    print(f"| planned ({plan.method}) | {t_plan:.3f} |")
    print(f"planned / round-robin: {t_plan / t_rr:.3f}")


if __name__ == "__main__":
    main()
