"""Sorted experts with each expert's rows padded to a bucket (moekit.layers.experts): the padded
layout is exact (output and gradients against the unpadded path in float64), it runs only where
the products go to oneDNN, and it really runs there (the counts the kernel sees are padded)."""

from __future__ import annotations

import torch

from moekit.kernels import gemm
from moekit.layers import experts as experts_mod
from moekit.layers.experts import SortedExpertsFunction, StackedExpertWeights

COUNTS = [100, 70, 0, 130]  # not multiples of 32, one idle expert


def _storage():
    torch.manual_seed(0)
    store = StackedExpertWeights(4, 256, 512, "swiglu")
    with torch.no_grad():
        store.w_in.normal_(0, 0.05)
        store.w_out.normal_(0, 0.05)
    return store


def test_padded_layout_maps_rows_into_aligned_segments():
    padded, dest = experts_mod.padded_layout(COUNTS, 64, torch.device("cpu"))
    assert padded == [128, 128, 0, 192]
    assert dest.tolist() == list(range(100)) + list(range(128, 198)) + list(range(256, 386))


def test_bucketed_experts_match_the_exact_path_float64(monkeypatch):
    store = _storage()
    assert gemm.onednn_enabled()
    assert experts_mod.expert_row_bucket(torch.zeros(300, 256), store.w_in, COUNTS) == 32
    seen = []
    real = SortedExpertsFunction.apply
    monkeypatch.setattr(SortedExpertsFunction, "apply", lambda *a: seen.append(list(a[3])) or real(*a))
    x = torch.randn(300, 256, requires_grad=True)
    g = torch.randn(300, 256)
    y = store.forward_sorted(x, COUNTS)
    (y * g).sum().backward()
    assert seen == [[128, 96, 0, 160]]  # the padded path ran
    x64 = x.detach().double().requires_grad_()
    w_in64 = store.w_in.detach().double().requires_grad_()
    w_out64 = store.w_out.detach().double().requires_grad_()
    y64 = real(x64, w_in64, w_out64, COUNTS, "swiglu")
    (y64 * g.double()).sum().backward()
    for got, ref in (
        (y, y64),
        (x.grad, x64.grad),
        (store.w_in.grad, w_in64.grad),
        (store.w_out.grad, w_out64.grad),
    ):
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, err
    assert store.w_in.grad[2].abs().max() == 0 and store.w_out.grad[2].abs().max() == 0


def test_no_padding_off_onednn(monkeypatch):
    store = _storage()
    x = torch.zeros(300, 256)
    assert experts_mod.expert_row_bucket(x.double(), store.w_in, COUNTS) == 0  # float64: MKL
    assert experts_mod.expert_row_bucket(torch.zeros(8, 256), store.w_in, [2, 2, 2, 2]) == 0  # small
    monkeypatch.setenv("MOEKIT_ONEDNN", "0")
    assert experts_mod.expert_row_bucket(x, store.w_in, COUNTS) == 0
