"""moekit.kernels.gemm (oneDNN float32 products) against float64, and the expert kernel that uses it."""

from __future__ import annotations

import pytest
import torch

from moekit.kernels import gemm
from moekit.layers.experts import SortedExpertsFunction

pytestmark = pytest.mark.skipif(not gemm.onednn_enabled(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def _small_products_on_onednn(monkeypatch):
    # The shapes here are small, so the size floor is lowered to put them on the oneDNN path.
    monkeypatch.setattr(gemm, "MIN_MACS", 0)


def _close(got: torch.Tensor, ref64: torch.Tensor, rel: float = 2e-6) -> None:
    scale = ref64.abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    assert err <= rel * scale * max(1.0, ref64.shape[-1] ** 0.5), (err, scale)


@pytest.mark.parametrize("layout", ["plain", "b_transposed", "a_transposed", "both_transposed"])
@pytest.mark.parametrize("m", [8, 37, 300])
def test_mm_matches_float64_in_every_layout(layout, m):
    gen = torch.Generator().manual_seed(m)
    k, n = 96, 80
    a = torch.randn(k, m, generator=gen).t() if layout in ("a_transposed", "both_transposed") else None
    a = torch.randn(m, k, generator=gen) if a is None else a
    b = torch.randn(n, k, generator=gen).t() if layout in ("b_transposed", "both_transposed") else None
    b = torch.randn(k, n, generator=gen) if b is None else b
    assert gemm.uses_onednn(a, b)
    _close(gemm.mm(a, b), a.double() @ b.double())
    out = torch.empty(m, n)
    assert gemm.mm(a, b, out=out) is out
    _close(out, a.double() @ b.double())


@pytest.mark.parametrize("swap", [False, True])
def test_mm_with_a_transposed_left_operand_takes_each_route(swap):
    # A weight gradient g^T x: copied first, or (x^T g)^T when the right operand is narrow.
    gen = torch.Generator().manual_seed(1)
    m, k, n = 300, 96, (16 if swap else 80)
    a = torch.randn(k, m, generator=gen).t()
    b = torch.randn(k, n, generator=gen)
    assert gemm.uses_onednn(a, b) and gemm.swaps_operands(a, b) is swap
    got = gemm.mm(a, b)
    assert got.is_contiguous()
    _close(got, a.double() @ b.double())
    out = torch.empty(m, n)
    assert gemm.mm(a, b, out=out) is out
    _close(out, a.double() @ b.double())


def test_small_products_stay_on_torch_mm(monkeypatch):
    monkeypatch.setattr(gemm, "MIN_MACS", 1 << 24)
    a, b = torch.randn(64, 256), torch.randn(256, 512)  # 8.4M multiply-adds: under the floor
    assert not gemm.uses_onednn(a, b)
    assert not gemm.linear_fits(a, b.t())
    assert gemm.uses_onednn(torch.randn(128, 256), b)  # 16.8M: at it


def test_mm_falls_back_where_onednn_does_not_apply(monkeypatch):
    a, b = torch.randn(4, 16), torch.randn(16, 8)
    assert not gemm.uses_onednn(a, b)  # too few rows
    assert not gemm.uses_onednn(a.double().repeat(4, 1), b.double())
    w = torch.randn(16, 8, requires_grad=True)
    assert not gemm.uses_onednn(torch.randn(32, 16), w)  # autograd needs torch.mm's graph
    monkeypatch.setenv("MOEKIT_ONEDNN", "0")
    big = torch.randn(64, 16)
    assert not gemm.uses_onednn(big, b)
    assert torch.equal(gemm.mm(big, b), torch.mm(big, b))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_sorted_experts_forward_and_backward_match_float64(activation, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    num_e, d, f = 4, 64, 48
    h = 2 * f if activation == "swiglu" else f
    counts = [40, 0, 17, 23]
    x = torch.randn(sum(counts), d, generator=gen)
    w_in = torch.randn(num_e, h, d, generator=gen) * d**-0.5
    w_out = torch.randn(num_e, d, f, generator=gen) * f**-0.5
    grad_y = torch.randn(sum(counts), d, generator=gen)
    assert gemm.uses_onednn(x[:17], w_in[0].t())
    onednn_calls = []
    real_mm = gemm.mm

    def counting_mm(a, b, out=None):
        onednn_calls.append(gemm.uses_onednn(a, b))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(gemm, "mm", counting_mm)

    def run(dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, w_in, w_out)]
        y = SortedExpertsFunction.apply(*leaves, counts, activation)
        y.backward(grad_y.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]

    got32 = run(torch.float32)
    # 3 experts with rows: 2 products each forward, 4 each backward; all of them on oneDNN.
    assert onednn_calls == [True] * 18
    for got, ref in zip(got32, run(torch.float64), strict=True):
        _close(got, ref, rel=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_forward_and_backward_match_float64(bias):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 11, 64, generator=gen)
    w = torch.randn(48, 64, generator=gen) * 0.1
    b = torch.randn(48, generator=gen) if bias else None
    grad = torch.randn(3, 11, 48, generator=gen)
    assert gemm.linear_fits(x, w, b)

    def run(dtype, fn):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        y = fn(*leaves) if bias else fn(*leaves, None)
        y.backward(grad.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]

    got = run(torch.float32, gemm.linear)
    ref = run(torch.float64, torch.nn.functional.linear)
    for g, r in zip(got, ref, strict=True):
        _close(g, r, rel=1e-5)


def test_apply_linear_respects_hooks_and_wrappers():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(32, 16)
    seen = []
    handle = lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert torch.allclose(gemm.apply_linear(lin, x), lin(x), atol=1e-6)
    assert seen == [(32, 8), (32, 8)]  # the hooked module was called, not bypassed
    handle.remove()
    assert torch.allclose(
        gemm.apply_linear(lin, x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-6
    )
