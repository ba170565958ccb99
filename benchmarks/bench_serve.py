"""Latency and throughput of ``moekit serve`` on 127.0.0.1 under concurrent clients.

Starts the server in-process (uvicorn on a free loopback port) with a model folder, or with a
random ``moe-tiny`` and a small trained tokenizer when no ``--model`` is given, then runs
``--clients`` threads that each send ``--requests`` greedy completions (plus, with ``--invalid``,
one malformed request per valid one). Prints p50/p99 latency of valid and invalid requests,
requests/s and generated tokens/s.

    PYTHONPATH=. python benchmarks/bench_serve.py --clients 8 --requests 10 --max-tokens 16

``--compare`` measures continuous batching instead: the same ``--clients`` greedy requests
(different prompts, ``--max-tokens`` each) sent all at once and one at a time, to the same
server, in ``--rounds`` rounds (each round runs both, alternating which goes first); prints
the total generated tokens/s of each and their ratio. ``--preset`` picks the random model (``moe-tiny`` or ``moe-small``, random init: the
speed does not depend on the weights, and greedy tokens are counted from ``usage``).

    PYTHONPATH=. python benchmarks/bench_serve.py --compare --preset moe-small --clients 8 --max-tokens 64

``--join`` measures chunked prefill instead: ``--clients`` greedy rows decode, and after
``--warmup-ticks`` steps a ``--join-prompt``-token prompt joins their batch; it runs the server's
own scheduler (:class:`~moekit.infer.server_batch.BatchScheduler`, what ``moekit serve`` ticks on
its worker thread) in-process, timing each tick, once without chunking and once per
``--prefill-chunk`` size, in ``--rounds`` interleaved rounds (the order rotates each round). For
each it prints the running rows' inter-token gaps (median, p99, max), the long prompt's time to
first token and the total generated tokens/s, per round and their medians. The tokens are timed
where the scheduler hands them to the event loop (HTTP delivery adds the same to both sides; it is
left out because a random model's tokens often decode to no text, so streamed chunks do not count
tokens). EOS is off, so every side generates the same tokens.

    PYTHONPATH=. python benchmarks/bench_serve.py --join --preset moe-small-all --clients 4 --prefill-chunk 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _tiny_folder(root: Path, preset: str = "moe-tiny") -> Path:
    import torch

    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.models import MoEForCausalLM
    from moekit.models.presets import get_preset

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 20
    folder = root / "tiny"
    torch.manual_seed(0)
    MoEForCausalLM(get_preset(preset)).save_pretrained(folder)
    save_tokenizer(train_tokenizer([text], vocab_size=300), folder)
    return folder


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _child_server(folder: str, max_batch: int, threads: int, ports) -> None:
    """Runs the server in its own process, so the clients' threads never hold the server's GIL."""
    import torch
    import uvicorn

    from moekit.cli.common import load_model_and_tokenizer
    from moekit.infer.server import ServerConfig, create_app

    torch.set_num_threads(threads)
    model, tok, _ = load_model_and_tokenizer(Path(folder))
    config = ServerConfig(model_name="bench", max_queue=64, max_batch=max_batch, max_tokens_limit=4096)
    server = uvicorn.Server(uvicorn.Config(create_app(model, tok, config), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    ports.put(server.servers[0].sockets[0].getsockname()[1])
    thread.join()


def compare(base: str, args) -> None:
    """Concurrent against sequential: the same requests, interleaved rounds, total tokens/s."""
    import httpx

    prompts = [f"def f{i}(" + "x, " * (i % 4) for i in range(args.clients)]
    bodies = [
        {"model": "bench", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0} for p in prompts
    ]

    def post(c, body) -> tuple[int, str]:
        r = c.post("/v1/completions", json=body)
        r.raise_for_status()
        out = r.json()
        return out["usage"]["completion_tokens"], out["choices"][0]["text"]

    # One keep-alive client per concurrent request, made before timing (a new httpx client builds an
    # SSL context, tens of ms of CPU that would count against the concurrent side only).
    clients = [httpx.Client(base_url=base, timeout=600) for _ in bodies]
    with httpx.Client(base_url=base, timeout=600) as c:
        for own in clients:
            post(own, bodies[0] | {"max_tokens": 2})  # warm-up, and opens each connection
        results = {"sequential": [], "concurrent": []}
        for r in range(args.rounds):

            def sequential() -> list:
                return [post(c, b) for b in bodies]

            def concurrent() -> list:
                out: list = [None] * len(bodies)

                def client(i: int) -> None:
                    out[i] = post(clients[i], bodies[i])

                threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return out

            # Alternate which side goes first, so a drift in the machine's load favours neither.
            texts = {}
            for name in ("sequential", "concurrent") if r % 2 == 0 else ("concurrent", "sequential"):
                t0 = time.perf_counter()
                done = sequential() if name == "sequential" else concurrent()
                results[name].append((sum(n for n, _ in done), time.perf_counter() - t0))
                texts[name] = [t for _, t in done]
            if texts["concurrent"] != texts["sequential"]:
                print("WARNING: concurrent texts differ from sequential ones")
        health = c.get("/health").json()
    for own in clients:
        own.close()
    rate = {k: [n / s for n, s in v] for k, v in results.items()}
    for k, v in rate.items():
        print(
            f"{k:10s} tokens/s per round: "
            + ", ".join(f"{x:.0f}" for x in v)
            + f"  median {statistics.median(v):.0f}"
        )
    ratios = [c / s for c, s in zip(rate["concurrent"], rate["sequential"], strict=True)]
    print(
        "concurrent / sequential: "
        + ", ".join(f"{x:.2f}x" for x in ratios)
        + f"  median {statistics.median(ratios):.2f}x"
    )
    print(f"batch: {health['batch']}")


def join(model, args) -> None:
    """Running rows' inter-token gaps while a long prompt joins, with and without chunked prefill."""
    import torch

    from moekit.infer.server_batch import BatchRow, BatchScheduler
    from moekit.infer.server_engine import ServerStats
    from moekit.models.generation import Sampler

    chunks = [None] + [int(c) for c in args.prefill_chunk.split(",")]
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    short = [torch.randint(0, vocab, (8,), generator=gen).tolist() for _ in range(args.clients)]
    long_prompt = torch.randint(0, vocab, (args.join_prompt,), generator=gen).tolist()
    if args.join_prompt + args.max_tokens > model.config.max_position_embeddings:
        raise SystemExit(
            f"--join-prompt + --max-tokens exceed the model's {model.config.max_position_embeddings} positions"
        )

    def one_run(chunk):
        def row(prompt, max_tokens):
            return BatchRow(prompt, Sampler(temperature=0.0), max_tokens, want_logprobs=False)

        sched = BatchScheduler(
            model,
            vision=False,
            eos_token_id=-1,  # no EOS: every side generates the same number of tokens
            max_batch=args.clients + 1,
            call=None,
            stats=ServerStats(),
            prefill_chunk=chunk,
        )
        running = [row(p, args.max_tokens) for p in short]
        long_row = row(long_prompt, args.join_tokens)
        sched.waiting.extend(running)
        last, gaps, tokens, ticks = {}, [], {}, 0
        t_join = t_first = None
        t0 = time.perf_counter()
        while sched.rows or sched.waiting or sched.prefilling or ticks == 0:
            if ticks == args.warmup_ticks:
                sched.waiting.append(long_row)
                t_join = time.perf_counter()
            out = sched.tick()
            now = time.perf_counter()
            ticks += 1
            for r, item in out:
                if item is None:
                    continue
                tokens[r] = tokens.get(r, 0) + 1
                if r is long_row and t_first is None:
                    t_first = now
                elif r is not long_row:
                    if r in last and t_join is not None:  # gaps from the join on
                        gaps.append(now - last[r])
                    last[r] = now
        wall = time.perf_counter() - t0
        return {
            "gaps": gaps,
            "ttft": t_first - t_join,
            "tok_s": sum(tokens.values()) / wall,
            "tokens": sum(tokens.values()),
        }

    one_run(chunks[-1])  # warm-up: first-call allocations and thread pools
    results = {c: [] for c in chunks}
    for r in range(args.rounds):
        order = chunks[r % len(chunks) :] + chunks[: r % len(chunks)]
        for c in order:
            results[c].append(one_run(c))
    print(
        f"{args.clients} running rows ({args.max_tokens} tokens each), a {args.join_prompt}-token prompt "
        f"({args.join_tokens} tokens) joins after {args.warmup_ticks} steps; gaps of the running rows from "
        f"the join on; {args.rounds} rounds, medians"
    )
    print(
        f"{'prefill':>10s} {'gap p50 ms':>10s} {'p99 ms':>8s} {'max ms':>8s} {'ttft ms':>8s} {'tokens/s':>9s}  per-round max gap ms"
    )
    med = statistics.median
    for c, runs in results.items():
        stat = {
            "p50": med(1000 * med(x["gaps"]) for x in runs),
            "p99": med(1000 * _percentile(x["gaps"], 0.99) for x in runs),
            "max": med(1000 * max(x["gaps"]) for x in runs),
            "ttft": med(1000 * x["ttft"] for x in runs),
            "tok_s": med(x["tok_s"] for x in runs),
        }
        name = "one go" if c is None else f"chunk {c}"
        per_round = ", ".join(f"{1000 * max(x['gaps']):.0f}" for x in runs)
        print(
            f"{name:>10s} {stat['p50']:10.1f} {stat['p99']:8.1f} {stat['max']:8.1f} {stat['ttft']:8.0f} "
            f"{stat['tok_s']:9.0f}  {per_round}"
        )
    if len({x["tokens"] for runs in results.values() for x in runs}) != 1:
        print("WARNING: the sides generated different numbers of tokens")


