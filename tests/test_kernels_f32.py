"""The native fp32 decode kernels (moekit/kernels/linear.py) against float64 references and fallbacks.

Tolerances: a float32 dot product of C terms, summed in 16 lanes and then across lanes, is off by
at most about ``(C / 16 + 16) * eps32 * sum|x_i w_i|``; the checks allow ``5e-6 * sum|x_i w_i|``
(eps32 = 6e-8, so C up to ~1000) plus 1e-6 absolute, against the same product in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.kernels import build
from moekit.kernels import linear as kl
from moekit.layers import MoEConfig
from moekit.layers.experts import ExpertWeights, StackedExpertWeights
from moekit.models import ModelConfig, MoEForCausalLM

pytestmark = pytest.mark.skipif(not kl.native_available(), reason="native decode_f32 kernels did not build")


def _close_to_f64(got, ref64, scale64, rel=5e-6):
    err = (got.double() - ref64).abs()
    bound = rel * scale64 + 1e-6
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, max bound {bound.max().item():.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 17, 37, 130])
@pytest.mark.parametrize("cols", [1, 5, 16, 33, 515])
def test_linear_matches_float64(rows, cols, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=gen)
    b = torch.randn(rows, generator=gen) if bias else None
    for n in range(1, 6):
        x = torch.randn(n, cols, generator=gen)
        assert kl.uses_native_linear(x, w, b)
        got = kl.linear(x, w, b)
        ref64 = F.linear(x.double(), w.double(), None if b is None else b.double())
        scale64 = F.linear(x.double().abs(), w.double().abs()) + (0 if b is None else b.double().abs())
        assert got.shape == (n, rows) and got.dtype == torch.float32
        _close_to_f64(got, ref64, scale64)


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_large_parallel_split(threads):
    """Above the parallel threshold (rows split across threads), rows not a multiple of 16."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(3)
        w, b = torch.randn(4099, 515, generator=gen), torch.randn(4099, generator=gen)
        for n in (1, 2, 5, 8):
            x = torch.randn(n, 515, generator=gen)
            got = kl.linear(x, w, b)
            _close_to_f64(
                got,
                F.linear(x.double(), w.double(), b.double()),
                F.linear(x.abs().double(), w.abs().double()) + b.abs().double(),
            )
            # Each row's result does not depend on how many rows ride along (batched == alone).
            assert torch.equal(got[:1], kl.linear(x[:1], w, b))
    finally:
        torch.set_num_threads(old)


