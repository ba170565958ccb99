"""The whole-step native decode kernel (moekit.models.native_step) against the slow paths.

Oracle: the general decoder layers in float64, fed the same tokens; and the eager fast path in
float32 (the kernel's fallback), which must give the same greedy tokens. Each test asserts which
path ran (the op shows up in the profiler, or not).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from moekit.kernels.step import step_available
from moekit.layers import MoEConfig
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.decode import DecodeSession, native_decode_refusal

pytestmark = pytest.mark.skipif(not step_available(), reason="native decode_step kernel not built")

NEW = 8


def _moe(**kw) -> MoEConfig:
    base = dict(dim=64, num_experts=6, ffn_dim=48, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=160, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=80, moe=_moe())
    base.update(kw)
    return ModelConfig(**base)


CASES = {
    "mixtral": _config(),
    "qwen2_moe_shared_gated_bias": _config(
        attention_bias=True, moe=_moe(shared_ffn_dim=40, shared_expert_gate=True, norm_topk_prob=False)
    ),
    "deepseek_sigmoid_bias_scaled": _config(
        moe=_moe(score_func="sigmoid", use_expert_bias=True, routed_scaling_factor=2.5, shared_ffn_dim=32),
        num_dense_first_layers=1,
        num_layers=3,
    ),
    "logits_softmax_after_topk_router_bias": _config(
        moe=_moe(softmax_order="after_topk", norm_topk_prob=True, router_bias=True)
    ),
    "qwen3_qk_norm": _config(qk_norm="per_head", head_dim=32, moe=_moe(top_k=3)),
    "qk_norm_after_rope_interleaved": _config(
        qk_norm="per_head", qk_norm_after_rope=True, rope_interleave=True
    ),
    "partial_rotary_gelu_dense_every_other": _config(
        partial_rotary_factor=0.5,
        moe=_moe(activation="gelu"),
        moe_layer_freq=2,
        num_layers=3,
        dense_ffn_activation="gelu_tanh",
    ),
    "mha_tied": _config(num_kv_heads=4, tie_word_embeddings=True),
    "lm_head_bias_out_bias": _config(lm_head_bias=True, attention_out_bias=True),
}


def _model(cfg: ModelConfig, seed: int = 0) -> MoEForCausalLM:
    torch.manual_seed(seed)
    model = MoEForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.mul_(30.0)  # well-separated routing, so rounding never flips an expert choice
            elif "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    return model


def _prompt(seed: int = 1, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 160, (1, length), generator=torch.Generator().manual_seed(seed))


def _decode(model, ids, native: bool, moe_k=None, feed=None, count=False):
    """Greedy steps (or the tokens in ``feed``): (logits [NEW, V], tokens fed, session)."""
    session = DecodeSession(model, ids, max_new_tokens=NEW, moe_k=moe_k, count_experts=count)
    assert session.use_native_step == (session._step_plan is not None)
    session.use_native_step = native
    logits = session.prefill()
    out, fed = [], []
    for t in range(NEW):
        tok = logits.argmax(-1) if feed is None else feed[t : t + 1]
        fed.append(tok)
        logits = session.step(tok)
        out.append(logits[0].double())
    return torch.stack(out), torch.cat(fed), session


def _native_steps(fn) -> int:
    """Native whole-step calls made while ``fn`` runs (every session it opens counts)."""
    sessions = []
    original = DecodeSession.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sessions.append(self)

    DecodeSession.__init__ = spy
    try:
        fn()
    finally:
        DecodeSession.__init__ = original
    return sum(s.num_native_steps for s in sessions)


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("moekit::")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_step_matches_float64_general_path(case):
    model = _model(CASES[case])
    assert native_decode_refusal(model) is None
    ids = _prompt()
    with torch.no_grad():
        got, fed, session = _decode(model, ids, native=True)
        assert session.use_native_step
        ref64, _, ref_session = _decode(copy.deepcopy(model).double(), ids, native=False, feed=fed)
        assert not ref_session.use_native_step
    scale = ref64.abs().max().item()
    err = (got - ref64).abs().max().item()
    assert err <= 2e-5 * max(scale, 1.0), (case, err, scale)


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_step_same_tokens_as_eager_fast_path(case):
    model = _model(CASES[case], seed=3)
    ids = _prompt(seed=4, length=11)
    with torch.no_grad():
        got, toks, _ = _decode(model, ids, native=True)
        ref, ref_toks, _ = _decode(model, ids, native=False)
    assert torch.equal(toks, ref_toks)
    assert (got - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1.0)


def test_which_path_ran_and_generate_matches_kernels_off(monkeypatch):
    model = _model(CASES["mixtral"])
    ids = _prompt()
    assert _native_steps(lambda: model.generate(ids, max_new_tokens=4)) == 3
    got = model.generate(ids, max_new_tokens=12)
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    assert native_decode_refusal(model) == "the native kernels are not loaded"
    assert not _ops(lambda: model.generate(ids, max_new_tokens=4))
    assert _native_steps(lambda: model.generate(ids, max_new_tokens=4)) == 0
    assert torch.equal(model.generate(ids, max_new_tokens=12), got)


def test_two_threads_give_bitwise_the_one_thread_result():
    # Big enough that the kernel splits rows across threads; every row and head is computed by
    # one thread in a fixed order, so the split must not change a single bit. Both runs start
    # from the same prefilled cache (the prefill's GEMMs may round differently per thread count).
    cfg = _config(vocab_size=8192, dim=256, num_heads=8, num_kv_heads=4, moe=_moe(dim=256, ffn_dim=256))
    model = _model(cfg)
    ids = torch.randint(1, 8192, (1, 9), generator=torch.Generator().manual_seed(5))
    session = DecodeSession(model, ids, max_new_tokens=NEW)
    assert session.use_native_step
    before = torch.get_num_threads()
    out = {}
    with torch.no_grad():
        first = session.prefill().argmax(-1)
        saved = [(k.clone(), v.clone()) for k, v in zip(session.cache.keys, session.cache.values)]
        lengths = list(session.cache.lengths)
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for layer, (k, v) in enumerate(saved):
                    session.cache.keys[layer].copy_(k)
                    session.cache.values[layer].copy_(v)
                session.cache.lengths, session.num_decoded = list(lengths), 0
                tok, steps = first, []
                for _ in range(NEW):
                    steps.append(session.step(tok))
                    tok = steps[-1].argmax(-1)
                out[threads] = torch.cat(steps)
        finally:
            torch.set_num_threads(before)
    assert torch.equal(out[1], out[2])


@pytest.mark.parametrize("moe_k", [1, 3])
def test_dynamic_k_and_expert_counts(moe_k):
    model = _model(CASES["mixtral"])
    ids = _prompt()
    with torch.no_grad():
        got, toks, session = _decode(model, ids, native=True, moe_k=moe_k, count=True)
        ref, ref_toks, ref_session = _decode(model, ids, native=False, moe_k=moe_k, count=True)
    assert torch.equal(toks, ref_toks)
    assert (got - ref).abs().max().item() <= 1e-4 * max(ref.abs().max().item(), 1.0)
    assert session.expert_assignments == ref_session.expert_assignments


def test_sessions_the_kernel_does_not_take():
    model = _model(CASES["mixtral"])
    ids = _prompt()
    # batch > 1, and a padded batch-1 prompt, stay on the eager paths
    assert not DecodeSession(model, ids.repeat(2, 1), max_new_tokens=2).use_native_step
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    assert not DecodeSession(model, ids, attention_mask=mask, max_new_tokens=2).use_native_step
    # model features it does not implement
    assert "pregated" in native_decode_refusal(_model(dataclasses.replace(CASES["mixtral"], pregated=True)))
    windowed = _model(dataclasses.replace(CASES["mixtral"], sliding_window=4))
    assert native_decode_refusal(windowed) == "the model is off the fast decode path"
    assert native_decode_refusal(copy.deepcopy(model).to(torch.bfloat16)) is not None
    grouped = _model(_config(moe=_moe(num_expert_groups=2, num_limited_groups=1)))
    assert native_decode_refusal(grouped) == "group-limited routing"
    assert not DecodeSession(grouped, ids, max_new_tokens=2).use_native_step


def test_bad_cache_is_one_clear_error():
    model = _model(CASES["mixtral"])
    ids = _prompt()
    session = DecodeSession(model, ids, max_new_tokens=2)
    with torch.no_grad():
        session.prefill()
        session.cache.keys[1] = session.cache.keys[1][:, :, :3].contiguous()
        session.cache.values[1] = session.cache.values[1][:, :, :3].contiguous()
        with pytest.raises(RuntimeError, match="cache holds 3 keys"):
            session.step(torch.tensor([1]))


QUANT_CASES = {
    "int8_g32_all": dict(bits=8, group_size=32, include_non_experts=True),
    "int4_g64_experts_only": dict(bits=4, group_size=64),
    "mixed_expert_bits_g32": dict(
        bits=4, group_size=32, expert_bits=[[8, 4, 4, 8, 2, 4], [4, 8, 8, 4, 4, 3]]
    ),
}


@pytest.mark.parametrize("case", sorted(QUANT_CASES))
def test_quantized_models_take_the_kernel_with_the_eager_tokens(case):
    from moekit.compress import QuantConfig, quantize_model

    model = quantize_model(
        _model(_config(ffn_dim=128, moe=_moe(ffn_dim=64))), QuantConfig(kernel="native", **QUANT_CASES[case])
    )
    assert native_decode_refusal(model) is None
    ids = _prompt(seed=6, length=9)
    with torch.no_grad():
        got, toks, session = _decode(model, ids, native=True)
        ref, ref_toks, _ = _decode(model, ids, native=False)
    assert session.num_native_steps == NEW and session._step_plan.quantized > 0
    assert torch.equal(toks, ref_toks)
    # Both paths quantize the same activations in blocks of 32; an input that differs in its last
    # bit can round one code the other way, hence a looser bound than float32's.
    assert (got - ref).abs().max().item() <= 2e-3 * max(ref.abs().max().item(), 1.0), case


def test_quantized_folder_through_the_loader(tmp_path):
    from moekit import from_pretrained
    from moekit.compress import QuantConfig, quantize_model, save_quantized

    model = quantize_model(
        _model(_config(ffn_dim=128, moe=_moe(ffn_dim=64))),
        QuantConfig(bits=8, group_size=32, include_non_experts=True),
    )
    save_quantized(model, tmp_path / "q8")
    loaded = from_pretrained(tmp_path / "q8").eval()
    ids = _prompt()
    assert _native_steps(lambda: loaded.generate(ids, max_new_tokens=6)) == 5
    assert torch.equal(loaded.generate(ids, max_new_tokens=6), model.generate(ids, max_new_tokens=6))
