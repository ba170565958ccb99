"""Pre-gated MoE: routing of MoE layer l+1 is top-k of its router on layer l's input, on every path."""

from __future__ import annotations

import pytest
import torch

from moekit.layers import MoEConfig, MoELayer
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.decode import DecodeSession, _static_decode_step, fast_decode_supported
from moekit.surgery import to_pregated


def _model(num_layers=3, dtype=torch.float64, **moe):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=num_layers,
        num_heads=4,
        ffn_dim=48,
        moe=MoEConfig(dim=32, ffn_dim=24, num_experts=6, top_k=2, **moe),
    )
    model = MoEForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # sharper routers than the near-uniform init, so routes differ by input
        for mlp in model.moe_layers:
            mlp.router.weight.normal_(0, 0.5)
    return model


def _moe_inputs(model, ids):
    """Each MoE layer's input ``[B, S, D]``, captured by hooks during a forward."""
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0]), with_kwargs=True)
        for m in model.moe_layers
    ]
    try:
        out = model(ids)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def _topk_by_hand(x_TD, weight_ED, k):
    """The top-k softmax router written out: ids sorted ascending per token, renormalised weights."""
    probs_TE = torch.softmax(x_TD @ weight_ED.t(), dim=-1)
    vals, ids = probs_TE.topk(k, dim=-1)
    vals = vals / vals.sum(-1, keepdim=True)
    order = ids.argsort(-1)
    return ids.gather(-1, order), vals.gather(-1, order)


def _sorted(ids_TK, w_TK):
    order = ids_TK.argsort(-1)
    return ids_TK.gather(-1, order), w_TK.gather(-1, order)


def test_routing_of_layer_l_plus_1_is_topk_of_its_pregate_on_layer_l_input():
    model = to_pregated(_model())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out, x = _moe_inputs(model, ids)
    layers = model.moe_layers
    for index, info in enumerate(out.routing):
        src = x[0] if index == 0 else x[index - 1]  # the first MoE layer keeps its own gate
        want_ids, want_w = _topk_by_hand(src.reshape(-1, 32), layers[index].router.weight, 2)
        got_ids, got_w = _sorted(info.expert_ids, info.weights)
        assert torch.equal(got_ids, want_ids), index
        torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
    # The test can fail: routing from each layer's own input picks other experts somewhere.
    own_ids, _ = _topk_by_hand(x[2].reshape(-1, 32), layers[2].router.weight, 2)
    assert not torch.equal(_sorted(out.routing[2].expert_ids, out.routing[2].weights)[0], own_ids)


def test_moe_layer_with_a_router_input_matches_a_hand_written_oracle_forward_and_grads():
    torch.manual_seed(2)
    mlp = MoELayer(MoEConfig(dim=16, ffn_dim=12, num_experts=4, top_k=2)).double()
    with torch.no_grad():
        mlp.router.weight.normal_(0, 0.5)
    x_prev = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    x_cur = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(9, 16, dtype=torch.float64)

    def oracle(x_prev, x_cur, w_router):
        probs = torch.softmax(x_prev @ w_router.t(), -1)
        vals, ids = probs.topk(2, -1)
        vals = vals / vals.sum(-1, keepdim=True)
        rows = []
        for t in range(x_cur.shape[0]):
            y = 0
            for slot in range(2):
                e = int(ids[t, slot])
                h = x_cur[t] @ mlp.experts.w_in[e].t()
                gate, up = h.chunk(2)
                y = y + vals[t, slot] * ((torch.nn.functional.silu(gate) * up) @ mlp.experts.w_out[e].t())
            rows.append(y)
        return torch.stack(rows)

    got = mlp(x_cur, router_input=x_prev).hidden
    want = oracle(x_prev, x_cur, mlp.router.weight)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = [x_prev, x_cur, mlp.router.weight, mlp.experts.w_in]
    g_got = torch.autograd.grad((got * r).sum(), params)
    g_want = torch.autograd.grad((want * r).sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_got[0].abs().sum() > 0  # the pre-gate trains through the previous layer's input


@pytest.mark.parametrize("batch", [1, 2])
def test_pregated_decode_fast_general_and_full_forward_agree(batch):
    model = to_pregated(_model())
    prompt = torch.randint(0, 64, (batch, 5), generator=torch.Generator().manual_seed(3))
    assert fast_decode_supported(model)
    runs = []
    for fast in (True, False):
        session = DecodeSession(model, prompt, max_new_tokens=6)
        assert session.fast  # the fast path supports pregated models
        session.fast = fast
        scores = [session.prefill()]
        for _ in range(5):
            scores.append(session.step(scores[-1].argmax(-1)))
        runs.append(torch.stack(scores))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-9)
    # The whole sequence through model.forward gives the same next-token logits at every step.
    ids = torch.cat([prompt, torch.stack([s.argmax(-1) for s in runs[1][:-1]], 1)], 1)
    with torch.no_grad():
        full = model(ids).logits[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(runs[1].transpose(0, 1), full.float(), rtol=1e-6, atol=1e-6)
    # And the same model unpregated decodes differently (the flag is read on these paths).
    plain = _model()
    session = DecodeSession(plain, prompt, max_new_tokens=6)
    assert not torch.allclose(session.prefill(), runs[0][0])


def test_the_compile_step_function_routes_pregated_too():
    model = to_pregated(_model())
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(4))
    session = DecodeSession(model, prompt, max_new_tokens=2)
    first = session.prefill().argmax(-1)
    cache = session.cache
    num_keys = prompt.shape[1] + 1
    mask = session._mask_B11C[..., :num_keys]
    cos, sin = session._cos_NB11d[0], session._sin_NB11d[0]
    with torch.no_grad():
        eager = _static_decode_step(model, first, cos, sin, mask, cache.keys, cache.values, None)
        full = model(torch.cat([prompt, first[:, None]], 1)).logits[:, -1]
    torch.testing.assert_close(eager, full.float(), rtol=1e-6, atol=1e-6)


