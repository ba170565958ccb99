"""Behaviour of the MoE layer: configs, capacity/RTS statistics, top-p, masks, losses, bias balancing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moekit.layers import (
    ExpertBiasBalancer,
    MoEConfig,
    MoELayer,
    apply_capacity,
    combine,
    expert_compute,
    permute,
)
from moekit.layers.losses import load_balance_loss

D = 16


def layer_of(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_experts", 4)
    return MoELayer(MoEConfig(dim=D, ffn_dim=24, **kw))


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=5, num_experts=4), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(min_capacity=-1), "min_capacity"),
        (dict(router_type="nope"), "router_type"),
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=6, num_expert_groups=4), "num_expert_groups"),
        (dict(max_k=9, num_experts=4), "max_k"),
        (dict(backend="cuda_magic"), "backend"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(dim=D, ffn_dim=8, **kwargs)


def test_config_json_round_trip_and_unknown_keys():
    cfg = MoEConfig(dim=D, ffn_dim=8, router_type="top_p", max_k=3, capacity_factor=1.25, num_zero_experts=1)
    again = MoEConfig.from_json(cfg.to_json())
    assert again == cfg
    data = json.loads(cfg.to_json())
    data["topk"] = 2
    with pytest.raises(ValueError, match="topk"):
        MoEConfig.from_dict(data)


def test_k_override_and_bad_k():
    layer = layer_of(num_experts=6, top_k=2)
    x = torch.randn(10, D)
    assert layer(x).routing.expert_ids.shape == (10, 2)
    out = layer(x, k=5)
    assert out.routing.expert_ids.shape == (10, 5)
    assert float(out.routing.experts_per_token) == 5.0
    with pytest.raises(ValueError, match="k=7"):
        layer(x, k=7)


# --- routing statistics --------------------------------------------------------------------------


def test_routing_info_is_tensors_only():
    out = layer_of(top_k=2)(torch.randn(2, 5, D))
    for name, value in vars(out.routing).items():
        assert value is None or isinstance(value, torch.Tensor), name
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.aux_losses.values())
    assert int(out.routing.tokens_per_expert.sum()) == 20


def test_token_mask_excludes_padding_everywhere():
    layer = layer_of(top_k=2, capacity_factor=1.0, min_capacity=1)
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, :3] = False
    out = layer(x, token_mask=mask)
    assert int(out.routing.tokens_per_expert.sum()) <= 12
    assert (out.routing.expert_ids.view(2, 6, -1)[:, :3] == -1).all()
    # Statistics equal those of the real tokens alone.
    alone = layer(x[:, 3:])
    torch.testing.assert_close(out.aux_losses["load_balance"], alone.aux_losses["load_balance"])
    torch.testing.assert_close(out.aux_losses["z_loss"], alone.aux_losses["z_loss"])
    torch.testing.assert_close(out.routing.tokens_per_expert, alone.routing.tokens_per_expert)
    torch.testing.assert_close(out.hidden[:, 3:], alone.hidden)
    assert out.hidden[:, :3].abs().max() == 0


def test_balance_loss_is_one_when_uniform_and_grows_when_skewed():
    probs = torch.full((8, 4), 0.25)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert math.isclose(float(load_balance_loss(probs, ids)), 1.0, rel_tol=1e-6)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    ids_skew = torch.tensor([[0, 1]] * 8)
    assert float(load_balance_loss(skewed, ids_skew)) > 1.5


def test_heterogeneous_balance_weights_zero_computation_experts():
    layer = layer_of(num_experts=2, num_zero_experts=1, num_copy_experts=1, top_k=2, zero_expert_tau=0.25)
    assert layer.balance_weight.tolist() == [1.0, 1.0, 0.25, 0.25]
    x = torch.randn(32, D)
    out = layer(x)
    probs = torch.softmax(out.routing.router_logits, -1)
    ids = out.routing.expert_ids
    expected = load_balance_loss(probs, ids, expert_weight_E=layer.balance_weight)
    torch.testing.assert_close(out.aux_losses["load_balance"], expected)


def test_zero_and_copy_experts_do_what_they_say():
    layer = layer_of(num_experts=1, num_zero_experts=1, num_copy_experts=1, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 100.0  # every token with x[0] > 0 picks the copy expert
    x = torch.randn(50, D).abs()
    out = layer(x)
    assert (out.routing.expert_ids == 2).all()
    torch.testing.assert_close(out.hidden, x * out.routing.weights)  # weight 1 after renorm
    with torch.no_grad():
        layer.router.weight[2, 0] = 0.0
        layer.router.weight[1, 0] = 100.0
    out = layer(x)
    assert (out.routing.expert_ids == 1).all() and out.hidden.abs().max() == 0


def test_expert_bias_changes_choice_not_weights():
    layer = layer_of(num_experts=4, top_k=1, use_expert_bias=True, norm_topk_prob=False)
    x = torch.randn(64, D)
    before = layer(x)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    after = layer(x)
    assert (after.routing.expert_ids == 0).all()
    probs = torch.softmax(after.routing.router_logits, -1)
    torch.testing.assert_close(after.routing.weights[:, 0], probs[:, 0])
    torch.testing.assert_close(before.routing.router_logits, after.routing.router_logits)


def test_bias_balancer_evens_out_a_skewed_router():
    layer = layer_of(num_experts=4, top_k=1, use_expert_bias=True)
    x = torch.randn(256, D) + 1.0
    with torch.no_grad():
        layer.router.weight.normal_(std=0.3)
        layer.router.weight[0] = 0.3  # expert 0 wins for most tokens
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.0)
    balancer = ExpertBiasBalancer(layer, rate=0.002)
    balancer.attach(opt)
    start = layer(x).routing.tokens_per_expert
    for _ in range(300):
        balancer.observe([layer(x).routing])
        opt.step()
    end = layer(x).routing.tokens_per_expert
    assert start.max() / start.mean() > 3.0
    assert end.max() / end.mean() < 1.5
    with pytest.raises(ValueError, match="MoE layers"):
        balancer.observe([])


# --- capacity and random token selection ----------------------------------------------------------


def _capacity_inputs(num_t=400, num_e=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Skewed choices: expert 0 is everyone's first choice.
    second = torch.randint(1, num_e, (num_t,), generator=g)
    ids = torch.stack([torch.zeros(num_t, dtype=torch.long), second], -1)[:, :k]
    weights = torch.rand(num_t, k, generator=g)
    return ids, weights


@pytest.mark.parametrize("policy", ["score", "position", "random"])
def test_capacity_never_exceeded(policy):
    ids, w = _capacity_inputs()
    kept_ids, kept_w = apply_capacity(ids, w, 4, 1.0, 4, policy, torch.tensor(400), 2)
    counts = torch.bincount(kept_ids[kept_ids >= 0], minlength=4)
    assert counts.max() <= math.ceil(1.0 * 400 * 2 / 4)
    assert int(counts[0]) == 200  # the over-subscribed expert is filled exactly to capacity
    assert ((kept_ids == -1) == (kept_w == 0)).all()


def test_capacity_policies_choose_the_right_survivors():
    ids, w = _capacity_inputs()
    cap = 200
    score_ids, _ = apply_capacity(ids, w, 4, 1.0, 4, "score", torch.tensor(400), 2)
    kept = w[:, 0][score_ids[:, 0] == 0]
    dropped = w[:, 0][score_ids[:, 0] == -1]
    assert kept.min() >= dropped.max()
    pos_ids, _ = apply_capacity(ids, w, 4, 1.0, 4, "position", torch.tensor(400), 2)
    assert (pos_ids[:cap, 0] == 0).all() and (pos_ids[cap:, 0] == -1).all()


def test_random_token_selection_is_unbiased_in_position():
    """RTS drops uniformly across positions; position-based dropping always drops the tail."""
    ids, w = _capacity_inputs(num_t=2000)
    torch.manual_seed(0)
    rts_ids, _ = apply_capacity(ids, w, 4, 1.0, 4, "random", torch.tensor(2000), 2)
    dropped_pos = torch.nonzero(rts_ids[:, 0] == -1).float().squeeze(-1)
    assert abs(dropped_pos.mean().item() - 1000) < 60  # uniform over [0, 2000)
    keep_rate_first_half = (rts_ids[:1000, 0] == 0).float().mean()
    keep_rate_second_half = (rts_ids[1000:, 0] == 0).float().mean()
    assert abs(keep_rate_first_half - keep_rate_second_half) < 0.08
    # Different draws drop different tokens (it is random, not a fixed rule).
    rts2, _ = apply_capacity(ids, w, 4, 1.0, 4, "random", torch.tensor(2000), 2)
    assert (rts2[:, 0] != rts_ids[:, 0]).any()


def test_dropped_tokens_reported():
    layer = layer_of(num_experts=4, top_k=2, capacity_factor=0.25, min_capacity=1)
    out = layer(torch.randn(64, D))
    assert int(out.routing.num_dropped) > 0
    assert int(out.routing.tokens_per_expert.sum()) + int(out.routing.num_dropped) == 128
    assert out.routing.tokens_per_expert.max() <= math.ceil(0.25 * 64 * 2 / 4)


def test_expert_choice_respects_capacity_and_balance():
    layer = layer_of(num_experts=4, top_k=2, router_type="expert_choice")
    out = layer(torch.randn(40, D))
    assert out.routing.tokens_per_expert.tolist() == [20.0] * 4  # perfectly balanced by construction


# --- top-p routing ----------------------------------------------------------------------------------


def test_top_p_gives_more_experts_to_high_entropy_tokens():
    layer = layer_of(num_experts=8, router_type="top_p", top_p=0.5)
    x = torch.randn(500, D)
    confident = layer(x * 8.0)  # large logits: peaked router distribution
    unsure = layer(x * 0.1)  # small logits: nearly flat distribution
    assert float(unsure.routing.router_entropy) > float(confident.routing.router_entropy)
    assert float(unsure.routing.experts_per_token) > 2.0 * float(confident.routing.experts_per_token)
    # Per token: experts used rises with routing entropy.
    out = layer(x * torch.logspace(-1, 1, 500).unsqueeze(-1))
    probs = torch.softmax(out.routing.router_logits, -1)
    ent = -(probs * probs.log()).sum(-1)
    used = (out.routing.expert_ids >= 0).sum(-1).float()
    hi, lo = ent > ent.median(), ent <= ent.median()
    assert used[hi].mean() > used[lo].mean() + 1.0


def test_top_p_keeps_the_crossing_expert():
    layer = layer_of(num_experts=4, router_type="top_p", top_p=0.3)
    with torch.no_grad():
        layer.router.weight.zero_()
    out = layer(torch.randn(5, D))  # uniform 0.25 each: keep 0.25, then 0.25 crosses 0.3 -> 2 experts
    assert ((out.routing.expert_ids >= 0).sum(-1) == 2).all()


# --- noise and staged stages ---------------------------------------------------------------------------


@pytest.mark.parametrize("noise", ["jitter", "gaussian", "gumbel"])
def test_noise_only_in_training(noise):
    layer = layer_of(top_k=2, noise=noise, noise_eps=0.5)
    x = torch.randn(64, D)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a.hidden, b.hidden)
    layer.train()
    c, d = layer(x), layer(x)
    assert not torch.equal(c.routing.expert_ids, d.routing.expert_ids) or not torch.equal(c.hidden, d.hidden)


def test_random_fixed_router_is_frozen():
    layer = layer_of(router_type="random_fixed", top_k=2)
    assert not layer.router.weight.requires_grad and not layer.router.bias.requires_grad


def test_stages_compose_like_the_layer():
    layer = layer_of(num_experts=4, top_k=2)
    x = torch.randn(30, D)
    out = layer(x)
    x_nd, plan = permute(x, out.routing.expert_ids, out.routing.weights, 4)
    assert sum(plan.counts) == 60 and x_nd.shape == (60, D)
    y = combine(expert_compute(x_nd, plan.counts, layer.experts, "sorted"), plan, 30)
    torch.testing.assert_close(y, out.hidden)


def test_gating_residual_uses_previous_logits():
    layer = layer_of(num_experts=4, top_k=2, gating_residual=True)
    x = torch.randn(10, D)
    prev = torch.randn(10, 4)
    base = layer(x)
    assert torch.equal(
        layer(x, prev_logits=prev).routing.router_logits, base.routing.router_logits
    )  # zero init
    with torch.no_grad():
        layer.router.residual_weight.copy_(torch.eye(4))
    torch.testing.assert_close(
        layer(x, prev_logits=prev).routing.router_logits, base.routing.router_logits + prev
    )
    with pytest.raises(ValueError, match="equal expert counts"):
        layer(x, prev_logits=torch.randn(10, 6))


# Router strategies: each validates its own fields and rejects what it would silently ignore.
@pytest.mark.parametrize(
    "overrides, fields",
    [
        (dict(softmax_order="after_topk", score_func="sigmoid"), ["score_func"]),
        (dict(softmax_order="after_topk", num_expert_groups=2), ["num_expert_groups"]),
        (dict(softmax_order="after_topk", norm_topk_prob=False), ["norm_topk_prob"]),
        (
            dict(softmax_order="after_topk", score_func="sigmoid", norm_topk_prob=False),
            ["score_func", "norm_topk_prob"],
        ),
        (dict(router_type="random_fixed", norm_topk_prob=False), ["norm_topk_prob"]),
        (dict(router_type="random_fixed", softmax_order="after_topk"), ["softmax_order"]),
        (dict(router_type="top_p", score_func="sigmoid"), ["score_func"]),
        (dict(router_type="top_p", softmax_order="after_topk"), ["softmax_order"]),
        (dict(router_type="top_p", noise="gumbel"), ["noise"]),
        (dict(router_type="expert_choice", noise="gumbel"), ["noise"]),
        (dict(router_type="expert_choice", drop_policy="random"), ["drop_policy"]),
        (dict(router_type="expert_choice", top_p=0.7), ["top_p"]),
        (dict(top_p=0.7), ["top_p"]),
        (dict(min_k=2), ["min_k"]),
        (dict(top_p_renormalize=True), ["top_p_renormalize"]),
        (dict(group_score="max"), ["group_score"]),
    ],
)
def test_router_strategy_rejects_ignored_fields(overrides, fields):
    with pytest.raises(ValueError) as err:
        MoEConfig(dim=8, ffn_dim=8, num_experts=4, **overrides)
    message = str(err.value)
    assert "\n" not in message
    for name in fields:
        assert name in message, message


def test_every_router_type_has_one_registered_strategy():
    from moekit.layers import ROUTER_STRATEGIES
    from moekit.layers.config import ROUTER_TYPES
    from moekit.layers.strategies import TopKLogitSoftmaxRouting, TopKRouting, strategy_for

    assert set(ROUTER_TYPES) == set(ROUTER_STRATEGIES)
    for name, strategy in ROUTER_STRATEGIES.items():
        assert MoEConfig(dim=8, ffn_dim=8, router_type=name).router_type == strategy.name
    assert strategy_for(MoEConfig(dim=8, ffn_dim=8)) is TopKRouting
    assert strategy_for(MoEConfig(dim=8, ffn_dim=8, softmax_order="after_topk")) is TopKLogitSoftmaxRouting


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(norm_topk_prob=False, routed_scaling_factor=2.0),
        dict(
            score_func="sigmoid",
            num_expert_groups=4,
            num_limited_groups=2,
            use_expert_bias=True,
            num_experts=8,
        ),
        dict(softmax_order="after_topk", router_bias=True),
        dict(router_type="random_fixed"),
        dict(router_type="sparsemixer", sparsemixer_eps=0.2),
    ],
)
def test_route_small_equals_forward_for_fixed_k_strategies(overrides):
    """The decode fast path's routing is the router's own (one copy of the math), in float64."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=8, ffn_dim=8, **{"num_experts": 4, "top_k": 2, **overrides})
    router = MoELayer(cfg).double().router
    if router.expert_bias is not None:
        router.expert_bias.normal_(0, 0.1)
    assert router.supports_route_small
    x = torch.randn(5, 8, dtype=torch.float64)
    for k in (2,) if cfg.router_type == "sparsemixer" else (1, 2):
        ids, weights = router.route_small(x, k)
        full = router(x, k=k)
        assert torch.equal(ids, full.expert_ids_TK)
        torch.testing.assert_close(weights, full.weights_TK, rtol=0, atol=0)


