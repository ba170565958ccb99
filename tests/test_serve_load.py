"""A bounded load test of moekit serve on 127.0.0.1: concurrent clients mix valid requests (checked
against a direct greedy generate), invalid ones (each must get its 4xx) and streams cancelled
mid-way; the server must stay up, free every queue place, and return near its baseline RSS."""

from __future__ import annotations

import gc
import json
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from tests.test_serve import MAX_LIMIT, model_folder, running_server  # noqa: E402, F401

NUM_CLIENTS = 8
ROUNDS = 4  # each client runs every kind of request this many times
BODY_LIMIT = 256 * 1024
PROMPTS = ["def ", "class Point:", "return a", "x = 1\n"]
MAX_TOKENS = 6
RSS_SLACK_MB = 120

# invalid bodies and the status each must get
INVALID = [
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400),
    ({"model": "tiny", "prompt": "x", "seed": 2**64, "stream": True}, 400),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400),
    ({"model": "nope", "prompt": "x"}, 404),
    ({"model": "tiny", "prompt": "x", "max_tokens": MAX_LIMIT + 1}, 400),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 1.0}, 400),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400),
]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def expected(model_folder):  # noqa: F811
    """Greedy completions of PROMPTS by a direct generate (no server)."""
    from moekit.cli.common import load_model_and_tokenizer
    from moekit.data.tokenizer import special_token_id
    from moekit.models.generation import generate

    model, tok, _ = load_model_and_tokenizer(model_folder)
    eos = special_token_id(tok)
    out = {}
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        new = generate(model, torch.tensor([ids]), max_new_tokens=MAX_TOKENS, eos_token_id=eos)[0, len(ids) :]
        new = [t for t in new.tolist() if t != eos]
        out[prompt] = tok.decode(new)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_concurrent_mixed_load(model_folder, expected):  # noqa: F811
    from moekit.infer.server import ServerConfig

    config = ServerConfig(
        model_name="tiny", max_tokens_limit=MAX_LIMIT, max_body_bytes=BODY_LIMIT, max_queue=4 * NUM_CLIENTS
    )
    with running_server(model_folder, config) as server:
        engine = server.moekit_app.state.engine
        base = f"http://127.0.0.1:{server.moekit_port}"
        failures: list[str] = []
        counts = {"valid": 0, "invalid": 0, "cancelled": 0, "oversized": 0}
        lock = threading.Lock()

        def fail(msg):
            with lock:
                failures.append(msg)

        def count(kind):
            with lock:
                counts[kind] += 1

        def client_run(worker: int):
            with httpx.Client(base_url=base, timeout=120) as c:
                for r in range(ROUNDS):
                    prompt = PROMPTS[(worker + r) % len(PROMPTS)]
                    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
                    # 1. a valid request, streamed on odd workers
                    if worker % 2:
                        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as resp:
                            lines = [x for x in resp.iter_lines() if x.startswith("data: ")]
                        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1])
                        ok = resp.status_code == 200 and lines[-1] == "data: [DONE]"
                    else:
                        resp = c.post("/v1/completions", json=body)
                        ok = resp.status_code == 200
                        text = resp.json()["choices"][0]["text"] if ok else None
                    if not ok or text != expected[prompt]:
                        fail(f"valid {prompt!r}: {resp.status_code} {text!r} != {expected[prompt]!r}")
                    count("valid")
                    # 2. an invalid request
                    bad, status = INVALID[(worker * ROUNDS + r) % len(INVALID)]
                    path = "/v1/chat/completions" if "messages" in bad else "/v1/completions"
                    resp = c.post(path, json=bad)
                    if resp.status_code != status or "error" not in resp.json():
                        fail(f"invalid {bad}: {resp.status_code} {resp.text[:200]}")
                    count("invalid")
                    # 3. a stream cancelled after its first chunk
                    long = body | {"max_tokens": 60, "stream": True, "temperature": 1.0, "seed": r}
                    with c.stream("POST", "/v1/completions", json=long) as resp:
                        for line in resp.iter_lines():
                            if line.startswith("data: "):
                                break
                    count("cancelled")
                    # 4. an oversized body, every other round
                    if r % 2 == 0:
                        with httpx.Client(
                            base_url=base, timeout=60
                        ) as fresh:  # the 413 closes its connection
                            resp = fresh.post(
                                "/v1/completions",
                                content=b" " * (BODY_LIMIT + 1),
                                headers={"content-type": "application/json"},
                            )
                        if resp.status_code != 413:
                            fail(f"oversized: {resp.status_code}")
                        count("oversized")

        # Warm up (first-call allocations, thread pools), then take the baseline.
        for kind in range(2):
            client_run(kind)
        gc.collect()
        baseline = _rss_mb()
        t0 = time.monotonic()
        threads = [threading.Thread(target=client_run, args=(w,)) for w in range(NUM_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        elapsed = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not failures, failures[:5]
        deadline = time.monotonic() + 20
        while (engine.admitted or engine.stats.active) and time.monotonic() < deadline:
            time.sleep(0.05)
        health = server.get("/health").json()
        assert health["status"] == "ok" and health["active"] == 0 and engine.admitted == 0
        assert health["errors"] == 0
        gc.collect()
        grown = _rss_mb() - baseline
        assert grown < RSS_SLACK_MB, f"RSS grew {grown:.0f} MB under load"
        assert counts["valid"] >= NUM_CLIENTS * ROUNDS
        print(f"load: {counts} in {elapsed:.1f} s, RSS {baseline:.0f} MB -> {baseline + grown:.0f} MB")
