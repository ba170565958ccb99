"""Time of one continuous-batch decode step (``DecodeBatch.step``) at 1, 2, 4 and 8 rows, no server.

Rows have different prompt lengths (8 + row index, random ids); the model is a random-init preset
(speed does not depend on the weights). Prints ms per step and tokens/s per batch size, then with
``--profile`` the top operators of the largest batch's step (``torch.profiler``).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_batch_step.py --preset moe-small --profile
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    """Runs the benchmark and prints its numbers."""
    import torch

    from moekit.models import MoEForCausalLM
    from moekit.models.batch_decode import DecodeBatch
    from moekit.models.decode import DecodeSession
    from moekit.models.presets import get_preset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="moe-small")
    p.add_argument("--steps", type=int, default=30, help="timed steps per batch size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="profile the largest batch's steps")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MoEForCausalLM(get_preset(args.preset)).eval()
    print(f"{args.preset} (random init), torch threads {torch.get_num_threads()}")
    batch = None
    for rows in (1, 2, 4, 8):
        batch = DecodeBatch(model)
        for i in range(rows):
            session = DecodeSession(model, torch.randint(0, 300, (1, 8 + i)))
            session.prefill()
            batch.join(session)
        next_B = torch.randint(0, 300, (rows,))
        for _ in range(5):
            batch.step(next_B)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            batch.step(next_B)
        dt = (time.perf_counter() - t0) / args.steps
        print(f"{rows} rows: {1000 * dt:.2f} ms/step, {rows / dt:.0f} tokens/s ({batch.last_path} path)")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(20):
                batch.step(next_B)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
