"""The paper presets as shipped (issue 20 item 8): top-p routing with its entropy loss, and
SMoE-Dropout's frozen random router with self-slimming k, each checked against hand-written math
on the real preset, plus the PR-MoE pyramid preset (item 7)."""

from __future__ import annotations

import pytest
import torch

from moekit.models import MoEForCausalLM, get_preset
from moekit.models.objectives import CausalLMObjective, LossWeights
from moekit.surgery import train_steps

torch.set_num_threads(1)


def _ids(b: int = 2, s: int = 12, vocab: int = 4096, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def test_topp_preset_routes_by_the_top_p_rule_without_renormalising():
    cfg = get_preset("topp-small")
    moe = cfg.moe
    assert (moe.router_type, moe.top_p, moe.top_p_renormalize, moe.max_k) == ("top_p", 0.4, False, None)
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg).double().eval()
    with torch.no_grad():  # spread the router logits so tokens keep different numbers of experts
        for layer in model.moe_layers:
            layer.router.weight.mul_(4.0)
    with torch.no_grad():
        out = model(_ids())
    counts = set()
    for r in out.routing:
        probs = r.router_probs
        for t in range(probs.shape[0]):
            p = probs[t].tolist()
            order = sorted(range(len(p)), key=lambda e: -p[e])
            kept, mass = [], 0.0
            for e in order:  # keep an expert while the mass before it is <= p (strict '>' crossing)
                if mass > 0.4:
                    break
                kept.append(e)
                mass += p[e]
            ids = [int(i) for i in r.expert_ids[t] if i >= 0]
            assert ids == kept
            weights = [float(w) for w, i in zip(r.weights[t], r.expert_ids[t]) if i >= 0]
            assert weights == pytest.approx([p[e] for e in kept], abs=1e-12)  # not renormalised
            counts.add(len(kept))
    assert counts == {1, 2, 3}  # experts per token vary (measured at this seed and scale)


def test_topp_preset_entropy_loss_is_read_weighted_and_lowers_entropy():
    cfg = get_preset("topp-small")
    assert cfg.entropy_loss_coef == 1e-4
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg).double().eval()
    batch = _ids(2, 13)
    with torch.no_grad():
        out = model(batch[:, :-1])
    # Hand: mean over MoE layers of the mean over tokens of -sum_e p log p.
    per_layer = [float((-(r.router_probs * r.router_probs.log()).sum(-1)).mean()) for r in out.routing]
    assert float(out.aux_losses["entropy"]) == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-6)
    weights = LossWeights.from_model_config(cfg)
    assert weights.entropy == 1e-4
    res = CausalLMObjective(weights).loss(out, batch)
    no_entropy = CausalLMObjective(weights.replace(entropy=0.0)).loss(out, batch)
    assert float(res.loss - no_entropy.loss) == pytest.approx(
        1e-4 * float(out.aux_losses["entropy"]), rel=1e-9
    )
    # Training with a large entropy weight makes routing more confident than training without it.
    tiny = get_preset("moe-tiny")
    tiny = tiny.replace(moe=tiny.moe.replace(router_type="top_p", top_p=0.4), entropy_loss_coef=1.0)
    data = [_ids(4, 17, 512, seed=s) for s in range(2)]
    ents = {}
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        m = MoEForCausalLM(tiny.replace(entropy_loss_coef=coef))
        with torch.no_grad():
            before = float(m.eval()(data[0][:, :-1]).aux_losses["entropy"])
        train_steps(m, data, 20, lr=1e-2)
        with torch.no_grad():
            ents[coef] = float(m(data[0][:, :-1]).aux_losses["entropy"])
    assert ents[1.0] < ents[0.0] and ents[1.0] < before


def test_smoe_dropout_preset_frozen_random_router_and_self_slimming():
    cfg = get_preset("smoe-dropout-small")
    assert cfg.moe.router_type == "random_fixed" and cfg.aux_loss_coef == 0.0
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg).double().eval()
    for layer in model.moe_layers:
        assert not layer.router.weight.requires_grad and not layer.router.bias.requires_grad
    ids = _ids()
    for k in (1, 2, 4, 8):  # any k at inference; weights = softmax over the k largest raw logits
        with torch.no_grad():
            routing = model(ids, moe_k=k).routing
        for r in routing:
            top = r.router_logits.topk(k, dim=-1)
            assert torch.equal(r.expert_ids, top.indices)
            torch.testing.assert_close(r.weights, torch.softmax(top.values, dim=-1), rtol=0, atol=1e-12)
    # Training goes through the engine and never moves the router (weight and bias).
    router_state = {
        n: t.clone() for n, t in model.state_dict().items() if ".router." in n and t.is_floating_point()
    }
    other = model.layers[0].mlp.experts.w_in.detach().clone()
    train_steps(model, [_ids(2, 13)], 2, lr=1e-2)
    now = model.state_dict()
    assert router_state and all(torch.equal(now[n], t) for n, t in router_state.items())
    assert not torch.equal(model.layers[0].mlp.experts.w_in, other)


def test_prmoe_preset_is_a_residual_top1_pyramid_hand_checked():
    from moekit.layers.experts import activate

    cfg = get_preset("prmoe-small")
    assert cfg.moe_layer_ids == [1, 3] and cfg.experts_per_layer == (4, 8)
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg).double().eval()
    assert [m.config.num_experts for m in model.moe_layers] == [4, 8]  # fewer early, more late
    x = torch.randn(5, cfg.dim, dtype=torch.float64)
    for layer in model.moe_layers:
        with torch.no_grad():
            got = layer(x).hidden
            probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
            p1, e1 = probs.max(-1)
            moe = torch.stack(
                [
                    p1[t]
                    * (
                        activate(x[t] @ layer.experts.w_in[e1[t]].t(), "swiglu")
                        @ layer.experts.w_out[e1[t]].t()
                    )
                    for t in range(5)
                ]
            )
            coef = torch.softmax(layer.residual_coef(x), dim=-1)
            want = coef[:, :1] * moe + coef[:, 1:] * layer.residual_mlp(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="pyramid"):
        from moekit.models.presets import prmoe_small

        prmoe_small((8, 4))
