"""MoExtend as published (issue 20 item 1): layer choice by the routing shift of router tuning
(a hand-built model whose shifts and source experts are computed by hand), router-only tuning
through the engine, and the calibration module p' = p + MLP(p) on a hand-computed case."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moekit.layers import MoEConfig, Router
from moekit.surgery import (
    EXTENSION_FREEZE,
    CalibratedRouter,
    ExtendConfig,
    changed_tensors,
    consolidate_extension,
    extend_experts,
    snapshot,
    train_steps,
)
from moekit.surgery.extend import extension_freeze_check
from tests.test_surgery import VOCAB, make, moe_config, tokens


def _std_unbiased(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def test_moextend_picks_layers_by_router_tuning_shift_hand_built():
    # Hand-built: every token carries +10 on channel 0; channel 1 is +10 for ids 50..69 and -10
    # for 70..96. The original routers of all 4 MoE layers prefer experts 0 > 1 > 2 > 3 on channel
    # 0, so p = [.5, .5, 0, 0] everywhere. The "tuned" copy changes layers 1 and 3 only:
    #   layer 1: logits (2a, a - 2b, -a, 4a) -> {3, 0} when b > 0, {3, 1} when b < 0;
    #   layer 3: logits (2a, a, 6a, 3a + 2b) -> {2, 3} when b > 0, {2, 0} when b < 0.
    model = make(moe_config(num_experts=4, num_layers=4))
    new = tokens(4, 17, 50, VOCAB, seed=2)
    with torch.no_grad():
        emb = model.embed_tokens.weight
        emb[:, :2] = 0.0
        emb[:, 0] = 10.0
        emb[50:70, 1], emb[70:, 1] = 10.0, -10.0
        for layer in model.layers:
            w = layer.mlp.router.weight
            w.zero_()
            w[0, 0], w[1, 0], w[2, 0], w[3, 0] = 2.0, 1.0, -1.0, -2.0
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        w1, w3 = tuned.layers[1].mlp.router.weight, tuned.layers[3].mlp.router.weight
        w1[3, 0], w1[1, 1] = 4.0, -2.0
        w3[2, 0], w3[3, 0], w3[3, 1] = 6.0, 3.0, 2.0
    n = new.numel()
    n_pos = int(((new >= 50) & (new < 70)).sum())
    f_pos, f_neg = n_pos / (2 * n), (n - n_pos) / (2 * n)
    assert 0 < n_pos < n
    p = [0.5, 0.5, 0.0, 0.0]
    q = {0: p, 1: [f_pos, f_neg, 0.0, 0.5], 2: p, 3: [f_neg, 0.0, 0.5, f_pos]}
    expected = [_std_unbiased([qe - pe for qe, pe in zip(q[j], p)]) for j in range(4)]
    from moekit.surgery import router_tuning_shift

    shifts, after = router_tuning_shift(model, tuned, new, "std")
    assert shifts == pytest.approx(expected, abs=1e-5)
    assert shifts[0] == pytest.approx(0.0, abs=1e-5) and shifts[2] == pytest.approx(0.0, abs=1e-5)
    assert shifts[3] > shifts[1] > 0.3  # std(layer 3)^2 - std(layer 1)^2 = f_pos / 3 > 0
    assert [after[j].tolist() for j in (1, 3)] == [
        [n_pos, n - n_pos, 0, n],
        [n - n_pos, 0, n, n_pos],
    ]
    from moekit.surgery.extend import extended_layers

    half = extend_experts(model, ExtendConfig.moextend(calibrate=False), new, tuned=tuned)
    assert extended_layers(half) == [1, 3]
    one = extend_experts(model, ExtendConfig.moextend(shift_fraction=0.25), new, tuned=tuned)
    assert extended_layers(one) == [3]
    # Source expert = argmax q: expert 2 in layer 3 (expert 3 in layer 1), copied with the ORIGINAL
    # router's row (the extended model keeps the untuned routers).
    mlp = one.layers[3].mlp
    assert torch.equal(mlp.experts.new_w_in[0], model.layers[3].mlp.experts.w_in[2])
    assert torch.equal(mlp.router.new_weight[0], model.layers[3].mlp.router.weight[2])
    assert torch.equal(half.layers[1].mlp.experts.new_w_in[0], model.layers[1].mlp.experts.w_in[3])
    assert isinstance(mlp.router, CalibratedRouter) and mlp.router.is_identity()


def test_tune_routers_trains_only_routers_through_the_engine():
    from moekit.surgery import tune_routers

    model = make(moe_config(num_experts=4))
    new = tokens(4, 17, 50, VOCAB, seed=2)
    before = snapshot(model)
    tuned = tune_routers(model, new, steps=3, lr=1e-2)
    assert changed_tensors(model, before) == []  # input untouched
    changed = changed_tensors(tuned, before)
    assert changed == ["layers.0.mlp.router.weight", "layers.1.mlp.router.weight"]
    # End to end without a given tuned copy: tunes, selects, extends (fraction 0.5 of 2 layers).
    ext = extend_experts(model, ExtendConfig.moextend(tune_steps=3), new)
    from moekit.surgery.extend import extended_layers

    assert len(extended_layers(ext)) == 1
    with pytest.raises(ValueError, match="router_tuning"):
        ExtendConfig(shift_source="bogus")
    with pytest.raises(ValueError, match="tune_steps"):
        ExtendConfig(tune_steps=0)


def test_calibrated_router_matches_hand_computed_p_plus_mlp_p():
    # A = 3 experts (2 old + 1 new), M = 2 hidden units, one token, float64 throughout.
    cfg = MoEConfig(dim=2, ffn_dim=4, num_experts=2, top_k=2)
    old = Router(cfg).double()
    with torch.no_grad():
        old.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    router = CalibratedRouter(
        old, cfg.replace(num_experts=3), torch.tensor([[0.5, 0.5]], dtype=torch.float64), None, hidden=2
    )
    with torch.no_grad():
        router.calib_w1.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        router.calib_b1.copy_(torch.tensor([0.0, -0.5]))
        router.calib_w2.copy_(torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 2.0]]))
        router.calib_b2.copy_(torch.tensor([0.0, 0.0, 0.1]))
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    # logits (2, 1, 1.5) -> p = softmax; h = gelu(p0), gelu(p2 - 0.5); p' = p + (-h0, 0, h0 + 2 h1 + 0.1)
    logits = [2.0, 1.0, 1.5]
    z = sum(math.exp(v) for v in logits)
    prob = [math.exp(v) / z for v in logits]

    def gelu(v: float) -> float:
        return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))

    h0, h1 = gelu(prob[0]), gelu(prob[2] - 0.5)
    cal = [prob[0] - h0, prob[1], prob[2] + h0 + 2 * h1 + 0.1]
    order = sorted(range(3), key=lambda e: -cal[e])[:2]
    assert order == [2, 1] and sorted(range(3), key=lambda e: -prob[e])[:2] == [0, 2]  # p' reorders
    out = router(x)
    assert out.expert_ids_TK.tolist() == [order]
    want = [cal[e] / (cal[order[0]] + cal[order[1]]) for e in order]
    assert out.weights_TK[0].tolist() == pytest.approx(want, abs=1e-8)
    assert out.probs_TE[0].tolist() == pytest.approx(prob, abs=1e-12)


def test_calibration_starts_as_identity_trains_and_blocks_consolidation():
    model = make(moe_config(num_experts=4))
    old, new = tokens(4, 17, 0, 50), tokens(4, 17, 50, VOCAB, seed=2)
    plain_cfg = ExtendConfig(layers="all", shift_source="data")
    calib = extend_experts(model, plain_cfg.replace(calibrate=True), new)
    plain = extend_experts(model, plain_cfg, new)
    assert torch.equal(calib(old).logits, plain(old).logits)  # MLP's last layer is zero at init
    assert torch.equal(consolidate_extension(calib)(old).logits, consolidate_extension(plain)(old).logits)
    trainable = set(extension_freeze_check(calib))
    assert {"layers.0.mlp.router.calib_w2", "layers.1.mlp.router.calib_b1"} <= trainable
    train_steps(calib, [torch.cat([new, new[:, :1]], 1)], 3, lr=1e-2, freeze=EXTENSION_FREEZE)
    assert not calib.layers[0].mlp.router.is_identity()
    with pytest.raises(ValueError, match="calibration MLP"):
        consolidate_extension(calib)