def test_linear_strides_and_batch_dims():
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(40, 70, generator=gen)
    w = wide[:, :33]  # rows with a stride: the op reads them in place
    x = torch.randn(2, 3, 66, generator=gen)[..., ::2]  # inner stride 2: the wrapper copies
    assert kl.uses_native_linear(x, w)
    ref64 = F.linear(x.double(), w.double())
    _close_to_f64(kl.linear(x, w), ref64, F.linear(x.abs().double(), w.abs().double()))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.moekit.linear_f32(x.reshape(6, 33).t().contiguous().t(), w, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.moekit.linear_f32(x.double().reshape(6, 33), w.double(), None)


def test_linear_falls_back_where_the_op_does_not_fit(monkeypatch):
    w = torch.randn(8, 16)
    assert not kl.uses_native_linear(torch.randn(2, 16, dtype=torch.float64), w.double())
    assert not kl.uses_native_linear(torch.randn(kl.MAX_NATIVE_ROWS + 1, 16), w)
    with torch.enable_grad():
        assert not kl.uses_native_linear(torch.randn(1, 16, requires_grad=True), w)
    x = torch.randn(3, 16)
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    assert not kl.native_available() and not kl.uses_native_linear(x, w)
    assert torch.equal(kl.linear(x, w), F.linear(x, w))


def _experts(num, dim, ffn, activation, seed=0):
    torch.manual_seed(seed)
    st = StackedExpertWeights(num, dim, ffn, activation).requires_grad_(False)
    with torch.no_grad():
        st.w_in.normal_()
        st.w_out.normal_()
    return st


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize(("dim", "ffn"), [(37, 19), (16, 48), (130, 33)])
def test_moe_decode_matches_float64(activation, dim, ffn):
    st = _experts(5, dim, ffn, activation)
    st64 = _experts(5, dim, ffn, activation).double()
    gen = torch.Generator().manual_seed(dim)
    for ids in ([3], [0, 4], [2, 1, 4]):
        x = torch.randn(1, dim, generator=gen)
        weights = torch.rand(1, len(ids), generator=gen)
        assert kl.uses_native_moe(x, st.w_in, st.w_out, activation)
        got = st.decode_token(x, ids, weights)
        ref64 = ExpertWeights.decode_token(st64, x.double(), ids, weights.double())
        # The error scale: the down projection's |terms| over the activation's float32 error too.
        a64 = [st64.act(F.linear(x.double(), st64.w_in[e])).abs() for e in ids]
        scale = sum(w * F.linear(a, st64.w_out[e].abs()) for w, a, e in zip(weights[0].double(), a64, ids))
        h_scale = max(F.linear(x.double().abs(), st64.w_in[e].abs()).max() for e in ids)
        assert got.shape == (1, dim)
        _close_to_f64(got, ref64, scale * (1 + h_scale), rel=2e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_moe_decode_mixtral_shape_both_threads(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        st = _experts(4, 512, 2048, "swiglu")
        with torch.no_grad():
            st.w_in.mul_(512**-0.5)
            st.w_out.mul_(2048**-0.5)
        x, weights = torch.randn(1, 512), torch.tensor([[0.7, 0.3]])
        got = st.decode_token(x, [2, 0], weights)
        ref = ExpertWeights.decode_token(st, x, [2, 0], weights)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        ids = torch.tensor([2, 0])
        assert torch.equal(kl.moe_decode(x, st.w_in, st.w_out, ids, weights, "swiglu"), got)
    finally:
        torch.set_num_threads(old)


def test_moe_decode_rejects_bad_ids_and_falls_back(monkeypatch):
    st = _experts(3, 16, 8, "swiglu")
    x, weights = torch.randn(1, 16), torch.tensor([[1.0]])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moekit.moe_decode_f32(x, st.w_in, st.w_out, torch.tensor([3]), weights[0], 0)
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    assert not kl.uses_native_moe(x, st.w_in, st.w_out, "swiglu")
    assert torch.equal(st.decode_token(x, [1], weights), ExpertWeights.decode_token(st, x, [1], weights))
    clamped = StackedExpertWeights(3, 16, 8, "swiglu_clamped")  # no native form: stacked() is None
    monkeypatch.setenv("MOEKIT_KERNELS", "1")
    with torch.no_grad():
        assert torch.equal(
            clamped.decode_token(x, [1], weights), ExpertWeights.decode_token(clamped, x, [1], weights)
        )


def test_build_failure_falls_back(monkeypatch, tmp_path):
    """A source that does not compile: one warning, False, and the wrappers take F.linear."""
    (tmp_path / "decode_f32.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(build, "CSRC", tmp_path)
    monkeypatch.setenv("MOEKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    build.load_ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"):
            assert build.load_ops("decode_f32") is False
    finally:
        build.load_ops.cache_clear()
    monkeypatch.setattr(kl, "_load", lambda: False)  # what a failed build leaves behind
    x, w = torch.randn(2, 16), torch.randn(4, 16)
    assert not kl.native_available() and torch.equal(kl.linear(x, w), F.linear(x, w))


def _tiny_model():
    cfg = ModelConfig(
        vocab_size=96,
        dim=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=64,
        moe=MoEConfig(dim=48, num_experts=4, ffn_dim=40, top_k=2, norm_topk_prob=True),
        moe_placement="all",
    )
    torch.manual_seed(0)
    return MoEForCausalLM(cfg).eval()


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("moekit::")}


@pytest.mark.parametrize("compile", [False, True])
def test_generate_same_tokens_with_and_without_kernels(monkeypatch, compile):
    model = _tiny_model()
    ids = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    ref = model.generate(ids, max_new_tokens=12, compile=False)
    assert not _ops_run(lambda: model.generate(ids, max_new_tokens=3, compile=False))
    monkeypatch.setenv("MOEKIT_KERNELS", "1")
    got = model.generate(ids, max_new_tokens=12, compile=compile)
    assert torch.equal(got, ref)
    ran = _ops_run(lambda: model.generate(ids, max_new_tokens=3, compile=compile))
    # Eager batch-1 steps run as one whole-step kernel call (tests/test_native_step.py); the
    # compiled graph calls the per-op kernels.
    if compile:
        assert {"moekit::linear_f32", "moekit::moe_decode_f32"} <= ran


def test_auto_compile_stays_eager_with_kernels(monkeypatch):
    """compile="auto": a float32 model on the native kernels decodes eagerly (the faster path)."""
    from moekit.models.generation import AUTO_COMPILE_TOKENS, auto_compile

    model = _tiny_model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert not auto_compile(model, ids, AUTO_COMPILE_TOKENS)
    monkeypatch.setenv("MOEKIT_KERNELS", "0")  # without them the rent-or-buy rule applies again
    assert auto_compile(model, ids, AUTO_COMPILE_TOKENS)
