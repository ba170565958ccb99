"""Token-cluster gating (router_type="centroid"): nearest centroids against brute force, k-means,
config validation, and fitting centroids from a model's FFN inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from moekit.layers import FeedForward, FFNConfig, MoEConfig, MoELayer, fit_centroids, kmeans
from moekit.layers.strategies import CentroidRouting, strategy_for


def _brute_force(x_TD: torch.Tensor, c_ED: torch.Tensor, k: int, farthest: bool = False):
    """Per token: every distance by a Python loop, the k nearest (or farthest) by sorting."""
    ids, weights = [], []
    for x in x_TD:
        d = [float(torch.sqrt(((x - c) ** 2).sum())) for c in c_ED]
        order = sorted(range(len(d)), key=lambda e: d[e], reverse=farthest)[:k]
        score = torch.tensor([d[e] if farthest else -d[e] for e in order], dtype=torch.float64)
        ids.append(order)
        weights.append((score.exp() / score.exp().sum()).tolist())
    return torch.tensor(ids), torch.tensor(weights, dtype=torch.float64)


@pytest.mark.parametrize("farthest", [False, True])
def test_centroid_routing_matches_brute_force_float64(farthest):
    torch.manual_seed(0)
    cfg = MoEConfig(
        dim=6, ffn_dim=8, num_experts=5, top_k=2, router_type="centroid", centroid_farthest=farthest
    )
    layer = MoELayer(cfg).double()
    assert strategy_for(cfg) is CentroidRouting
    assert layer.router.weight is None and layer.router.centroids.shape == (5, 6)
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ids_ref, w_ref = _brute_force(x.detach(), layer.router.centroids, 2, farthest)
    assert torch.equal(out.routing.expert_ids, ids_ref)
    torch.testing.assert_close(out.routing.weights, w_ref, rtol=1e-12, atol=1e-12)
    # The chosen weights reach the tokens: the gate is differentiable in x (not in the centroids).
    out.hidden.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not any(p is layer.router.centroids for p in layer.parameters())
    # The decode fast path routes with the same math.
    ids_small, w_small = layer.router.route_small(x.detach())
    assert torch.equal(ids_small, ids_ref)
    torch.testing.assert_close(w_small, w_ref, rtol=1e-12, atol=1e-12)


def test_nearest_is_not_farthest():
    torch.manual_seed(1)
    near = MoELayer(MoEConfig(dim=4, ffn_dim=4, num_experts=4, top_k=1, router_type="centroid"))
    far = MoELayer(near.config.replace(centroid_farthest=True))
    far.load_state_dict(near.state_dict())
    x = torch.randn(64, 4)
    d = torch.cdist(x, near.router.centroids)
    assert torch.equal(near(x).routing.expert_ids[:, 0], d.argmin(1))
    assert torch.equal(far(x).routing.expert_ids[:, 0], d.argmax(1))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(score_func="sigmoid"), "score_func"),
        (dict(softmax_order="after_topk"), "softmax_order"),
        (dict(norm_topk_prob=False), "norm_topk_prob"),
        (dict(router_bias=True), "router_bias"),
        (dict(gating_residual=True), "gating_residual"),
        (dict(top_p=0.7), "top_p"),
        (dict(max_k=3), "max_k"),
    ],
)
def test_centroid_strategy_rejects_fields_it_would_ignore(overrides, field):
    with pytest.raises(ValueError) as err:
        MoEConfig(dim=8, ffn_dim=8, num_experts=4, router_type="centroid", **overrides)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_centroid_farthest_only_with_centroid_router():
    with pytest.raises(ValueError, match="centroid_farthest"):
        MoEConfig(dim=8, ffn_dim=8, router_type="topk", centroid_farthest=True)


def test_kmeans_recovers_separable_blobs():
    gen = torch.Generator().manual_seed(3)
    centers = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    labels = torch.arange(4).repeat_interleave(50)
    x = centers[labels] + 0.3 * torch.randn(200, 3, generator=gen)
    c = kmeans(x, 4, num_iters=50, seed=0)
    # Each true centre has exactly one centroid within 0.5 of it.
    d = torch.cdist(centers, c)
    assert torch.equal(torch.sort(d.argmin(1)).values, torch.arange(4))
    assert float(d.min(1).values.max()) < 0.5
    # Seeded: the same seed gives the same centroids; the clusters are the blobs.
    assert torch.equal(c, kmeans(x, 4, num_iters=50, seed=0))
    assign = torch.cdist(x, c).argmin(1)
    for blob in range(4):
        assert assign[labels == blob].unique().numel() == 1


def test_kmeans_errors_and_empty_cluster():
    with pytest.raises(ValueError, match="3 points cannot make 4 clusters"):
        kmeans(torch.randn(3, 2), 4)
    # Two distinct points and duplicates: every centroid still lands on a data point.
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    c = kmeans(x, 2, seed=0)
    assert sorted(map(tuple, c.tolist())) == [(0.0, 0.0), (1.0, 1.0)]


class _Toy(nn.Module):
    """Two 'layers' whose FFN slot is MoE or dense, fed by a fixed input projection."""

    def __init__(self, moe: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        cfg = MoEConfig(dim=4, ffn_dim=8, num_experts=3, top_k=1, router_type="centroid")
        self.ffn = MoELayer(cfg) if moe else FeedForward(FFNConfig(dim=4, ffn_dim=8))

    def forward(self, x):
        h = self.proj(x)
        out = self.ffn(h)
        return out.hidden if isinstance(self.ffn, MoELayer) else out


def test_fit_centroids_clusters_the_sources_ffn_inputs():
    torch.manual_seed(0)
    dense, moe = _Toy(moe=False), _Toy(moe=True)
    moe.proj.load_state_dict(dense.proj.state_dict())
    centers = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    batches = [centers[torch.arange(3).repeat(10)] + 0.05 * torch.randn(30, 3) for _ in range(3)]
    before = moe.ffn.router.centroids.clone()
    fitted = fit_centroids(moe, batches, source=dense, seed=0)
    assert torch.equal(moe.ffn.router.centroids, before)  # the input model is untouched
    # The centroids are the three clusters of the dense model's FFN inputs (proj of the centres).
    with torch.no_grad():
        projected = dense.proj(centers)
    d = torch.cdist(projected, fitted.ffn.router.centroids)
    assert float(d.min(1).values.max()) < 0.2
    assert torch.equal(torch.sort(d.argmin(1)).values, torch.arange(3))
    # Every token of one cluster routes to that cluster's expert.
    with torch.no_grad():
        ids = fitted.ffn(fitted.proj(batches[0])).routing.expert_ids[:, 0]
    for a, b in itertools.combinations(range(3), 2):
        assert ids[a] != ids[b]
    assert torch.equal(ids[:3], ids[3:6])


def test_fit_centroids_errors():
    dense = _Toy(moe=False)
    with pytest.raises(ValueError, match="no MoE layer with router_type='centroid'"):
        fit_centroids(dense, [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="cannot make 3 clusters"):
        fit_centroids(_Toy(moe=True), [torch.randn(2, 3)])


def test_expert_bias_steers_the_choice_not_the_weights():
    torch.manual_seed(2)
    cfg = MoEConfig(dim=4, ffn_dim=4, num_experts=4, top_k=2, router_type="centroid", use_expert_bias=True)
    layer = MoELayer(cfg).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.router.expert_bias[3] = 1e3
    out = layer(x)
    assert bool((out.routing.expert_ids == 3).any(-1).all())
    d = torch.cdist(x, layer.router.centroids)
    chosen = d.gather(1, out.routing.expert_ids)
    torch.testing.assert_close(out.routing.weights, torch.softmax(-chosen, -1))