def test_routing_override_replaces_routing_and_is_restored():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=8, ffn_dim=8, num_experts=4, top_k=2)).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    plain = layer(x)

    def first_expert_only(router, x_TD, token_mask_T, prev_logits_TE, k):
        out = router(x_TD, token_mask_T, prev_logits_TE, k)
        ids = torch.zeros_like(out.expert_ids_TK[:, :1])
        return type(out)(ids, torch.ones_like(ids, dtype=x_TD.dtype), out.logits_TE, out.probs_TE, ids)

    with layer.override_routing(first_expert_only):
        assert not layer.supports_fast_decode
        over = layer(x)
    assert torch.equal(over.routing.expert_ids, torch.zeros(6, 1, dtype=torch.long))
    torch.testing.assert_close(over.hidden, layer.experts.expert_forward(0, x))
    assert layer.routing_override is None and layer.supports_fast_decode
    torch.testing.assert_close(layer(x).hidden, plain.hidden, rtol=0, atol=0)


def test_layers_has_no_import_cycle_between_storage_and_dispatch():
    import ast
    import inspect

    from moekit.layers import experts, strategies

    for module, forbidden in (
        (experts, ("dispatch", "moe", "router")),
        (strategies, ("router", "moe", "config")),
    ):
        tree = ast.parse(inspect.getsource(module))
        names = [
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [None])
        ]
        for name in names:
            assert not any(name == f"moekit.layers.{f}" for f in forbidden), (module.__name__, name)
