"""Every backend against the token-by-token reference, forward and gradients, in float64."""

from __future__ import annotations

import pytest
import torch

from moekit.layers import FeedForward, FFNConfig, MoEConfig, MoELayer
from tests.reference_moe import reference_forward

D, F_ = 12, 20

CASES = {
    "topk_softmax_renorm": dict(top_k=2),
    "topk_no_renorm": dict(top_k=2, norm_topk_prob=False),
    "topk_k3_gelu": dict(top_k=3, activation="gelu"),
    "softmax_after_topk": dict(top_k=2, softmax_order="after_topk"),
    "sigmoid_groups_bias_scale": dict(
        num_experts=8,
        top_k=3,
        score_func="sigmoid",
        num_expert_groups=4,
        num_limited_groups=2,
        use_expert_bias=True,
        routed_scaling_factor=2.5,
    ),
    "groups_max_score": dict(
        num_experts=8, top_k=2, num_expert_groups=4, num_limited_groups=2, group_score="max"
    ),
    "top_p": dict(router_type="top_p", top_p=0.5),
    "top_p_bounds_renorm": dict(router_type="top_p", top_p=0.9, min_k=2, max_k=3, top_p_renormalize=True),
    "random_fixed": dict(router_type="random_fixed", top_k=2),
    "expert_choice": dict(router_type="expert_choice", top_k=2),
    "sparsemixer": dict(router_type="sparsemixer", top_k=2, sparsemixer_eps=0.3),
    "shared_gated": dict(top_k=2, shared_ffn_dim=16, shared_expert_gate=True),
    "residual_moe": dict(top_k=1, residual_moe=True),
    "moepp_zero_copy_constant": dict(
        num_experts=4, num_zero_experts=1, num_copy_experts=1, num_constant_experts=2, top_k=2
    ),
    "gating_residual": dict(top_k=2, gating_residual=True),
}

# float64 oracle backends. grouped_mm has no float64 CPU kernel (it would silently run sorted
# again), so it is checked in float32 below, asserting that it really ran.
BACKENDS = ["eager", "sorted"]


def _layer(overrides, backend, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(
        dim=D, ffn_dim=F_, num_experts=overrides.pop("num_experts", 4), backend=backend, **overrides
    )
    layer = MoELayer(cfg).to(dtype)
    with torch.no_grad():
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.randn_like(layer.router.expert_bias) * 0.1)
        if layer.router.residual_weight is not None:
            layer.router.residual_weight.normal_(std=0.3)
        # A sharper router than the default init spreads tokens over all experts.
        layer.router.weight.mul_(4.0)
    return layer


def _grads(layer, x, out, g):
    params = [p for p in layer.parameters() if p.requires_grad]
    return torch.autograd.grad((out * g).sum(), [x, *params], allow_unused=True)


# (batch, seq): decode sizes take the host-grouping path, the last one the permute path.
SHAPES = [(1, 1), (2, 3), (4, 20)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_matches_reference(case, backend, shape):
    layer = _layer(dict(CASES[case]), backend)
    x = torch.randn(*shape, D, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(*shape, layer.config.num_total_experts, dtype=torch.float64)
    prev = prev if layer.config.gating_residual else None
    mask = torch.ones(*shape, dtype=torch.bool)
    if shape[1] > 2:
        mask[0, :2] = False  # left padding in one row
    result = layer(x, token_mask=mask, prev_logits=prev)
    assert result.backend == backend
    out = result.hidden
    ref = reference_forward(layer, x, token_mask=mask, prev_logits=prev)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(_grads(layer, x, out, g), _grads(layer, x, ref, g)):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_grouped_mm_reports_its_float64_fallback():
    layer = _layer(dict(top_k=2), "grouped_mm")
    assert layer(torch.randn(8, D, dtype=torch.float64)).backend == "sorted"


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("shape", [(1, 1), (64,)], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_mm_float32_matches_eager(case, shape):
    """grouped_mm has no float64 kernel on CPU, so it is checked in float32 against the eager
    oracle with a stated tolerance, forward and gradients, asserting that grouped_mm ran."""
    eager = _layer(dict(CASES[case]), "eager", torch.float32)
    fast = _layer(dict(CASES[case]), "grouped_mm", torch.float32)
    fast.load_state_dict(eager.state_dict())
    torch.manual_seed(7)
    x = torch.randn(*shape, D, requires_grad=True)
    prev = torch.randn(*shape, eager.config.num_total_experts) if eager.config.gating_residual else None
    res_e, res_f = eager(x, prev_logits=prev), fast(x, prev_logits=prev)
    assert res_e.backend == "eager"
    routed = bool(
        ((res_f.routing.expert_ids >= 0) & (res_f.routing.expert_ids < eager.config.num_experts)).any()
    )
    assert res_f.backend == ("grouped_mm" if routed else "sorted")
    out_e, out_f = res_e.hidden, res_f.hidden
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_e)
    for a, b in zip(_grads(eager, x, out_e, g), _grads(fast, x, out_f, g)):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_expert_top1_equals_dense_ffn(backend):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=D, ffn_dim=F_, num_experts=1, top_k=1, backend=backend)
    moe = MoELayer(cfg).double()
    dense = FeedForward(FFNConfig(dim=D, ffn_dim=F_)).double()
    with torch.no_grad():
        dense.w_in.weight.copy_(moe.experts.w_in[0])
        dense.w_out.weight.copy_(moe.experts.w_out[0])
    x = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    out_m, out_d = moe(x).hidden, dense(x)
    torch.testing.assert_close(out_m, out_d, rtol=0, atol=1e-13)
    (gm,) = torch.autograd.grad(out_m.square().sum(), x)
    (gd,) = torch.autograd.grad(out_d.square().sum(), x)
    torch.testing.assert_close(gm, gd, rtol=0, atol=1e-12)


@pytest.mark.parametrize("policy", ["score", "position", "random"])
@pytest.mark.parametrize("backend", ["eager", "sorted"])
def test_capacity_output_matches_reference_on_kept_assignments(policy, backend):
    torch.manual_seed(1)
    layer = _layer(dict(top_k=2, capacity_factor=0.5, min_capacity=1, drop_policy=policy), backend)
    x = torch.randn(40, D, dtype=torch.float64)
    torch.manual_seed(5)
    out = layer(x)
    ids, w = out.routing.expert_ids, out.routing.weights
    choices = [[(int(e), w[t, j]) for j, e in enumerate(ids[t]) if e >= 0] for t in range(40)]
    ref = reference_forward(layer, x, choices=choices)
    torch.testing.assert_close(out.hidden, ref, rtol=1e-10, atol=1e-10)