def test_to_pregated_is_pure_round_trips_and_refuses_what_it_cannot_do(tmp_path):
    base = _model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = to_pregated(base)
    assert model.config.pregated and not base.config.pregated
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    # Each pre-gate starts as the router of the layer it selects for.
    for a, b in zip(model.moe_layers, base.moe_layers, strict=True):
        assert torch.equal(a.router.weight, b.router.weight)
    model.save_pretrained(tmp_path / "pg")
    back = MoEForCausalLM.from_pretrained(tmp_path / "pg", dtype=torch.float64).eval()
    assert back.config.pregated
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already pregated"):
        to_pregated(model)
    with pytest.raises(ValueError, match="at least two"):
        to_pregated(_model(num_layers=1))
    with pytest.raises(ValueError, match="gating_residual"):
        _model().config.replace(
            moe=MoEConfig(dim=32, ffn_dim=24, num_experts=6, gating_residual=True), pregated=True
        )
    with pytest.raises(ValueError, match="pregated needs MoE"):
        ModelConfig(vocab_size=8, dim=8, num_layers=1, num_heads=2, ffn_dim=8, pregated=True)


def test_hf_and_gguf_export_refuse_a_pregated_model_in_one_line(tmp_path):
    from moekit.cli.main import main
    from moekit.convert import save_hf

    model = to_pregated(_model())
    with pytest.raises(ValueError, match="pregated model") as err:
        save_hf(model, tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "hf" / "config.json").exists()
    model.save_pretrained(tmp_path / "pg")
    assert (
        main(["convert", "--from", str(tmp_path / "pg"), "--to", str(tmp_path / "hf2"), "--format", "hf"])
        == 2
    )


def test_fine_tuning_a_pregated_model_through_the_engine_lowers_its_loss_and_saves(tmp_path, capsys):
    from moekit.cli.main import main
    from moekit.surgery import train_steps

    base = _model(dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    assert main(["pregate", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "pg")]) == 0
    assert "pregated" in capsys.readouterr().out
    model = MoEForCausalLM.from_pretrained(tmp_path / "pg")
    assert model.config.pregated
    torch.manual_seed(5)
    batches = [torch.randint(0, 16, (4, 17)) for _ in range(2)]
    router_before = model.moe_layers[1].router.weight.detach().clone()
    losses = train_steps(model, batches, steps=15, lr=3e-3)
    assert losses[-1] < losses[0] - 0.3
    assert not torch.equal(model.moe_layers[1].router.weight, router_before)  # the pre-gate trained
    model.save_pretrained(tmp_path / "tuned")
    back = MoEForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    ids = batches[0][:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
