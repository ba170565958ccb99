"""Latency and throughput of ``moekit serve`` on 127.0.0.1 under concurrent clients.

Starts the server in-process (uvicorn on a free loopback port) with a model folder, or with a
random ``moe-tiny`` and a small trained tokenizer when no ``--model`` is given, then runs
``--clients`` threads that each send ``--requests`` greedy completions (plus, with ``--invalid``,
one malformed request per valid one). Prints p50/p99 latency of valid and invalid requests,
requests/s and generated tokens/s.

    PYTHONPATH=. python benchmarks/bench_serve.py --clients 8 --requests 10 --max-tokens 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _tiny_folder(root: Path) -> Path:
    import torch

    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.models import MoEForCausalLM
    from moekit.models.presets import moe_tiny

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 20
    folder = root / "tiny"
    torch.manual_seed(0)
    MoEForCausalLM(moe_tiny()).save_pretrained(folder)
    save_tokenizer(train_tokenizer([text], vocab_size=300), folder)
    return folder


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else _tiny_folder(Path(tmp))
        model, tok, _ = load_model_and_tokenizer(folder)
        config = ServerConfig(model_name="bench", max_queue=4 * args.clients)
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
