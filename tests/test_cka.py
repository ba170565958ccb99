"""Linear CKA: the defining invariances, a hand-written HSIC oracle, and the expert matrix."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis import expert_cka_matrix, linear_cka, mean_off_diagonal
from moekit.layers import MoEConfig, MoELayer


def hsic_cka(x, y):
    """Oracle: CKA from the kernel form, HSIC(K, L) = tr(K H L H) / (n-1)², K = XXᵀ, L = YYᵀ."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)

    def hsic(k, m):
        return torch.trace(k @ h @ m @ h) / (n - 1) ** 2

    k, m = x @ x.t(), y @ y.t()
    return float(hsic(k, m) / torch.sqrt(hsic(k, k) * hsic(m, m)))


def test_self_similarity_is_one():
    x = torch.randn(50, 7)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_rotation_and_isotropic_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = torch.randn(60, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.0 < base < 0.9  # unrelated data: the invariance checks below are not trivial
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x @ q * 0.2, y) == pytest.approx(base, abs=1e-10)
    # not invariant to an anisotropic scale (CKA is not CCA): the check can fail
    aniso = x * torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1], dtype=torch.float64)
    assert abs(linear_cka(aniso, y) - base) > 1e-3


def test_equals_hsic_oracle():
    g = torch.Generator().manual_seed(2)
    for n, p, q in ((40, 6, 9), (25, 30, 3)):
        x = torch.randn(n, p, generator=g) + 2.0  # an offset: centring must happen
        y = x[:, :3] @ torch.randn(3, q, generator=g) + 0.5 * torch.randn(n, q, generator=g)
        assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-10)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same number"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(torch.randn(5), torch.randn(5, 2))
    assert linear_cka(torch.ones(5, 2), torch.randn(5, 2)) == 0.0


def _layer(bias: bool) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(dim=12, ffn_dim=20, num_experts=4, top_k=2, activation="gelu", ffn_bias=bias))


@pytest.mark.parametrize("bias", [False, True])
def test_identical_experts_give_ones(bias):
    layer = _layer(bias)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.copy_(p[:1].expand_as(p))
    m = expert_cka_matrix(layer, torch.randn(2, 16, 12))
    assert m.shape == (4, 4)
    assert torch.allclose(m, torch.ones(4, 4, dtype=torch.float64), atol=1e-12)
    assert mean_off_diagonal(m) == pytest.approx(1.0, abs=1e-12)


def test_distinct_experts_match_per_expert_oracle():
    layer = _layer(True)
    x = torch.randn(40, 12)
    m = expert_cka_matrix(layer, x)
    assert torch.allclose(m, m.t())
    e = layer.experts
    # the oracle computes each expert by hand from its stored weights (the bias path ran)
    outs = [
        torch.nn.functional.gelu(x @ e.w_in[i].t() + e.b_in[i]) @ e.w_out[i].t() + e.b_out[i]
        for i in range(4)
    ]
    for i in range(4):
        for j in range(4):
            ref = 1.0 if i == j else hsic_cka(outs[i].detach(), outs[j].detach())
            assert m[i, j].item() == pytest.approx(ref, abs=1e-6)
    assert mean_off_diagonal(m) < 0.999
