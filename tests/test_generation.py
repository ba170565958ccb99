"""One generate (moekit.models.generation): fast path vs general layers vs the no-cache reference.

float64 models, so argmax ties and batch-shape rounding cannot flip tokens.
"""

from __future__ import annotations

import pytest
import torch

from moekit.layers import MoEConfig
from moekit.models import DecodeSession, ModelConfig, MoEForCausalLM, Sampler, fast_decode_supported, generate
from moekit.models import generation as generation_module

V, D = 64, 32


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**kw) -> MoEForCausalLM:
    moe_kw = kw.pop("moe_kw", {})
    kw.setdefault("moe", MoEConfig(dim=D, num_experts=4, ffn_dim=32, **moe_kw))
    cfg = ModelConfig(vocab_size=V, dim=D, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, **kw)
    torch.manual_seed(0)
    return MoEForCausalLM(cfg).double().eval()


MLA = dict(attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
# (config kwargs, whether the fast path applies)
CONFIGS = {
    "mixtral": (dict(moe_kw=dict(norm_topk_prob=True)), True),
    "qwen3_qk_norm": (dict(qk_norm="per_head"), True),
    "dense": (dict(moe=None), True),
    "shared_sigmoid": (
        dict(moe_kw=dict(score_func="sigmoid", use_expert_bias=True, shared_ffn_dim=16)),
        True,
    ),
    "sliding_window": (dict(sliding_window=3), False),
    "mla": (MLA, False),
    "olmoe_full_qk_norm": (dict(qk_norm="full"), False),
}


def _left_padded(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, V, (n,), generator=gen) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def _general_session(model, ids, mask, n) -> DecodeSession:
    session = DecodeSession(model, ids, mask, n)
    session.fast = False  # the model's own layers
    return session


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_greedy_equals_general_layers_and_reference(name):
    kwargs, fast = CONFIGS[name]
    model = _model(**kwargs)
    assert fast_decode_supported(model) == fast  # which path the default generate takes
    for ids, mask in (_left_padded(), (torch.randint(1, V, (1, 6)), None)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8)
        general = generate(model, ids, mask, max_new_tokens=8, source=_general_session(model, ids, mask, 8))
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=False)
        assert torch.equal(out, general), name
        assert torch.equal(out, reference), name


@pytest.mark.parametrize("name", ["mixtral", "dense", "mla"])
def test_seeded_sampling_is_identical_on_every_path(name):
    model = _model(**CONFIGS[name][0])
    ids, mask = _left_padded(2)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    outs = [
        model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), **kw),
        model.generate(
            ids, attention_mask=mask, generator=torch.Generator().manual_seed(7), use_cache=False, **kw
        ),
    ]
    sampler = Sampler(temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    source = _general_session(model, ids, mask, 10)
    outs.append(generate(model, ids, mask, max_new_tokens=10, sampler=sampler, source=source))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # The seed matters: a different one gives different tokens somewhere.
    other = model.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.equal(other, outs[0])


def test_hf_kwargs_streamer_object_and_errors():
    model = _model()
    ids = torch.randint(1, V, (1, 4))

    class Streamer:
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, ids_B):
            self.got.append(ids_B)

        def end(self):
            self.ended = True

    streamer = Streamer()
    out = model.generate(ids, max_new_tokens=5, streamer=streamer)
    assert streamer.ended and torch.equal(torch.stack(streamer.got, 1), out[:, 4:])
    # top_k=0 disables the filter (transformers' convention); do_sample=False ignores temperature.
    g = dict(do_sample=True, max_new_tokens=5)
    a = model.generate(ids, top_k=0, generator=torch.Generator().manual_seed(1), **g)
    b = model.generate(ids, generator=torch.Generator().manual_seed(1), **g)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(ids, temperature=0.3, max_new_tokens=5), out)
    with pytest.raises(ValueError, match="temperature must be positive"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="not both"):
        model.generate(ids, sampler=Sampler(), do_sample=True)
    with pytest.raises(ValueError, match="compile must be"):
        model.generate(ids, compile="yes")
    assert model.generate(ids, max_new_tokens=0).shape == ids.shape


def test_auto_compile_policy(monkeypatch):
    """compile="auto": batch-1 CPU fast-path sessions only, after enough eager tokens (rent or buy)."""
    monkeypatch.delenv("MOEKIT_COMPILE", raising=False)
    model = _model()
    one, two = torch.ones(1, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    limit = generation_module.AUTO_COMPILE_TOKENS
    decide = generation_module.auto_compile
    assert not decide(model, one, 20)
    assert decide(model, one, limit)
    assert not decide(model, two, limit)  # batched: the eager fast path handles ragged rows
    assert not decide(_model(sliding_window=3), one, limit)  # general path: nothing to compile
    # Eager batch-1 tokens count towards the threshold; batched ones do not.
    model.generate(one, max_new_tokens=6)
    model.generate(two, max_new_tokens=6)
    assert model.num_eager_decode_tokens == 6 and not model.decode_compiled
    model.num_eager_decode_tokens = limit - 10
    assert not decide(model, one, 9) and decide(model, one, 10)
    model.num_eager_decode_tokens = 0
    model.decode_compiled = True  # a compiled step already ran: the graph is cached
    assert decide(model, one, 1)
    monkeypatch.setenv("MOEKIT_COMPILE", "0")
    assert not decide(model, one, limit)


def test_auto_compile_falls_back_to_eager_when_compiling_fails():
    model = _model()
    ids = torch.randint(1, V, (1, 5))
    expected = model.generate(ids, max_new_tokens=6, compile=False)
    session = DecodeSession(model, ids, None, 6, compile=True, compile_fallback=True)
    assert session.compiled

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    session._compiled = broken  # what a failing inductor compile looks like from the session
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = generate(model, ids, max_new_tokens=6, source=session)
    assert torch.equal(out, expected) and not session.compiled
