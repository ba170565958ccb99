"""Continuous batching in moekit serve: a request gets the same tokens batched as alone (greedy and
seeded sampling), whoever joins or leaves its batch; the batched step equals the batch-1 step."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time

import pytest
import torch

from moekit.blocks import RaggedKVCache
from moekit.models import MoEForCausalLM
from moekit.models.batch_decode import DecodeBatch, batch_decode_supported
from moekit.models.decode import DecodeSession
from moekit.models.generation import Sampler
from moekit.models.presets import moe_tiny

MLA = dict(
    attention_type="mla",
    qk_norm="none",
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
)
# Per-layer mask types: gpt_oss (sliding and full layers, attention sinks) and llama4 (chunked and
# full layers); windows and chunks of 4 so the prompts and steps below cross several of them.
SLIDING_FULL = {"sliding_window": 4, "attention_layer_types": ("sliding", "full"), "attention_sinks": True}
CHUNKED = {"attention_chunk_size": 4, "attention_layer_types": ("chunked", "full")}
PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 4, 6], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30]]


def _model(dtype=torch.float64, **changes) -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(moe_tiny().replace(**changes)).to(dtype).eval()


# -- the ragged cache, by hand --


def test_ragged_cache_writes_each_row_at_its_own_length_and_masks_the_rest():
    cache = RaggedKVCache(num_layers=1, chunk_size=4)
    k_a, k_b = torch.full((1, 1, 2, 1), 1.0), torch.full((1, 1, 5, 1), 2.0)
    assert cache.add_row([k_a], [k_a]) == 0 and cache.add_row([k_b], [k_b]) == 1
    assert cache.lengths == [2, 5] and cache.capacity == 8  # grew to a multiple of the chunk
    new = torch.tensor([10.0, 20.0]).view(2, 1, 1, 1)
    keys, _ = cache.update(0, new, new)
    assert keys.shape == (2, 1, 6, 1)  # the longest row (5) plus the new token
    assert keys[0, 0, :, 0].tolist() == [1, 1, 10, 0, 0, 0]
    assert keys[1, 0, :, 0].tolist() == [2, 2, 2, 2, 2, 20]
    assert cache.mask()[:, 0, 0].tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert cache.mask(sliding_window=2)[1, 0, 0].tolist() == [False] * 4 + [True] * 2
    cache.advance()
    cache.keep_rows([1])  # row 0 leaves; row 1 is now row 0
    assert cache.lengths == [6] and cache.keys[0][0, 0, :6, 0].tolist() == [2, 2, 2, 2, 2, 20]
    keys, _ = cache.update(0, torch.full((1, 1, 1, 1), 30.0), torch.zeros(1, 1, 1, 1))  # a lone row
    assert keys[0, 0, :, 0].tolist() == [2, 2, 2, 2, 2, 20, 30]
    cache.advance()
    assert cache.lengths == [7] and cache.lengths_B.tolist() == [7]


# -- the batched step against batch-1 sessions, float64 --


def _solo_logits(model, prompt, tokens, fast):
    """Logits of a batch-1 session after its prefill and after each of ``tokens``."""
    session = DecodeSession(model, torch.tensor([prompt]), max_new_tokens=len(tokens))
    if fast is not None:
        session.fast = fast
    out = [session.prefill()[0]]
    out += [session.step(torch.tensor([t]))[0] for t in tokens]
    return out


@pytest.mark.parametrize(
    "changes, fast, path",
    [
        ({}, True, "fast"),
        ({}, False, "general"),
        ({"sliding_window": 4}, None, "general"),
        (MLA, None, "general"),  # the ragged cache holds MLA's latent and rotary key instead
        (SLIDING_FULL, None, "general"),
        (CHUNKED, None, "general"),
    ],
    ids=["fast", "general", "sliding-window", "mla", "sliding-full-sinks", "chunked"],
)
def test_batched_step_equals_single_row_step_float64(changes, fast, path):
    model = _model(**changes)
    steps = 6
    gen = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 512, (steps,), generator=gen).tolist() for _ in PROMPTS]
    want = [_solo_logits(model, p, t, fast) for p, t in zip(PROMPTS, tokens, strict=True)]
    batch = DecodeBatch(model)
    if fast is not None:  # None: the model's own choice
        batch.fast = fast
    # Row 0 starts alone, row 1 joins at step 1, row 2 at 2, row 1 leaves after step 3, row 3
    # joins at 4.
    joins, leave = {0: [0], 1: [1], 2: [2], 4: [3]}, {3: 1}
    rows, done = [], dict.fromkeys(range(len(PROMPTS)), 0)
    worst = 0.0
    for t in range(steps):
        for r in joins.get(t, []):
            session = DecodeSession(model, torch.tensor([PROMPTS[r]]))
            first = session.prefill()[0]
            assert torch.allclose(first, want[r][0], rtol=0, atol=1e-12)
            batch.join(session)
            rows.append(r)
        next_B = torch.tensor([tokens[r][done[r]] for r in rows])
        logits_BV = batch.step(next_B)
        assert batch.last_path == path
        for i, r in enumerate(rows):
            done[r] += 1
            worst = max(worst, float((logits_BV[i] - want[r][done[r]]).abs().max()))
        if t in leave:
            gone = rows.index(leave[t])
            batch.keep([i for i in range(len(rows)) if i != gone])
            rows.pop(gone)
    assert worst < 1e-10, worst
    assert batch.num_rows == 3 and batch.num_steps == steps


def test_batch_refuses_models_whose_rows_compete_for_experts():
    for moe_change in ({"capacity_factor": 1.0}, {"router_type": "expert_choice"}):
        cfg = moe_tiny()
        cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, **moe_change))
        model = MoEForCausalLM(cfg).eval()
        assert not batch_decode_supported(model)
        with pytest.raises(ValueError, match="one at a time"):
            DecodeBatch(model)
    assert batch_decode_supported(_model())


# -- the scheduler, ticked by hand: deterministic joins, leaves and cancellations --


def _scheduler(model, max_batch=8, prefill_chunk=None):
    from moekit.infer.server_batch import BatchScheduler
    from moekit.infer.server_engine import ServerStats

    return BatchScheduler(
        model,
        vision=False,
        eos_token_id=-1,
        max_batch=max_batch,
        call=None,
        stats=ServerStats(),
        prefill_chunk=prefill_chunk,
    )


def _row(prompt, max_tokens, temperature=0.0, top_p=None, seed=0):
    from moekit.infer.server_batch import BatchRow

    sampler = Sampler(temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(seed))
    return BatchRow(prompt, sampler, max_tokens, want_logprobs=False)


def _run(scheduler, schedule, num_ticks=40):
    """Ticks ``scheduler``; ``schedule[t]`` is a list of ``("join", key, row)`` / ``("cancel", key)``
    done before tick t. Returns each key's tokens."""
    got, rows = {}, {}
    for t in range(num_ticks):
        for action, key, *row in schedule.get(t, []):
            if action == "join":
                rows[key] = row[0]
                got[key] = []
                scheduler.waiting.append(row[0])
            else:
                rows[key].cancelled = True
        if t > max(schedule) and not (scheduler.rows or scheduler.waiting or scheduler.prefilling):
            break
        for row, item in scheduler.tick():
            if item is not None:
                key = next(k for k, r in rows.items() if r is row)
                got[key].append(item[0])
    return got


