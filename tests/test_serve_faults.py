"""moekit serve under bad requests and faults: every error is a 4xx in OpenAI's shape, never a 500
that closes the connection, never a cut stream; bounded bodies, queue and context; API keys."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from tests.test_serve import MAX_LIMIT, model_folder, running_server  # noqa: E402, F401

BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def tok(model_folder):  # noqa: F811
    from moekit.data.tokenizer import load_tokenizer

    return load_tokenizer(model_folder)


@pytest.fixture(scope="module")
def server(model_folder):  # noqa: F811
    from moekit.infer.server import ServerConfig

    # One request at a time (max_batch=1), so "one runs, one waits" fills the queue of one; the
    # batched bound (max_batch + max_queue) is tested in tests/test_server_batching.py.
    config = ServerConfig(
        model_name="tiny", max_tokens_limit=MAX_LIMIT, max_body_bytes=BODY_LIMIT, max_queue=1, max_batch=1
    )
    with running_server(model_folder, config) as client:
        yield client


@pytest.fixture
def scripted(server, monkeypatch):
    """Replaces the engine's token source: ``scripted(ids, delay)`` makes every request emit ``ids``."""
    engine = server.moekit_app.state.engine

    def install(ids, delay=0.0, fail_at=None):
        def start(prompt_ids, body, max_tokens, want_logprobs):
            def tokens():
                for i, t in enumerate(ids[:max_tokens]):
                    if fail_at == i:
                        raise RuntimeError("injected fault")
                    time.sleep(delay)
                    yield t, None

            return tokens()

        monkeypatch.setattr(engine, "start", start)

    return install


def _post(client, path, body, **kw):
    return client.post(path, json=body, **kw)


def _completion(**body):
    return {"model": "tiny", "prompt": "def ", "max_tokens": 8, "temperature": 0} | body


def _chat(**body):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8} | body


def _stream_events(client, path, body):
    with client.stream("POST", path, json=body | {"stream": True}) as r:
        status = r.status_code
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return status, [json.loads(line[6:]) for line in lines[:-1]]


def _assert_openai_error(r, status, param="__any__", code="__any__"):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param != "__any__":
        assert body["error"]["param"] == param, body
    if code != "__any__":
        assert body["error"]["code"] == code, body
    return body["error"]


# -- wrong results with no error: a stop sequence plus EOS must not drop the held-back tail --


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_then_eos_keeps_the_held_back_tail(server, scripted, tok, stream):
    from moekit.data.tokenizer import special_token_id

    ids = tok.encode("return a\n").ids
    assert tok.decode(ids) == "return a\n"
    scripted(ids + [special_token_id(tok)] + ids)
    body = _completion(stop=["\n\n"], max_tokens=20)
    if stream:
        status, chunks = _stream_events(server, "/v1/completions", body)
        text = "".join(c["choices"][0]["text"] for c in chunks)
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        out = _post(server, "/v1/completions", body).json()
        text, finish = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
    assert text == "return a\n"
    assert finish == "stop"
    # the chat endpoint shares the path
    out = _post(server, "/v1/chat/completions", _chat(stop="\n\n", max_tokens=20)).json()
    assert out["choices"][0]["message"]["content"] == "return a\n"


def test_stop_sequence_across_tokens_still_cuts(server, scripted, tok):
    ids = tok.encode("return a\n\nclass").ids
    scripted(ids)
    out = _post(server, "/v1/completions", _completion(stop=["\n\n"], max_tokens=20)).json()
    assert out["choices"][0]["text"] == "return a" and out["choices"][0]["finish_reason"] == "stop"


# -- no 500s: strict types, seeds, surrogates --


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [2**64, 2**63, -1, 1.5, "7", True])
def test_bad_seeds_are_400_also_when_streaming(server, seed, stream):
    r = _post(server, "/v1/completions", _completion(seed=seed, stream=stream, temperature=1.0))
    _assert_openai_error(r, 400, param="seed")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "5"),
        ("max_tokens", True),
        ("max_tokens", 5.0),
        ("stream", "yes"),
        ("stream", 1),
        ("temperature", "0.5"),
        ("temperature", True),
        ("top_p", None),
        ("n", "1"),
        ("model", 3),
        ("stop", 3),
        ("logprobs", True),
        ("echo", "true"),
    ],
)
def test_field_types_are_strict(server, field, value):
    r = _post(server, "/v1/completions", _completion(**{field: value}))
    _assert_openai_error(r, 400, param=field)


def test_int_is_accepted_for_float_fields(server):
    r = _post(server, "/v1/completions", _completion(temperature=0, top_p=1, max_tokens=2))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'),
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
        ),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}'),
    ],
)
def test_lone_surrogates_are_400(server, path, raw):
    r = server.post(path, content=raw, headers={"content-type": "application/json"})
    _assert_openai_error(r, 400)


