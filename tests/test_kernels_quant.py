"""moekit.kernels.qlinear (csrc/quant_gemv.cpp): the native quantized GEMV and one-token experts op
against their reference math (float64) and against dequantized weights, the PackedLinear
``native`` kernel, and quantized models on the decode fast path."""

from __future__ import annotations

import pytest
import torch

from moekit.compress import QuantConfig, quantize_model
from moekit.compress.experts import QuantizedExperts
from moekit.compress.kernels import PackedLinear, choose_kernel
from moekit.compress.quant import quantize_rtn
from moekit.kernels import qlinear
from moekit.models import DecodeSession, MoEForCausalLM, fast_decode_supported, generate, get_preset

needs_native = pytest.mark.skipif(not qlinear.native_available(), reason="quant_gemv did not build")

# Native vs reference: the same integers, only the order of float32 sums differs.
REF_RTOL = 2e-6
# Native vs fp32 on the dequantized weight: the activations' block-32 int8 rounding, about 1/254
# of each block's max per element; on random data this stays well below 2% of the output's max.
DEQUANT_RTOL = 2e-2


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _matrix(rows: int, cols: int, bits: int, group: int):
    qt = quantize_rtn(torch.randn(rows, cols) * 0.05, bits, group)
    return qt, qlinear.kernel_matrix(qt.codes(), qt.scale, qt.zero, bits)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rows", [40, 16, 5])  # full tiles plus a rest, tiles only, a rest only
def test_kernel_layout_round_trips(bits, rows):
    qt, k = _matrix(rows, 192, bits, 64)
    back = qlinear.stored_matrix(*k, bits)
    assert all(torch.equal(a, b) for a, b in zip(back, (qt.codes(), qt.scale, qt.zero), strict=True))
    assert k[0].shape == (rows, 192 if bits == 8 else 96) and k[1].shape == k[2].shape == (rows, 3)