ROW_KINDS = {  # key: (prompt, max_tokens, temperature, top_p, seed)
    "greedy-a": (PROMPTS[0], 12, 0.0, None, 0),
    "greedy-b": (PROMPTS[1], 5, 0.0, None, 0),
    "sampled-a": (PROMPTS[2], 12, 1.0, None, 7),
    "sampled-b": (PROMPTS[3], 9, 0.8, 0.9, 8),
    "sampled-c": (PROMPTS[0], 12, 1.0, None, 9),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_rows_get_their_solo_tokens_whoever_joins_or_leaves(dtype):
    model = _model(dtype)
    alone = {k: _run(_scheduler(model), {0: [("join", k, _row(*v))]})[k] for k, v in ROW_KINDS.items()}
    assert {len(t) for k, t in alone.items()} == {12, 5, 9}
    # greedy-b finishes (max_tokens) mid-batch, sampled-b joins late, sampled-c is cancelled
    # after its third token, greedy-a joins a full batch (max_batch 3) and waits for a place.
    schedule = {
        0: [("join", k, _row(*ROW_KINDS[k])) for k in ("greedy-b", "sampled-a", "sampled-c")],
        2: [("join", "greedy-a", _row(*ROW_KINDS["greedy-a"]))],
        3: [("cancel", "sampled-c")],
        6: [("join", "sampled-b", _row(*ROW_KINDS["sampled-b"]))],
    }
    scheduler = _scheduler(model, max_batch=3)
    got = _run(scheduler, schedule)
    for key in ("greedy-a", "greedy-b", "sampled-a", "sampled-b"):
        assert got[key] == alone[key], key
    # cancelled before tick 3: it got its prefill token and three steps' tokens, then left
    assert got["sampled-c"] == alone["sampled-c"][:4]
    stats = scheduler.batch_stats
    assert stats.largest == 3 and stats.prefills == 5
    assert scheduler.batch.last_path == "fast" and not scheduler.rows and not scheduler.waiting


# -- over HTTP: concurrent requests against the same requests one at a time --

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n" * 20


@contextlib.contextmanager
def _serve(model, tok, **config):
    import uvicorn

    from moekit.infer.server import ServerConfig, create_app

    app = create_app(model, tok, ServerConfig(model_name="tiny", **config))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = srv.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            client.app = app
            yield client
    finally:
        srv.should_exit = True
        thread.join(10)


httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def served():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from moekit.data.tokenizer import train_tokenizer

    tok = train_tokenizer([TEXT], vocab_size=300)
    return _model(torch.float64), tok


def _bodies():
    out = []
    for i in range(8):
        body = {"model": "tiny", "prompt": ["def ", "class Point:", "return a", "x = 1\n"][i % 4]}
        body |= {"max_tokens": 6 + 2 * i, "temperature": 0.0 if i % 2 == 0 else 0.9, "seed": 100 + i}
        if i % 4 == 3:
            body |= {"top_p": 0.8, "stream": True}
        if i % 4 == 1:
            body["stop"] = ["s", "="]
        if i % 4 == 2:
            body["logprobs"] = 2
        out.append(body)
    return out


def _post(client, body) -> dict:
    """A completion's ``text``, ``usage``, ``finish_reason`` and ``logprobs``, streamed or not."""
    if not body.get("stream"):
        choice, usage = (out := client.post("/v1/completions", json=body).json())["choices"][0], out["usage"]
        return {
            "text": choice["text"],
            "usage": usage,
            "finish": choice["finish_reason"],
            "lp": choice["logprobs"],
        }
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    return {
        "text": text,
        "usage": chunks[-1]["usage"],
        "finish": chunks[-1]["choices"][0]["finish_reason"],
        "lp": None,
    }


@pytest.mark.parametrize("prefill_chunk", [None, 2], ids=["one-go", "chunked"])
def test_concurrent_requests_get_their_sequential_tokens(served, prefill_chunk):
    model, tok = served
    bodies = _bodies()
    with _serve(model, tok, token_delay_s=0.02, prefill_chunk=prefill_chunk) as client:
        alone = [_post(client, b) for b in bodies]
        assert client.get("/health").json()["batch"]["largest"] == 1
        together = [None] * len(bodies)

        def send(i):
            together[i] = _post(client, bodies[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        health = client.get("/health").json()
    for a, b in zip(alone, together, strict=True):
        assert (a["text"], a["usage"], a["finish"]) == (b["text"], b["usage"], b["finish"])
        if a["lp"] is not None:  # float64: the batched step's log-probabilities are the solo ones
            assert a["lp"]["tokens"] == b["lp"]["tokens"] and a["lp"]["text_offset"] == b["lp"]["text_offset"]
            assert a["lp"]["token_logprobs"] == pytest.approx(b["lp"]["token_logprobs"], abs=1e-9)
    assert any(a["lp"] for a in alone)
    assert [a["finish"] for a in alone].count("stop") >= 1  # a stop sequence cut one
    assert health["batch"]["largest"] >= 4, health  # they really shared steps
    if prefill_chunk:  # the prompts (3-4 tokens) took two chunks each
        assert health["batch"]["prefill_chunks"] > health["batch"]["prefills"], health
    assert health["batch"]["running"] == 0 and health["active"] == 0


def test_a_cancelled_stream_leaves_the_batch_and_the_queue_is_bounded(served):
    model, tok = served
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 30, "temperature": 0}
    with _serve(model, tok, token_delay_s=0.02, max_batch=2, max_queue=0) as client:
        want = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        result = {}

        def full():
            result["text"] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        engine = client.app.state.engine
        worker = threading.Thread(target=full)
        worker.start()
        deadline = time.monotonic() + 10
        while engine.scheduler.batch_stats.prefills < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the full request is running
        with (
            httpx.Client(base_url=client.base_url, timeout=60) as other,
            other.stream("POST", "/v1/completions", json=body | {"stream": True}) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    # two running (max_batch 2, no queue): a third is refused
                    refused = client.post("/v1/completions", json=body)
                    break
        worker.join(60)
        deadline = time.monotonic() + 10
        while (engine.scheduler.rows or engine.admitted) and time.monotonic() < deadline:
            time.sleep(0.02)
        health = client.get("/health").json()
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert result["text"] == want  # the stream that left did not change it
    assert health["cancelled"] >= 1 and health["batch"]["running"] == 0 and health["batch"]["largest"] == 2


def test_a_running_batch_gives_the_worker_to_a_waiting_call(served):
    """An echo's prompt log-probabilities (a plain worker call) run between two ticks, not after
    the batch has drained."""
    model, tok = served
    long = {"model": "tiny", "prompt": "def ", "max_tokens": 150, "temperature": 0}
    echo = {"model": "tiny", "prompt": "class Point:", "max_tokens": 1, "echo": True, "logprobs": 1}
    with _serve(model, tok, token_delay_s=0.02) as client:
        engine = client.app.state.engine
        done = {}

        def run_long():
            client.post("/v1/completions", json=long)
            done["long"] = time.monotonic()

        worker = threading.Thread(target=run_long)
        worker.start()
        deadline = time.monotonic() + 10
        while not engine.scheduler.rows and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/completions", json=echo)
        done["echo"] = time.monotonic()
        worker.join(60)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert done["echo"] < done["long"]  # 150 tokens take >= 3 s


@pytest.mark.parametrize(
    "changes",
    [
        {
            "attention_type": "moa",
            "moa_num_experts": 4,
            "moa_top_k": 2,
            "num_heads": 4,
            "qk_norm": "none",
        },  # jetmoe
        {"layer_types": ("linear", "attention"), "num_kv_heads": 4},  # minimax lightning
    ],
    ids=["moa", "lightning"],
)
def test_batch_refuses_layers_the_ragged_cache_cannot_hold(changes):
    """MoA heads and recurrent mixers decode one request at a time."""
    model = MoEForCausalLM(moe_tiny().replace(**changes)).eval()
    assert not batch_decode_supported(model)
    with pytest.raises(ValueError, match="one at a time"):
        DecodeBatch(model)
