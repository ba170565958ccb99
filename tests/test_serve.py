"""moekit serve: a real uvicorn server on 127.0.0.1 with a tiny model, driven by httpx."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

MAX_LIMIT = 400
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 20


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from moekit.data.tokenizer import save_tokenizer, train_tokenizer
    from moekit.models import MoEForCausalLM
    from moekit.models.presets import moe_tiny

    folder = tmp_path_factory.mktemp("serve") / "tiny"
    tok = train_tokenizer([TEXT], vocab_size=300)
    torch.manual_seed(0)
    MoEForCausalLM(moe_tiny()).save_pretrained(folder)
    save_tokenizer(tok, folder)
    return folder


@contextlib.contextmanager
def running_server(folder, config):
    """Serves ``folder`` with uvicorn on a free loopback port; yields an httpx client."""
    import uvicorn

    from moekit.cli.common import load_model_and_tokenizer
    from moekit.infer.server import create_app

    model, tok, _ = load_model_and_tokenizer(folder)
    app = create_app(model, tok, config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.started, "uvicorn did not start"
        port = srv.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            client.moekit_app, client.moekit_port = app, port  # for tests that script the engine
            yield client
    finally:
        srv.should_exit = True
        thread.join(10)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(model_folder):
    from moekit.infer.server import ServerConfig

    # A small per-token delay makes the cancellation test deterministic (a request of 300 tokens
    # would take >= 3 s), without slowing the short requests much.
    config = ServerConfig(model_name="tiny", max_tokens_limit=MAX_LIMIT, token_delay_s=0.01)
    with running_server(model_folder, config) as client:
        yield client


def _complete(client, **body):
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 8, "temperature": 0} | body
    return client.post("/v1/completions", json=body)


def test_models_and_health(server):
    assert server.get("/v1/models").json()["data"][0]["id"] == "tiny"
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_completion_usage_and_finish_reason(server):
    r = _complete(server, max_tokens=10)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion"
    choice, usage = out["choices"][0], out["usage"]
    assert choice["finish_reason"] in ("length", "stop")
    assert 1 <= usage["completion_tokens"] <= 10 and usage["prompt_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 10


def test_streaming_matches_non_streaming(server):
    full = _complete(server, max_tokens=12).json()
    chunks = []
    with server.stream(
        "POST",
        "/v1/completions",
        json={"model": "tiny", "prompt": "def ", "max_tokens": 12, "temperature": 0, "stream": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        chunks.append(json.loads(line[len("data: ") :]))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == full["usage"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_and_chat_streaming(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    out = server.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    with server.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == out["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == out["usage"]


def test_stop_sequence_truncates(server):
    text = _complete(server, max_tokens=16).json()["choices"][0]["text"]
    if len(text) < 4:
        pytest.skip("the tiny model ended too early to pick a stop sequence")
    stop = text[2:4]
    out = _complete(server, max_tokens=16, stop=[stop, "\u2603never"]).json()
    assert out["choices"][0]["text"] == text[: text.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_seed_reproducible_and_temperature_is_used(server):
    def sample(**body):
        r = _complete(server, max_tokens=12, **body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert sample(temperature=1.0, seed=7) == sample(temperature=1.0, seed=7)
    # If temperature (or the seed) were ignored, every sample below would be the greedy text.
    greedy = sample(temperature=0)
    sampled = {sample(temperature=1.0, seed=s) for s in range(4)}
    assert len(sampled) > 1, sampled
    assert sampled != {greedy}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "tiny", "max_tokens": 4}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": MAX_LIMIT + 1}, 400, "limit"),
        ({"model": "nope", "prompt": "x"}, 404, "nope"),
        ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n=2"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": ["a", "b"]}, 400, "one prompt"),
        ({"model": "tiny", "prompt": "x " * 200, "max_tokens": MAX_LIMIT}, 400, "context length"),
    ],
)
def test_bad_completion_requests_are_4xx(server, body, status, needle):
    r = server.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_bad_chat_and_malformed_json_are_400(server):
    r = server.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = server.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
    )
    assert r.status_code == 400
    r = server.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_disconnect_cancels_generation(server):
    before = server.get("/health").json()
    # 200 tokens at >= 10 ms each would take >= 2 s; the disconnect must end it after a few.
    body = {
        "model": "tiny",
        "prompt": "def ",
        "max_tokens": 200,
        "temperature": 1.0,
        "seed": 1,
        "stream": True,
    }
    with server.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk read, then the connection closes
    deadline = time.monotonic() + 10
    health = server.get("/health").json()
    while health["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
        health = server.get("/health").json()
    assert health["active"] == 0
    assert health["requests"] == before["requests"] + 1, (before, health)
    assert health["last_request_tokens"] < 100
    if health["last_request_tokens"] > 1:  # stopped by the disconnect, not by an early EOS
        assert health["cancelled"] == before["cancelled"] + 1
    assert _complete(server, max_tokens=3).status_code == 200  # still serving


def test_concurrent_requests_are_queued(server):
    results = []

    def worker():
        results.append(_complete(server, max_tokens=5).status_code)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200, 200, 200]


def test_compiled_server_returns_the_same_greedy_text(server, model_folder):
    from moekit.infer.server import ServerConfig

    body = {"prompt": "class Point:", "max_tokens": 12}
    expected = _complete(server, **body).json()["choices"][0]["text"]
    config = ServerConfig(model_name="tiny", max_tokens_limit=MAX_LIMIT, compile=True)
    with running_server(model_folder, config) as compiled:
        for _ in range(2):  # the second request reuses the compiled step
            r = _complete(compiled, **body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected
