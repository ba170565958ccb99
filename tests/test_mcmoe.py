"""MC-MoE as published (issue 20 item 2): the allocation's constraint, cost and error, and online
dynamic pruning, on hand-computed cases or slow references."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moekit.compress import (
    MixedPrecisionConfig,
    PruneConfig,
    QuantConfig,
    allocate_bits,
    dynamic_prune,
    expert_calls_saved,
    expert_stats,
    quantize_model,
    solve_allocation,
)
from moekit.layers import MoEConfig, Router
from moekit.models import MoEForCausalLM, get_preset


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny() -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(get_preset("moe-tiny")).eval()


def _batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (2, 48), generator=g) for _ in range(n)]


def test_mcmoe_defaults_and_min_use_forces_the_two_highest_widths():
    cfg = MixedPrecisionConfig()
    assert (cfg.candidate_bits, cfg.alpha, cfg.beta, cfg.gamma) == ((1, 2, 3), 1.0, 1.5, 1.0)
    assert cfg.per_layer_budget and cfg.min_bits_each and cfg.objective == "block_output"
    # One layer, 3 equal experts, budget 2 code bits on average (+ 24/128 overhead): sum b <= 6.
    costs = [[[10.0, 1.0, 0.0], [10.0, 0.5, 0.0], [5.0, 1.0, 0.0]]]
    params = [[8, 8, 8]]
    budget = 2.0 + 24 / 128
    free = solve_allocation(costs, params, [1, 2, 3], budget, 128)
    assert free.bits == [[2, 2, 2]] and free.cost == pytest.approx(2.5)
    # MC-MoE: one expert at 3 and one at 2 bits, so the third takes 1 bit. By hand: e2 is the
    # cheapest at 1 bit (5); then e0=3, e1=2 costs 0 + 0.5 against e0=2, e1=3 at 1 + 0.
    forced = solve_allocation(costs, params, [1, 2, 3], budget, 128, min_bits_each=True)
    assert forced.bits == [[3, 2, 1]] and forced.cost == pytest.approx(5.5)
    lowest = solve_allocation(costs, params, [1, 2, 3], budget, 128, min_use_bits=(1, 2))
    assert sorted(lowest.bits[0])[:2] == [1, 2]
    with pytest.raises(ValueError, match=r"one expert at each of \[2, 3\] bits"):
        solve_allocation(costs, params, [1, 2, 3], 1.5 + 24 / 128, 128, min_bits_each=True)
    with pytest.raises(ValueError, match="min_use_bits"):
        MixedPrecisionConfig(min_use_bits=(4,))


def test_mcmoe_cost_is_freq_alpha_mass_beta_error_gamma():
    from moekit.compress import ExpertStats
    from moekit.compress.mixed import cost_table

    stats = ExpertStats([[0.25, 0.75]], [[0.5, 0.5]], [[[1.0, 4.0], [2.0, 8.0]]], [[1, 1]], [1, 2])
    got = cost_table(stats, alpha=1.0, beta=1.5, gamma=2.0)
    imp0, imp1 = 0.25 * 0.5**1.5, 0.75 * 0.5**1.5
    want = [imp0 * 1.0, imp0 * 16.0, imp1 * 4.0, imp1 * 64.0]
    assert [c for row in got[0] for c in row] == pytest.approx(want)


def test_binarize_is_sign_times_group_mean_abs():
    from moekit.compress import binarize

    w = torch.tensor([[1.0, -3.0, 2.0, -2.0, 0.5, 0.5, -0.5, 0.5]])
    assert binarize(w, 4).tolist() == [[2.0, -2.0, 2.0, -2.0, 0.5, 0.5, -0.5, 0.5]]


def test_block_output_error_equals_quantizing_one_expert_in_the_block():
    """Slow reference: run the MoE block on each batch's recorded inputs with only expert e
    replaced by its quantized copy, and sum the per-batch Frobenius norms of the change."""
    from moekit.compress import binarize, collect_layer_inputs, quantize_rtn

    torch.manual_seed(0)
    model = _tiny().double()
    batches = _batches(2)
    stats = expert_stats(model, batches, (1, 2), 64, objective="block_output", one_bit="binarize")
    assert stats.objective == "block_output"
    per_batch = [collect_layer_inputs(model, [b]) for b in batches]
    for li, layer in enumerate(model.moe_layers):
        for e in (0, 3):
            for j, bits in enumerate((1, 2)):
                want = 0.0
                for rec in per_batch:
                    x = rec[li].x_TD.double()
                    ref = layer(x).hidden.detach()
                    q = copy.deepcopy(layer)
                    with torch.no_grad():
                        for w in (q.experts.w_in, q.experts.w_out):
                            src = w[e].float()
                            deq = binarize(src, 64) if bits == 1 else quantize_rtn(src, bits, 64).dequantize()
                            w[e] = deq.double()
                    want += float((q(x).hidden - ref).detach().norm())
                assert stats.error[li][e][j] == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_mixed_precision_stats_follow_the_config_and_mismatch_raises():
    from moekit.compress import mixed_precision_stats

    model = _tiny()
    cfg = MixedPrecisionConfig(avg_bits=2.0 + 24 / 64 + 0.25, group_size=64)
    stats = mixed_precision_stats(model, _batches(2), cfg)
    alloc = allocate_bits(stats, cfg)
    for row in alloc.bits:  # per layer: at least one 3-bit and one 2-bit expert, within budget
        assert 3 in row and 2 in row and sum(row) <= 4 * 2.25 + 1e-9
    q = quantize_model(copy.deepcopy(model), QuantConfig(group_size=64, expert_bits=alloc.bits))
    assert [layer.experts.bits for layer in q.moe_layers] == alloc.bits
    with pytest.raises(ValueError, match="objective"):
        allocate_bits(expert_stats(model, _batches(1), (1, 2, 3), 64), cfg)


def test_pruned_router_protects_and_drops_by_attention_times_l1_norm():
    from moekit.compress import PrunedRouter
    from moekit.compress.prune import importance_masks

    # received x ||h||_1 for one sequence of 4 tokens: [0.1*4, 0.5*1, 0.2*3, 0.4*0.5] = [.4, .5, .6, .2]
    received = torch.tensor([[0.1, 0.5, 0.2, 0.4]])
    h = torch.tensor([[4.0, 1.0, 3.0, 0.5]])
    protect, drop = importance_masks(received, h, 0.25, 0.25)
    assert protect.tolist() == [[False, False, True, False]] and drop.tolist() == [
        [False, False, False, True]
    ]
    # In a router: 4 tokens whose top-2 weights are (0.6, 0.4), threshold 1 prunes every second slot,
    # except on the protected token 2; token 3 loses both experts (weights 0, no NaN).
    cfg = MoEConfig(dim=2, ffn_dim=4, num_experts=4, top_k=2)
    base = Router(cfg)
    with torch.no_grad():
        base.weight.zero_()
        base.weight[0, 0], base.weight[1, 0] = math.log(0.6 / 0.4) + 1.0, 1.0
    x = torch.tensor([[1.0, 3.0], [1.0, 0.0], [1.0, 2.0], [1.0, -0.5]]).double()
    x = x / x[:, :1]  # channel 0 = 1 for every token: same routing, different ||x||_1 (4, 1, 3, 1.5)
    router = PrunedRouter(base.double(), threshold=1.0, protect_top=0.25, drop_bottom=0.25)
    router.attention_received = torch.tensor([[0.1, 0.5, 0.2, 0.4]], dtype=torch.float64)
    out = router(x)
    # importance = [.4, .5, .6, .6]: token 2 and 3 tie at .6; argsort keeps the first, so token 2
    # is protected; the least important is token 0.
    assert out.expert_ids_TK.tolist() == [[-1, -1], [0, -1], [0, 1], [0, -1]]
    assert out.weights_TK.flatten().tolist() == pytest.approx([0, 0, 1, 0, 0.6, 0.4, 1, 0])
    assert router.attention_received is None  # consumed by the call


def test_attention_probs_reproduce_the_attention_output_and_received_is_the_column_mean():
    from moekit.compress.prune import attention_probs, received_attention

    model = _tiny().double()
    seen = {}
    attn = model.layers[1].self_attn
    handle = attn.register_forward_hook(lambda m, a, o: seen.update(args=a, out=o))
    model(torch.randint(0, 512, (2, 6)))
    handle.remove()
    x, cos, sin, mask = seen["args"][:4]
    probs = attention_probs(attn, x, cos, sin, mask)
    b, s, _ = x.shape
    v = attn.v_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = v.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    out = attn.o_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))
    torch.testing.assert_close(out, seen["out"], rtol=1e-9, atol=1e-9)
    got = received_attention(probs)
    for j in range(s):  # key j is seen by the s - j queries i >= j
        torch.testing.assert_close(got[:, j], probs.mean(1)[:, j:, j].sum(-1) / (s - j))


def test_dynamic_prune_per_layer_thresholds_ranking_and_protection():
    from moekit.compress import rank_layers_by_pruning_loss

    model = _tiny()
    calib = _batches(2)
    ranked = rank_layers_by_pruning_loss(model, calib, [0.9, 0.0])
    assert ranked[0] == (1, 0.0) and ranked[1][0] == 0 and ranked[1][1] > 0  # threshold 0 changes nothing
    ids = torch.randint(0, 512, (2, 20))
    # Per-layer thresholds: layer 0 prunes every second slot, layer 1 never.
    dynamic_prune(model, PruneConfig(thresholds=[1.0, 0.0], protect_top=0.0))
    routing = model(ids).routing
    assert expert_calls_saved(routing[:1]) == pytest.approx(0.5) and expert_calls_saved(routing[1:]) == 0.0
    # Only the layer with the smaller pruning loss (num_layers=1); at thresholds [1, 1] both lose.
    ranked = rank_layers_by_pruning_loss(model, calib, [1.0, 1.0])
    dynamic_prune(model, PruneConfig(threshold=1.0, num_layers=1, protect_top=0.0), calibration=calib)
    routing = model(ids).routing
    first = ranked[0][0]
    assert expert_calls_saved([routing[first]]) == pytest.approx(0.5)
    assert expert_calls_saved([routing[1 - first]]) == 0.0
    with pytest.raises(ValueError, match="calibration"):
        dynamic_prune(model, PruneConfig(num_layers=1))
    # Protection (MC-MoE default 2% of tokens; here 10% of 20 = 2 per sequence) in prefill only.
    dynamic_prune(model, PruneConfig(threshold=1.0, protect_top=0.1))
    for r in model(ids).routing:
        assert ((r.expert_ids >= 0).sum(-1) == 2).view(2, 20).sum(-1).tolist() == [2, 2]
    assert PruneConfig().protect_top == 0.02
    with pytest.raises(ValueError, match="thresholds"):
        dynamic_prune(model, PruneConfig(thresholds=[0.5]))
