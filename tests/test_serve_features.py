"""moekit serve features beyond plain text: logprobs, echo, chat message formats, and the official
``openai`` client as an oracle of the wire format."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from tests.test_serve import MAX_LIMIT, model_folder, running_server  # noqa: E402, F401


@pytest.fixture(scope="module")
def loaded(model_folder):  # noqa: F811
    from moekit.cli.common import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(model_folder)
    return model, tok


@pytest.fixture(scope="module")
def server(model_folder):  # noqa: F811
    from moekit.infer.server import ServerConfig

    with running_server(model_folder, ServerConfig(model_name="tiny", max_tokens_limit=MAX_LIMIT)) as client:
        yield client


def _joined(tokens: list[str]) -> str:
    """The text of OpenAI-style token strings (partial characters are ``bytes:\\x..``)."""
    raw = b""
    for t in tokens:
        if t.startswith("bytes:"):
            raw += bytes(int(h, 16) for h in t[len("bytes:") :].split("\\x")[1:])
        else:
            raw += t.encode("utf-8")
    return raw.decode("utf-8", "replace")


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for every position, float64, by one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return logits.log_softmax(-1)


def test_completion_logprobs_match_a_forward_pass(server, loaded):
    model, tok = loaded
    body = {"model": "tiny", "prompt": "def add", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    out = server.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    n = out["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    if choice["finish_reason"] == "length":
        assert len(lp["tokens"]) == n
    assert _joined(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    prompt_ids = tok.encode("def add").ids
    # greedy: each chosen token is the top-1 alternative, and 3 alternatives are listed
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert 1 <= len(top) <= 3 and chosen <= 0  # keyed by text: ids without text share ""
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-5)
    # the values are the model's: compare with a float64 forward over prompt + the greedy ids
    from moekit.models.generation import generate

    ids = generate(model, torch.tensor([prompt_ids]), max_new_tokens=6)[0].tolist()
    ref = _reference_logprobs(model, ids)
    for i, chosen in enumerate(lp["token_logprobs"]):
        pos = len(prompt_ids) + i
        assert abs(chosen - float(ref[pos - 1, ids[pos]])) < 1e-3


def test_echo_with_and_without_logprobs(server, loaded):
    _, tok = loaded
    body = {"model": "tiny", "prompt": "class Point:", "max_tokens": 4, "temperature": 0}
    plain = server.post("/v1/completions", json=body).json()["choices"][0]["text"]
    echoed = server.post("/v1/completions", json=body | {"echo": True}).json()["choices"][0]
    assert echoed["text"] == "class Point:" + plain
    with_lp = server.post("/v1/completions", json=body | {"echo": True, "logprobs": 1}).json()["choices"][0]
    lp = with_lp["logprobs"]
    num_prompt = len(tok.encode("class Point:").ids)
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])
    assert _joined(lp["tokens"]) == with_lp["text"]
    assert lp["text_offset"][num_prompt] == len("class Point:")
    # streaming gives the same text, prompt first
    with server.stream("POST", "/v1/completions", json=body | {"echo": True, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == "class Point:"
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed["text"]


def test_chat_logprobs_and_streaming_logprobs(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    out = server.post("/v1/chat/completions", json=body).json()
    content = out["choices"][0]["logprobs"]["content"]
    text = out["choices"][0]["message"]["content"]
    assert bytes(b for item in content for b in item["bytes"]).decode("utf-8", "replace") == text
    for item in content:
        assert len(item["top_logprobs"]) == 2
        assert math.isclose(item["logprob"], item["top_logprobs"][0]["logprob"], abs_tol=1e-5)
    with server.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [
        i for c in chunks if c["choices"][0].get("logprobs") for i in c["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == content
    no_lp = server.post("/v1/chat/completions", json=body | {"logprobs": False, "top_logprobs": None}).json()
    assert no_lp["choices"][0]["logprobs"] is None


def test_developer_role_and_content_parts(server):
    def reply(messages):
        body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0}
        r = server.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    as_string = reply([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi there"}])
    as_parts = reply(
        [
            {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        ]
    )
    assert as_parts == as_string


def test_openai_client_as_oracle(model_folder):  # noqa: F811
    openai = pytest.importorskip("openai")
    from moekit.infer.server import ServerConfig

    config = ServerConfig(model_name="tiny", max_tokens_limit=MAX_LIMIT, api_key="k3y")
    with running_server(model_folder, config) as client:
        base = f"http://127.0.0.1:{client.moekit_port}/v1"
        oa = openai.OpenAI(base_url=base, api_key="k3y", max_retries=0, timeout=60)
        comp = oa.completions.create(model="tiny", prompt="def ", max_tokens=5, temperature=0, logprobs=2)
        assert comp.choices[0].finish_reason in ("length", "stop")
        assert _joined(comp.choices[0].logprobs.tokens) == comp.choices[0].text
        chat = oa.chat.completions.create(
            model="tiny",
            messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}],
            max_completion_tokens=5,
            temperature=0,
        )
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.completion_tokens <= 5
        pieces = [
            c.choices[0].delta.content or ""
            for c in oa.chat.completions.create(
                model="tiny",
                messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": "hi"}],
                max_completion_tokens=5,
                temperature=0,
                stream=True,
            )
            if c.choices
        ]
        assert "".join(pieces) == chat.choices[0].message.content
        assert [m.id for m in oa.models.list()] == ["tiny"]
        with pytest.raises(openai.BadRequestError) as info:
            oa.completions.create(model="tiny", prompt="x", max_tokens=MAX_LIMIT + 1)
        assert info.value.param == "max_tokens" and "limit" in info.value.message
        with pytest.raises(openai.NotFoundError):
            oa.completions.create(model="other", prompt="x", max_tokens=2)
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.BadRequestError) as info:
            oa.completions.create(model="tiny", prompt="x", max_tokens=2, seed=2**64)
        assert info.value.param == "seed"