def test_surrogate_check_also_guards_direct_validation():
    from moekit.infer.server_requests import CompletionRequest

    with pytest.raises(ValueError, match="lone surrogate"):
        CompletionRequest.model_validate({"model": "tiny", "prompt": "a\ud800"})


# -- every error in OpenAI's shape --


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny", "prompt": "x",,}',
        b"{not json",
        b"",
        b"[1, 2]",
        b'{"model": "tiny", "prompt": "\xff\xfe"}',
    ],
)
def test_malformed_and_non_utf8_bodies(server, raw):
    r = server.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    err = _assert_openai_error(r, 400)
    assert err["param"] is None or not err["param"].isdigit(), err  # never a character position


def test_404_405_and_missing_fields_are_openai_errors(server):
    err = _assert_openai_error(server.get("/v1/nothing"), 404, code="not_found")
    assert "/v1/nothing" in err["message"]
    _assert_openai_error(server.get("/v1/completions"), 405, code="method_not_allowed")
    _assert_openai_error(server.post("/health"), 405)
    err = _assert_openai_error(_post(server, "/v1/completions", {"model": "tiny"}), 400, param="prompt")
    _assert_openai_error(_post(server, "/v1/completions", _completion(model="nope")), 404, param="model")
    err = _assert_openai_error(
        _post(server, "/v1/chat/completions", _chat(messages=[{"role": "robot", "content": "x"}])), 400
    )
    assert err["param"] == "messages.0.role"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 6}, "logprobs"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ],
)
def test_unimplemented_fields_are_refused_not_ignored(server, body, param):
    err = _assert_openai_error(_post(server, "/v1/completions", _completion(**body)), 400)
    assert param in err["message"]


def test_chat_unimplemented_fields(server):
    err = _assert_openai_error(_post(server, "/v1/chat/completions", _chat(top_logprobs=2)), 400)
    assert "logprobs" in err["message"]
    r = _post(server, "/v1/chat/completions", _chat(tools=[{"type": "function"}]))
    _assert_openai_error(r, 400, param="tools")
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    _assert_openai_error(
        _post(server, "/v1/chat/completions", _chat(messages=[{"role": "user", "content": image}])), 400
    )


def test_a_500_keeps_the_connection_and_a_failing_stream_ends_cleanly(server, scripted, tok):
    scripted(tok.encode("return a + b").ids, fail_at=2)
    conn = http.client.HTTPConnection("127.0.0.1", server.moekit_port, timeout=30)
    body = json.dumps(_completion()).encode()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    first = conn.getresponse()
    payload = json.loads(first.read())
    sock = conn.sock
    assert first.status == 500 and payload["error"]["type"] == "server_error", payload
    assert sock is not None and first.getheader("connection") != "close"
    conn.request("GET", "/health")
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read())["errors"] >= 1
    assert conn.sock is sock  # the same keep-alive connection
    conn.close()

    status, chunks = _stream_events(server, "/v1/completions", _completion())
    assert status == 200
    assert chunks[-1]["error"]["type"] == "server_error"
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == tok.decode(
        tok.encode("return a + b").ids[:2]
    )


# -- max_tokens defaults and context --


def test_chat_default_max_tokens_is_the_room_left(server):
    # moe-tiny has 256 positions, less than the server's max_tokens limit: the default must fit.
    r = _post(
        server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] <= 256
    r = _post(server, "/v1/chat/completions", _chat(max_tokens=None, max_completion_tokens=3, temperature=0))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3
    err = _assert_openai_error(
        _post(server, "/v1/chat/completions", _chat(max_tokens=None, max_completion_tokens=250)), 400
    )
    assert err["param"] == "max_completion_tokens" and err["code"] == "context_length_exceeded"


def test_completion_default_max_tokens_clamped_to_room(server, tok):
    prompt = "x " * 250
    n = len(tok.encode(prompt).ids)
    assert 240 < n < 256
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] <= 256


def test_max_context_above_positions_is_refused(model_folder):  # noqa: F811
    from moekit.cli.common import load_model_and_tokenizer
    from moekit.cli.main import main
    from moekit.infer.server import ServerConfig, create_app

    model, tok, _ = load_model_and_tokenizer(model_folder)
    with pytest.raises(ValueError, match="max_context=4096 exceeds the model's 256 positions"):
        create_app(model, tok, ServerConfig(model_name="tiny", max_context=4096))
    assert main(["serve", "--model", str(model_folder), "--max-context", "4096", "--port", "0"]) == 2


# -- bounded requests --


