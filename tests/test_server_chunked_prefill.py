"""Chunked prefill in continuous batching: a prompt prefilled a chunk at a time equals the one-shot
prefill, running rows keep getting a token every tick while a long prompt is read, and every
request gets the tokens it gets alone (greedy and seeded), whoever joins or leaves."""

from __future__ import annotations

import pytest
import torch

from moekit.models.batch_decode import ChunkedPrefill, DecodeBatch
from moekit.models.decode import DecodeSession
from tests.test_server_batching import (
    CHUNKED,
    MLA,
    SLIDING_FULL,
    _model,
    _row,
    _run,
    _scheduler,
    _solo_logits,
)

LONG = [(7 * i + 3) % 500 + 1 for i in range(50)]  # 50 tokens: 13 chunks of 4, 50 of 1


@pytest.mark.parametrize(
    "changes",
    [{}, {"sliding_window": 4}, MLA, SLIDING_FULL, CHUNKED],
    ids=["plain", "sliding-window", "mla", "sliding-full-sinks", "chunked-attention"],
)
@pytest.mark.parametrize("chunk", [1, 3, 16, 50, 64, None])
def test_chunked_prefill_equals_one_shot_prefill_float64(changes, chunk):
    model = _model(**changes)
    ids = torch.tensor([LONG])
    one_shot = DecodeSession(model, ids)
    want = one_shot.prefill()
    pre = ChunkedPrefill(model, ids, chunk)
    chunks = []
    while pre.remaining:
        chunks.append(pre.next_chunk)
        logits = pre.run_chunk()
        assert (logits is None) == bool(pre.remaining)
    assert sum(chunks) == len(LONG) and max(chunks) <= (chunk or len(LONG))
    assert pre.num_chunks == -(-len(LONG) // (chunk or len(LONG)))
    assert torch.allclose(logits, want, rtol=0, atol=1e-12)
    for a, b in zip(
        pre.cache.keys + pre.cache.values, one_shot.cache.keys + one_shot.cache.values, strict=True
    ):
        assert torch.allclose(a[:, :, : len(LONG)], b[:, :, : len(LONG)], rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="already prefilled"):
        pre.run_chunk()
    # The chunked cache decodes on in a batch exactly like the one-shot session alone.
    tokens = [5, 17, 400]
    solo = _solo_logits(model, LONG, tokens, None)
    batch = DecodeBatch(model)
    other = DecodeSession(model, torch.tensor([[9, 8, 7]]))
    other.prefill()
    batch.join(other)
    assert batch.join(pre) == 1
    for i, t in enumerate(tokens):
        logits_BV = batch.step(torch.tensor([1, t]))
        assert torch.allclose(logits_BV[1], solo[i + 1], rtol=0, atol=1e-10)


def test_a_half_prefilled_prompt_cannot_join_and_bad_chunks_are_refused():
    model = _model()
    pre = ChunkedPrefill(model, torch.tensor([LONG]), 8)
    pre.run_chunk()
    with pytest.raises(ValueError, match="42 prompt tokens are not prefilled"):
        DecodeBatch(model).join(pre)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        ChunkedPrefill(model, torch.tensor([LONG]), 0)
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        _scheduler(model, prefill_chunk=0)


ROWS = {  # key: (prompt, max_tokens, temperature, top_p, seed)
    "greedy-a": ([5, 9, 3], 30, 0.0, None, 0),
    "sampled-a": ([11, 12, 13, 14, 15, 16, 17], 30, 1.0, None, 7),
    "long-greedy": (LONG, 8, 0.0, None, 0),
    "long-sampled": (LONG[::-1], 10, 0.9, 0.9, 3),
    "short": ([30], 6, 0.8, None, 8),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_rows_get_their_solo_tokens_whoever_joins_or_leaves(dtype, chunk):
    model = _model(dtype)

    def alone(key, prefill_chunk):
        return _run(
            _scheduler(model, prefill_chunk=prefill_chunk), {0: [("join", key, _row(*ROWS[key]))]}, 120
        )[key]

    solo = {k: alone(k, chunk) for k in ROWS}
    if dtype == torch.float64:  # chunking changes no token: the same as prefilling in one go
        assert solo == {k: alone(k, None) for k in ROWS}
    # Two rows run; two long prompts join (the second while the first is still being read),
    # a short one joins mid-way, and the sampled running row is cancelled before tick 19.
    schedule = {
        0: [("join", k, _row(*ROWS[k])) for k in ("greedy-a", "sampled-a")],
        3: [("join", "long-greedy", _row(*ROWS["long-greedy"]))],
        5: [("join", "long-sampled", _row(*ROWS["long-sampled"]))],
        6: [("join", "short", _row(*ROWS["short"]))],
        19: [("cancel", "sampled-a")],
    }
    scheduler = _scheduler(model, max_batch=4, prefill_chunk=chunk)
    got = _run(scheduler, schedule, 200)
    for key in ("greedy-a", "long-greedy", "long-sampled", "short"):
        assert got[key] == solo[key], key
    # cancelled before tick 19: a prefix (how long depends on when its own chunks ran)
    assert 0 < len(got["sampled-a"]) < 30 and got["sampled-a"] == solo["sampled-a"][: len(got["sampled-a"])]
    stats = scheduler.batch_stats
    assert stats.prefills == 5 and stats.largest >= 2
    assert not (scheduler.rows or scheduler.prefilling or scheduler.waiting)


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_running_rows_get_a_token_every_tick_while_a_long_prompt_is_read(chunk):
    model = _model()
    scheduler = _scheduler(model, prefill_chunk=chunk)
    running = [_row([5, 9, 3], 200), _row([7, 1, 2], 200, temperature=1.0, seed=4)]
    scheduler.waiting.extend(running)
    while len(scheduler.rows) < 2:  # both prefill (3 tokens each) and start decoding
        scheduler.tick()
    assert scheduler.rows == running
    chunks_before = scheduler.batch_stats.prefill_chunks
    long = _row(LONG, 4)
    scheduler.waiting.append(long)
    num_ticks = -(-len(LONG) // chunk)
    for t in range(num_ticks):
        emitted = scheduler.tick()
        # every running row got exactly one token this tick; the long prompt's first token comes
        # with its last chunk, not before
        assert [r for r, item in emitted if r in running] == running
        assert any(r is long for r, _ in emitted) == (t == num_ticks - 1)
        assert scheduler.batch_stats.prefill_chunks == chunks_before + t + 1
    assert long in scheduler.rows
    # without chunking the same join is one tick: the running rows wait for the whole prompt
    one_go = _scheduler(model)
    one_go.waiting.extend([_row([5, 9, 3], 200), _row(LONG, 4)])
    one_go.tick()
    assert one_go.batch_stats.prefill_chunks == 2 and len(one_go.rows) == 2


def test_short_prompts_share_a_ticks_budget_in_whole_chunks():
    model = _model()
    scheduler = _scheduler(model, prefill_chunk=8)
    rows = [_row([1, 2, 3], 5), _row([4, 5, 6, 7], 5), _row(LONG[:10], 5), _row([8], 5)]
    scheduler.waiting.extend(rows)
    scheduler.tick()  # 3 + 4 tokens fit in 8; LONG[:10]'s first chunk (8) does not
    assert scheduler.rows == rows[:2] and scheduler.batch_stats.prefill_chunks == 2
    scheduler.tick()  # its first chunk alone
    assert scheduler.rows == rows[:2] and scheduler.prefilling[0][1].remaining == 2
    scheduler.tick()  # its last 2 tokens and the 1-token prompt
    assert scheduler.rows == rows and not scheduler.prefilling


def test_a_prompt_cancelled_while_it_is_read_leaves_without_a_token():
    model = _model()
    scheduler = _scheduler(model, prefill_chunk=4)
    keep, gone = _row([5, 9, 3], 30), _row(LONG, 4)
    want = _run(_scheduler(model, prefill_chunk=4), {0: [("join", "k", _row([5, 9, 3], 30))]})["k"]
    got = _run(scheduler, {0: [("join", "k", keep)], 1: [("join", "g", gone)], 4: [("cancel", "g")]})
    assert got == {"k": want, "g": []}
    assert scheduler.batch_stats.prefills == 1 and scheduler.batch_stats.prefill_chunks == 1 + 3


def test_cli_prefill_chunk_flag(capsys):
    from moekit.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--prefill-chunk N" in capsys.readouterr().out
    assert main(["serve", "--model", "nowhere", "--prefill-chunk", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prefill-chunk" in err and "got 0" in err


@pytest.mark.parametrize("changes", [SLIDING_FULL, CHUNKED], ids=["sliding-full-sinks", "chunked-attention"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_per_layer_mask_models_batch_and_get_their_solo_tokens(changes, chunk):
    """gpt_oss- and llama4-style layers (windows and chunks of 4) in the continuous batch."""
    model = _model(**changes)
    keys = ("greedy-a", "sampled-a", "long-greedy", "short")

    def alone(key):
        return _run(_scheduler(model, prefill_chunk=chunk), {0: [("join", key, _row(*ROWS[key]))]}, 120)[key]

    solo = {k: alone(k) for k in keys}
    schedule = {
        0: [("join", k, _row(*ROWS[k])) for k in ("greedy-a", "sampled-a")],
        2: [("join", "long-greedy", _row(*ROWS["long-greedy"]))],
        4: [("join", "short", _row(*ROWS["short"]))],
    }
    scheduler = _scheduler(model, prefill_chunk=chunk)
    assert _run(scheduler, schedule, 120) == solo
    assert scheduler.batch.last_path == "general" and scheduler.batch_stats.largest >= 3