def test_kernel_layout_puts_one_row_per_lane():
    # The documented byte positions, checked on a hand-made matrix: code = column % 16 + row.
    rows, cols = 20, 64
    codes = ((torch.arange(cols) % 16)[None, :] + torch.arange(rows)[:, None]).clamp(max=15).to(torch.uint8)
    s = torch.ones(rows, 2, dtype=torch.float16)
    z = torch.zeros(rows, 2, dtype=torch.uint8)
    k8 = qlinear.kernel_matrix(codes, s, z, 8)[0].reshape(-1)
    k4 = qlinear.kernel_matrix(codes, s, z, 4)[0].reshape(-1)
    for t, b, col in [(0, 0, 0), (3, 0, 5), (15, 1, 30), (7, 1, 17)]:
        k = col % 32
        assert k8[b * 512 + (k // 4) * 64 + t * 4 + k % 4] == codes[t, 32 * b + k]
        byte = int(k4[b * 256 + ((k % 16) // 4) * 64 + t * 4 + k % 4])
        assert (byte >> 4 if k >= 16 else byte & 15) == codes[t, 32 * b + k]
    # The 4-row rest tile starts after the full tile, its lanes 4 rows wide.
    assert k8[16 * cols + 2 * 4 + 1] == codes[18, 1]


def test_activation_quantization_matches_llamacpp_q8_0():
    x = torch.randn(3, 96)
    x[1, 32:64] = 0  # an all-zero block: d = 0, codes 0
    xq, d = qlinear.quantize_activations(x)
    assert xq.abs().max() <= 127 and torch.equal(xq, xq.round())
    assert torch.all(d[1, 1] == 0) and torch.all(xq[1, 1] == 0)
    torch.testing.assert_close(xq * d[..., None], x.view(3, 3, 32), atol=float(d.max()) / 2 + 1e-7, rtol=0)


@needs_native
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 17])
def test_q_linear_matches_reference_and_dequantized(bits, group, rows):
    # Odd shapes: 67 output rows (not a multiple of the 16-row grain), N up to 17 (passes of 8).
    qt, k = _matrix(67, 256, bits, group)
    x = torch.randn(rows, 256)
    y = torch.ops.moekit.q_linear(x, *k, bits, group)
    ref64 = qlinear.q_linear_reference(x, *k, bits, group, torch.float64)
    assert _rel(y, ref64) < REF_RTOL
    ref32 = qlinear.q_linear_reference(x, *k, bits, group)
    assert _rel(ref32, ref64) < REF_RTOL  # the fallback is the same math
    # The portable tiles (what a CPU without VNNI runs) are the same math too.
    assert _rel(torch.ops.moekit.q_linear_portable(x, *k, bits, group), ref64) < REF_RTOL
    assert _rel(y, x @ qt.dequantize().t()) < DEQUANT_RTOL


@needs_native
def test_q_linear_threads_and_zero_input_agree():
    # 300 rows over 2 threads: each thread's share (150 rows) cuts a tile, which goes through
    # the kernel's buffer; the result must not depend on where the cut falls.
    for bits in (8, 4):
        qt, k = _matrix(300, 512, bits, 128)
        x = torch.randn(2, 512)
        torch.set_num_threads(1)
        one = torch.ops.moekit.q_linear(x, *k, bits, 128)
        torch.set_num_threads(2)
        two = torch.ops.moekit.q_linear(x, *k, bits, 128)
        assert torch.equal(one, two)  # rows are independent: no cross-thread sums
        zero = torch.ops.moekit.q_linear(torch.zeros(1, 512), *k, bits, 128)
        assert torch.equal(zero, torch.zeros(1, 300))


@needs_native
def test_q_linear_refuses_what_it_cannot_run():
    qt, k = _matrix(8, 96, 8, 32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.moekit.q_linear(torch.randn(1, 80), k[0][:, :80].contiguous(), k[1], k[2], 8, 32)
    with pytest.raises(RuntimeError, match="multiple of 32 dividing"):
        torch.ops.moekit.q_linear(torch.randn(1, 96), *k, 8, 48)
    with pytest.raises(RuntimeError, match="scale/zero"):
        torch.ops.moekit.q_linear(torch.randn(1, 96), k[0], k[1][:4].contiguous(), k[2], 8, 32)
    assert not qlinear.fits(8, 32, 80) and not qlinear.fits(8, 48, 96) and not qlinear.fits(5, 32, 96)
    assert qlinear.fits(4, 32, 96) and qlinear.fits(8, 96, 192)
    assert choose_kernel(8, 32, "auto", 80) != "native"
    with pytest.raises(ValueError, match="native"):
        choose_kernel(8, 48, "native", 96)


def _experts(bits_list, dim=128, ffn=192, group=64, activation="swiglu"):
    rows = 2 * ffn if activation == "swiglu" else ffn
    w_in = [PackedLinear(quantize_rtn(torch.randn(rows, dim) * 0.05, b, group)) for b in bits_list]
    w_out = [PackedLinear(quantize_rtn(torch.randn(dim, ffn) * 0.05, b, group)) for b in bits_list]
    return QuantizedExperts(w_in, w_out, activation)


def _slots(experts: QuantizedExperts, ids):
    out = []
    for e in ids:
        ic, isc, iz, bits, gi = experts.w_in[e].native_matrix()
        oc, osc, oz, _, go = experts.w_out[e].native_matrix()
        out.append((ic, isc, iz, oc, osc, oz, bits, gi, go))
    return out


@needs_native
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bits_list", [[8, 8, 8], [4, 4, 4], [8, 4, 3]])
def test_fused_experts_token_matches_reference_and_dequantized(activation, bits_list):
    experts = _experts(bits_list, activation=activation)
    x, weights = torch.randn(1, 128), torch.rand(2)
    ids = [2, 0]
    assert experts.native_token_ready(ids)
    y = torch.ops.moekit.q_experts_token(
        x,
        weights,
        *[list(c) for c in list(zip(*_slots(experts, ids), strict=True))[:7]],
        64,
        64,
        qlinear.ACTIVATIONS[activation],
    )
    ref64 = qlinear.q_experts_token_reference(x, weights, _slots(experts, ids), activation, torch.float64)
    # The hidden activations are re-quantized from float32 sums, so a rounding-boundary flip of
    # one block code is possible: a looser bound than a single matrix's.
    assert _rel(y, ref64) < 1e-4
    # The storage's generic path (one PackedLinear pair per expert, also native) and fp32.
    generic = super(QuantizedExperts, experts).decode_token(x, ids, weights[None])
    assert _rel(y, generic) < 1e-4
    dense = sum(
        weights[i]
        * experts.act(x @ experts.w_in[e].dequantized_weight().t())
        @ experts.w_out[e].dequantized_weight().t()
        for i, e in enumerate(ids)
    )
    assert _rel(y, dense) < 3 * DEQUANT_RTOL


def _model(bits: int, kernel: str = "auto", non_experts: bool = True) -> MoEForCausalLM:
    torch.manual_seed(0)
    model = MoEForCausalLM(get_preset("moe-tiny")).eval()
    return quantize_model(
        model, QuantConfig(bits=bits, group_size=64, kernel=kernel, include_non_experts=non_experts)
    )


class _Counting:
    """Stands in for ``torch.ops.moekit`` in :mod:`qlinear`, recording which ops ran."""

    def __init__(self, real, calls: list[str]) -> None:
        self.real, self.calls = real, calls

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.real, name)


@needs_native
def test_decode_token_takes_the_fused_op(monkeypatch):
    experts = _experts([8, 8, 8])
    calls: list[str] = []
    monkeypatch.setattr(qlinear, "_ops", lambda: _Counting(torch.ops.moekit, calls))
    out = experts.decode_token(torch.randn(1, 128), [1, 2], torch.rand(1, 2))
    assert calls == ["q_experts_token"] and out.shape == (1, 128)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_takes_the_fast_path_with_native_kernels(bits, monkeypatch):
    model = _model(bits)
    assert {m.kernel for m in model.modules() if isinstance(m, PackedLinear)} == {"native"}
    assert fast_decode_supported(model)
    ids = torch.randint(0, 512, (1, 7))
    calls: list[str] = []
    monkeypatch.setattr(qlinear, "_ops", lambda: _Counting(torch.ops.moekit, calls))
    fast = DecodeSession(model, ids, None, 3)
    assert fast.fast and fast.use_native_step  # the whole-step kernel (tests/test_native_step.py)
    fast.use_native_step = False  # this test counts the eager fast path's per-op kernels
    fast.prefill()
    calls.clear()
    logits_fast = fast.step(torch.tensor([5]))
    # One decode step: per layer the fused experts op, the attention projections and the LM head
    # through q_linear (2 layers, 4 projections each, + lm_head).
    assert calls.count("q_experts_token") == 2 and calls.count("q_linear") == 9
    general = DecodeSession(model, ids, None, 3)
    general.fast = False
    general.prefill()
    torch.testing.assert_close(logits_fast, general.step(torch.tensor([5])), rtol=1e-3, atol=1e-3)
    out = generate(model, ids, max_new_tokens=12, compile=False)
    assert out.shape == (1, 19)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_tokens_with_kernels_on_and_off(bits):
    # The same codes through the native kernel and through its PyTorch reference (what a machine
    # without a compiler runs): same integers, so the same greedy tokens.
    model = _model(bits)
    ids = torch.randint(0, 512, (1, 9))
    native = generate(model, ids, max_new_tokens=16, compile=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qlinear, "native_available", lambda: False)
        reference = generate(model, ids, max_new_tokens=16, compile=False)
    assert torch.equal(native, reference)


@needs_native
def test_native_logits_close_to_fp32_and_state_round_trips():
    torch.manual_seed(0)
    base = MoEForCausalLM(get_preset("moe-tiny")).eval()
    model = _model(8)
    deq = _model(8, kernel="dequant")
    ids = torch.randint(0, 512, (1, 5))
    a = DecodeSession(model, ids, None, 1).prefill()
    b = DecodeSession(deq, ids, None, 1).prefill()
    c = DecodeSession(base, ids, None, 1).prefill()
    assert _rel(a, b) < DEQUANT_RTOL and _rel(a, c) < 5 * DEQUANT_RTOL
    sd = model.state_dict()
    assert not any(key.endswith((".k_weight", ".k_scale", ".k_zero")) for key in sd)
    for bits in (4, 8):
        for m in _model(bits).modules():
            if isinstance(m, PackedLinear):
                # The tiled form alone holds codes, scales and zeros; the stored form is read back.
                assert m.qweight is None and m.scale is None and m.zero is None
                codes, scale, zero = qlinear.stored_matrix(m.k_weight, m.k_scale, m.k_zero, bits)
                qt = m.quantized()
                assert (
                    torch.equal(qt.codes(), codes)
                    and torch.equal(qt.scale, scale)
                    and torch.equal(qt.zero, zero)
                )


def test_quantized_experts_never_compile_the_stacked_step():
    # The compiled step indexes stacked expert weights; quantized experts have none, so a
    # compile request (or "auto" after a long eager history) must stay on the eager fast path
    # without trying, failing and warning.
    import warnings

    from moekit.models.decode import compiled_step_supported
    from moekit.models.generation import AUTO_COMPILE_TOKENS, auto_compile

    model = _model(8)
    assert fast_decode_supported(model) and not compiled_step_supported(model)
    ids = torch.randint(0, 512, (1, 5))
    session = DecodeSession(model, ids, None, 4, compile=True)
    assert not session.compiled
    model.num_eager_decode_tokens = AUTO_COMPILE_TOKENS
    assert not auto_compile(model, ids, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eager = generate(model, ids, max_new_tokens=6, compile=False)
        asked = generate(model, ids, max_new_tokens=6, compile=True)
    assert torch.equal(eager, asked)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_rows_run_native_and_inputs_needing_grad_dequantize(bits, monkeypatch):
    lin = PackedLinear(quantize_rtn(torch.randn(96, 256) * 0.05, bits, 32))
    assert lin.kernel == "native"
    calls: list[str] = []
    monkeypatch.setattr(qlinear, "_ops", lambda: _Counting(torch.ops.moekit, calls))
    x = torch.randn(3, 100, 256)  # 300 rows: a prefill
    y = lin(x)
    assert calls == ["q_linear"]
    k = lin.native_matrix()
    ref64 = qlinear.q_linear_reference(x.reshape(-1, 256), *k[:3], bits, 32, torch.float64)
    assert _rel(y.reshape(-1, 96), ref64) < REF_RTOL
    # The op has no backward: an input that needs a gradient takes the dequantized weight.
    calls.clear()
    xg = x.clone().requires_grad_()
    lin(xg).sum().backward()
    assert calls == []
    torch.testing.assert_close(xg.grad, lin.dequantized_weight().sum(0).expand_as(xg), rtol=1e-5, atol=1e-6)