def test_oversized_body_is_413_before_it_is_read(server):
    _assert_openai_error(
        server.post(
            "/v1/completions", content=b"x" * (BODY_LIMIT + 1), headers={"content-type": "application/json"}
        ),
        413,
        code="request_too_large",
    )
    # An 18 MB Content-Length is refused from the headers alone: send 1 KB of it, read the answer.
    with socket.create_connection(("127.0.0.1", server.moekit_port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 18000000\r\n\r\n" + b" " * 1024
        )
        reply = b""
        while b'"request_too_large"' not in reply and time.monotonic() - t0 < 5:
            more = s.recv(65536)
            if not more:
                break
            reply += more
        reply = reply.decode()
        assert reply.startswith("HTTP/1.1 413"), reply
        assert time.monotonic() - t0 < 5
        assert '"request_too_large"' in reply

    def chunks():
        for _ in range(BODY_LIMIT // 4096 + 4):
            yield b" " * 4096

    r = server.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _assert_openai_error(r, 413)
    assert _post(server, "/v1/completions", _completion(max_tokens=2)).status_code == 200


def test_prompt_too_long_to_fit_is_refused_without_tokenizing(server, monkeypatch):
    engine = server.moekit_app.state.engine

    def never(text):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(engine, "_encode", never)
    prompt = "y" * (engine.max_context * engine.max_token_bytes + 1)
    assert len(json.dumps(_completion(prompt=prompt))) < BODY_LIMIT
    err = _assert_openai_error(_post(server, "/v1/completions", _completion(prompt=prompt)), 400)
    assert err["code"] == "context_length_exceeded"


def test_tokenization_runs_off_the_event_loop(server, monkeypatch):
    engine = server.moekit_app.state.engine
    real = engine._encode

    def slow(text):
        time.sleep(1.5)  # a long prompt taking its time in the tokenizer
        return real(text)

    monkeypatch.setattr(engine, "_encode", slow)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(r=_post(server, "/v1/completions", _completion(max_tokens=2)))
    )
    worker.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert server.get("/health").status_code == 200
    waited = time.monotonic() - t0
    worker.join(30)
    assert result["r"].status_code == 200
    assert waited < 0.8, f"/health waited {waited:.2f} s behind tokenization"


def test_full_queue_answers_429_with_retry_after(server, scripted, tok):
    scripted(tok.encode("return a + b\n" * 3).ids, delay=0.15)  # >= 1.5 s per request
    results = []

    def slow_request():
        results.append(_post(server, "/v1/completions", _completion(max_tokens=10)).status_code)

    threads = [threading.Thread(target=slow_request) for _ in range(2)]  # one runs, one waits
    for t in threads:
        t.start()
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while server.moekit_app.state.engine.admitted < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = _post(server, "/v1/completions", _completion(max_tokens=10))
    err = _assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 1 and "busy" in err["message"]
    for t in threads:
        t.join(30)
    assert results == [200, 200]
    assert server.moekit_app.state.engine.admitted == 0
    assert server.get("/health").json()["rejected_busy"] >= 1
    assert _post(server, "/v1/completions", _completion(max_tokens=2)).status_code == 200


def test_queue_places_are_freed_by_errors_and_cancelled_streams(server, scripted, tok):
    engine = server.moekit_app.state.engine
    for _ in range(4):
        _post(server, "/v1/completions", _completion(seed=-1))
        server.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    scripted(tok.encode("return a + b\n" * 3).ids, delay=0.1)
    for _ in range(3):
        with server.stream("POST", "/v1/completions", json=_completion(max_tokens=20, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
    deadline = time.monotonic() + 10
    while engine.admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.admitted == 0


# -- access --


def test_api_key(model_folder, monkeypatch):  # noqa: F811
    from moekit.infer.server import ServerConfig

    with running_server(model_folder, ServerConfig(model_name="tiny", api_key="sekret")) as client:
        body = _completion(max_tokens=2)
        err = _assert_openai_error(client.post("/v1/completions", json=body), 401, code="invalid_api_key")
        assert "Bearer" in err["message"]
        bad = {"Authorization": "Bearer wrong"}
        _assert_openai_error(client.post("/v1/completions", json=body, headers=bad), 401)
        _assert_openai_error(client.get("/v1/models", headers={"Authorization": "sekret"}), 401)
        good = {"Authorization": "Bearer sekret"}
        assert client.post("/v1/completions", json=body, headers=good).status_code == 200
        assert client.get("/health").status_code == 200  # open for load balancers


def test_cli_api_key_from_env_and_warning_beyond_loopback(model_folder, monkeypatch, capsys):  # noqa: F811
    import argparse

    import uvicorn

    from moekit.cli import serve

    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("example.com")
    monkeypatch.setenv("MOEKIT_API_KEY", "from-env")
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    assert p.parse_args(["--model", "m"]).api_key == "from-env"
    monkeypatch.delenv("MOEKIT_API_KEY")
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    args = p.parse_args(["--model", str(model_folder), "--host", "0.0.0.0"])
    assert serve.run(args) == 0
    assert "WITHOUT an API key" in capsys.readouterr().err
    args = p.parse_args(["--model", str(model_folder), "--host", "0.0.0.0", "--api-key", "k"])
    assert serve.run(args) == 0
    assert "WITHOUT" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="99999"):
        serve.run(p.parse_args(["--model", str(model_folder), "--port", "99999"]))