def main() -> None:
    """Runs the benchmark and prints its numbers."""
    import httpx
    import torch
    import uvicorn

    from moekit.cli.common import load_model_and_tokenizer
    from moekit.infer.server import ServerConfig, create_app

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: a random moe-tiny)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=10, help="valid requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--invalid", action="store_true", help="also send one invalid request per valid one")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    p.add_argument("--compare", action="store_true", help="concurrent against sequential (see the docstring)")
    p.add_argument("--preset", default="moe-tiny", help="random model when no --model (default moe-tiny)")
    p.add_argument("--rounds", type=int, default=2, help="--compare rounds")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--join", action="store_true", help="chunked prefill: gaps while a long prompt joins")
    p.add_argument(
        "--prefill-chunk", default="64", help="--join: chunk sizes to compare with none, comma-separated"
    )
    p.add_argument("--join-prompt", type=int, default=512, help="--join: the joining prompt's tokens")
    p.add_argument("--join-tokens", type=int, default=16, help="--join: tokens the joining request generates")
    p.add_argument("--warmup-ticks", type=int, default=8, help="--join: steps before the long prompt joins")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else _tiny_folder(Path(tmp), args.preset)
        print(f"model {args.model or args.preset + ' (random init)'}, torch threads {args.threads}")
        if args.join:
            from moekit.cli.common import load_model_and_tokenizer

            model, _, _ = load_model_and_tokenizer(folder)
            join(model, args)
            return
        if args.compare:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            ports = ctx.Queue()
            child = ctx.Process(target=_child_server, args=(str(folder), args.max_batch, args.threads, ports))
            child.start()
            try:
                compare(f"http://127.0.0.1:{ports.get(timeout=300)}", args)
            finally:
                child.terminate()
                child.join(10)
            return
        model, tok, _ = load_model_and_tokenizer(folder)
        config = ServerConfig(
            model_name="bench", max_queue=4 * args.clients, max_batch=args.max_batch, max_tokens_limit=4096
        )
        app = create_app(model, tok, config)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        valid_s, invalid_s, tokens, errors = [], [], [0], []
        lock = threading.Lock()

        def client(worker: int) -> None:
            with httpx.Client(base_url=base, timeout=300) as c:
                for i in range(args.requests):
                    body = {"model": "bench", "prompt": f"def f{worker}_{i}(", "max_tokens": args.max_tokens}
                    t0 = time.perf_counter()
                    r = c.post("/v1/completions", json=body | {"temperature": 0})
                    dt = time.perf_counter() - t0
                    with lock:
                        if r.status_code == 200:
                            valid_s.append(dt)
                            tokens[0] += r.json()["usage"]["completion_tokens"]
                        else:
                            errors.append(r.status_code)
                    if args.invalid:
                        t0 = time.perf_counter()
                        r = c.post("/v1/completions", json=body | {"max_tokens": "5"})
                        with lock:
                            invalid_s.append(time.perf_counter() - t0)
                            if r.status_code != 400:
                                errors.append(r.status_code)

        t0 = time.perf_counter()
        workers = [threading.Thread(target=client, args=(w,)) for w in range(args.clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        server.should_exit = True
        thread.join(10)

    print(f"clients {args.clients} x {args.requests} requests, max_tokens {args.max_tokens}, {wall:.2f} s")
    print(
        f"valid   p50 {1000 * statistics.median(valid_s):.0f} ms  p99 {1000 * _percentile(valid_s, 0.99):.0f} ms"
        f"  {len(valid_s) / wall:.1f} req/s  {tokens[0] / wall:.0f} tokens/s"
    )
    if invalid_s:
        print(
            f"invalid p50 {1000 * statistics.median(invalid_s):.1f} ms  p99 "
            f"{1000 * _percentile(invalid_s, 0.99):.1f} ms"
        )
    print(f"unexpected statuses: {errors or 'none'}")


if __name__ == "__main__":
    main()
