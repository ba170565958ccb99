"""GB/s of the native fp32 decode kernels against torch's (``moekit/kernels/linear.py``).

Each shape gets enough distinct weight matrices to total ``--mb`` MB (far beyond the 32 MB L3),
and one timing calls the op once on each of them in turn, so every call streams its weights from
memory, as a decode step does. Rounds interleave the engines (this machine's bandwidth drifts by
10-30% within a minute); the table gives the median GB/s (weight bytes / wall time) over rounds.

Rows: the Mixtral-shaped benchmark model's GEMVs (LM head 32000x512, attention q 512x512 and k/v
128x512, an expert's w_in 4096x512 and w_out 512x2048) at N=1, the w_in shape at N=4, and the
fused one-token MoE op (top-2 of 8 experts, D=512, F=2048, SwiGLU) against the per-expert
``F.linear`` loop of ``ExpertWeights.decode_token``.

``--generate`` times ``model.generate`` instead, on the Mixtral-shaped ~100 MB model of issue 19
(D=512, F=2048, 4 layers, 8/2 heads, 8 experts top-2, vocab 32000, untied head: 177 MB of fp32
weights read per token): greedy, batch 1, a 32-token prompt, decode seconds per token
``(t(N new) - t(1 new)) / (N - 1)`` in wall time, with the native kernels and with
``MOEKIT_KERNELS=0`` (the same process: the switch is read per call), eager (``compile=False``)
and compiled (``compile=True``, compiled during warm-up), rounds interleaved.

``--steps`` times decode steps on that model through ``DecodeSession`` directly: the whole-step
kernel (``moekit/models/native_step.py``, one call per token) with the weights in huge pages
(what ``generate`` does), the same with the weights left in 4 KiB pages (a second copy of the
model), and the eager fast path on the per-op kernels, rounds interleaved.

Run (behind the machine's lock): ``OMP_NUM_THREADS=2 flock /tmp/heavy.lock nice -n 10 \
.venv/bin/python benchmarks/bench_kernels.py --threads 1 2`` (add ``--generate`` for tok/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from moekit.kernels.linear import linear, moe_decode, native_available
from moekit.layers.experts import StackedExpertWeights
from moekit.models import MoEForCausalLM

GEMV_SHAPES = [  # (name, N, R, C)
    ("lm_head 32000x512", 1, 32000, 512),
    ("expert w_in 4096x512", 1, 4096, 512),
    ("expert w_out 512x2048", 1, 512, 2048),
    ("attn q 512x512", 1, 512, 512),
    ("attn k/v 128x512", 1, 128, 512),
    ("w_in 4096x512, N=4", 4, 4096, 512),
]


def time_calls(fn, items) -> float:
    t0 = time.perf_counter()
    for item in items:
        fn(*item)
    return time.perf_counter() - t0


def gemv_rows(mb: int, rounds: int) -> list[tuple[str, str, float]]:
    out = []
    for name, n, r, c in GEMV_SHAPES:
        count = max(2, mb * 2**20 // (r * c * 4))
        ws = [torch.randn(r, c) for _ in range(count)]
        x = torch.randn(n, c)
        engines = {
            "F.linear (MKL)": lambda w, x: F.linear(x, w),
            "native linear_f32": lambda w, x: linear(x, w, native=True),
        }
        if n == 1:
            engines["torch.mv"] = lambda w, x: torch.mv(w, x[0])
        samples = {e: [] for e in engines}
        items = [(w, x) for w in ws]
        for fn in engines.values():
            time_calls(fn, items)  # warm up
        for _ in range(rounds):
            for e, fn in engines.items():
                samples[e].append(count * r * c * 4 / time_calls(fn, items) / 1e9)
        out += [(name, e, statistics.median(v)) for e, v in samples.items()]
        del ws
    return out


def moe_rows(mb: int, rounds: int) -> list[tuple[str, str, float]]:
    dim, ffn, experts, k = 512, 2048, 8, 2
    per_layer = experts * 3 * dim * ffn * 4
    layers = [
        StackedExpertWeights(experts, dim, ffn).requires_grad_(False)
        for _ in range(max(2, mb * 2**20 // per_layer))
    ]
    x = torch.randn(1, dim)
    gen = torch.Generator().manual_seed(0)
    picks = [torch.randperm(experts, generator=gen)[:k].tolist() for _ in layers]
    gates = torch.tensor([[0.6, 0.4]])
    items = list(zip(layers, picks, strict=True))
    engines = {
        "per-expert F.linear loop": lambda st, ids: super(StackedExpertWeights, st).decode_token(
            x, ids, gates
        ),
        "native moe_decode_f32": lambda st, ids: moe_decode(x, st.w_in, st.w_out, ids, gates, "swiglu"),
    }
    samples = {e: [] for e in engines}
    for fn in engines.values():
        time_calls(fn, items)
    active = len(layers) * k * 3 * dim * ffn * 4
    for _ in range(rounds):
        for e, fn in engines.items():
            samples[e].append(active / time_calls(fn, items) / 1e9)
    return [("MoE top-2 of 8, D=512 F=2048", e, statistics.median(v)) for e, v in samples.items()]


def mixtral_100m() -> MoEForCausalLM:
    """Issue 19's ~100 MB Mixtral-shaped model: ``bench_vs_llamacpp.py``'s ``100m``, random weights."""
    from bench_vs_llamacpp import SIZES, build_model

    return build_model(SIZES["100m"])


def generate_rows(threads: list[int], rounds: int, new_tokens: int) -> None:
    model = mixtral_100m()
    ids = torch.randint(2, 32000, (1, 32), generator=torch.Generator().manual_seed(1))

    def run(kernels: bool, compile: bool, n: int) -> None:
        os.environ["MOEKIT_KERNELS"] = "1" if kernels else "0"
        model.generate(ids, max_new_tokens=n, compile=compile)

    def per_token(kernels: bool, compile: bool) -> float:
        t0 = time.perf_counter()
        run(kernels, compile, 1)
        t1 = time.perf_counter()
        run(kernels, compile, new_tokens)
        t2 = time.perf_counter()
        return ((t2 - t1) - (t1 - t0)) / (new_tokens - 1)

    engines = [(k, c) for c in (False, True) for k in (True, False)]
    same = []
    for kernels in (True, False):
        os.environ["MOEKIT_KERNELS"] = "1" if kernels else "0"
        same.append(model.generate(ids, max_new_tokens=new_tokens, compile=False))
    print(f"\nsame greedy tokens with and without kernels: {torch.equal(same[0], same[1])}")
    print("\n| model.generate | " + " | ".join(f"{t} thr tok/s" for t in threads) + " |")
    print("|---|" + "---:|" * len(threads))
    results = {}
    for t in threads:
        torch.set_num_threads(t)
        for k, c in engines:
            run(k, c, 4)  # warm-up; compiles the two compiled graphs (with and without the ops)
        samples = {e: [] for e in engines}
        for r in range(rounds):
            for e in engines if r % 2 == 0 else engines[::-1]:
                samples[e].append(per_token(*e))
        for e, v in samples.items():
            results.setdefault(e, {})[t] = 1 / statistics.median(v)
    for (k, c), by_t in results.items():
        name = f"{'native kernels' if k else 'MOEKIT_KERNELS=0'}, compile={c}"
        print(f"| {name} | " + " | ".join(f"{by_t[t]:.1f}" for t in threads) + " |")
    os.environ["MOEKIT_KERNELS"] = "1"


def step_rows(threads: list[int], rounds: int, new_tokens: int) -> None:
    import copy

    from moekit.kernels.memory import move_to_hugepages
    from moekit.models.decode import DecodeSession

    huge = mixtral_100m()
    small = copy.deepcopy(huge)
    small._moekit_hugepage_weights = True  # keep this copy in 4 KiB pages
    print(f"moved to huge pages: {move_to_hugepages(huge) / 1e6:.0f} MB")
    ids = torch.randint(2, 32000, (1, 32), generator=torch.Generator().manual_seed(1))
    engines = {
        "whole-step kernel, huge pages": (huge, True),
        "whole-step kernel, 4 KiB pages": (small, True),
        "eager fast path, per-op kernels": (huge, False),
    }

    @torch.no_grad()
    def per_token(model, native: bool) -> float:
        session = DecodeSession(model, ids, max_new_tokens=new_tokens)
        assert session.use_native_step, "the whole-step kernel did not take this model"
        session.use_native_step = native
        tok = session.prefill().argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            tok = session.step(tok).argmax(-1)
        return (time.perf_counter() - t0) / new_tokens

    print("\n| decode step | " + " | ".join(f"{t} thr tok/s" for t in threads) + " |")
    print("|---|" + "---:|" * len(threads))
    results = {}
    for t in threads:
        torch.set_num_threads(t)
        for e in engines.values():
            per_token(*e)
        samples = {name: [] for name in engines}
        names = list(engines)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                samples[name].append(per_token(*engines[name]))
        for name, v in samples.items():
            results.setdefault(name, {})[t] = 1 / statistics.median(v)
    for name, by_t in results.items():
        print(f"| {name} | " + " | ".join(f"{by_t[t]:.1f}" for t in threads) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mb", type=int, default=256, help="weight MB per shape (>> L3)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--generate", action="store_true", help="tok/s of model.generate instead")
    parser.add_argument("--steps", action="store_true", help="decode steps: whole-step kernel vs eager")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    if not native_available():
        raise SystemExit("native kernels unavailable (build failed or MOEKIT_KERNELS=0)")
    if args.steps:
        print(
            f"torch {torch.__version__}; median over {args.rounds} interleaved rounds, {args.new_tokens} steps"
        )
        step_rows(args.threads, args.rounds, args.new_tokens)
        return
    if args.generate:
        print(
            f"torch {torch.__version__}; median over {args.rounds} interleaved rounds, {args.new_tokens} new tokens"
        )
        generate_rows(args.threads, args.rounds, args.new_tokens)
        return
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}; median GB/s over {args.rounds} interleaved rounds, {args.mb} MB per shape"
    )
    print("\n| shape | engine | " + " | ".join(f"{t} thr GB/s" for t in args.threads) + " |")
    print("|---|---|" + "---:|" * len(args.threads))
    results = {}
    with torch.no_grad():
        for t in args.threads:
            torch.set_num_threads(t)
            for shape, engine, gbs in gemv_rows(args.mb, args.rounds) + moe_rows(args.mb, args.rounds):
                results.setdefault((shape, engine), {})[t] = gbs
    for (shape, engine), by_t in results.items():
        print(f"| {shape} | {engine} | " + " | ".join(f"{by_t[t]:.1f}" for t in args.threads) + " |")


if __name__ == "__main__":
    main()
