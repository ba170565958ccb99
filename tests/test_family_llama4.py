"""Llama 4's own features against oracles: routing weights on the expert input (transformers'
``Llama4TextMoe`` on the same weights, and a float64 loop for k > 1 with padding), chunked masks
that count real tokens under left padding (transformers' own mask function), the attention
temperature (its formula by hand) and the weightless L2 q/k norm. The round trips (logits, 20
greedy tokens, export) are in tests/test_convert_families.py."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.blocks import Attention, AttentionConfig, build_attention_mask  # noqa: E402
from moekit.layers import MoEConfig, MoELayer  # noqa: E402

torch.set_num_threads(1)


def test_weights_on_input_matches_transformers_moe():
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = transformers.Llama4TextConfig(hidden_size=16, intermediate_size=12, num_local_experts=4)
    torch.manual_seed(0)
    theirs = Llama4TextMoe(cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    ours = MoELayer(
        MoEConfig(
            dim=16,
            ffn_dim=12,
            num_experts=4,
            top_k=1,
            score_func="sigmoid",
            norm_topk_prob=False,
            shared_ffn_dim=12,
            weights_on_input=True,
        )
    )
    with torch.no_grad():
        ours.router.weight.copy_(theirs.router.weight)
        ours.experts.w_in.copy_(theirs.experts.gate_up_proj.transpose(1, 2))
        ours.experts.w_out.copy_(theirs.experts.down_proj.transpose(1, 2))
        sh = theirs.shared_expert
        ours.shared.w_in.weight.copy_(torch.cat([sh.gate_proj.weight, sh.up_proj.weight]))
        ours.shared.w_out.weight.copy_(sh.down_proj.weight)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        want, _ = theirs(x)
        got = ours(x).hidden
    torch.testing.assert_close(got.reshape(-1, 16), want, rtol=1e-5, atol=1e-6)
    # Weights on the input differ from weights on the output (the experts are nonlinear).
    plain = MoELayer(ours.config.replace(weights_on_input=False))
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert float((plain(x).hidden - got).abs().max()) > 1e-4


def test_weights_on_input_top2_with_padding_matches_the_float64_loop():
    torch.manual_seed(1)
    layer = MoELayer(
        MoEConfig(dim=8, ffn_dim=6, num_experts=4, top_k=2, score_func="sigmoid", weights_on_input=True)
    ).double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True])
    out = layer(x, token_mask=mask)
    ids, weights = out.routing.expert_ids, out.routing.weights
    rows = []
    for t in range(3):
        acc = torch.zeros(8, dtype=torch.float64)
        for slot in range(2):
            e = int(ids[t, slot])
            if e >= 0:
                acc = acc + layer.experts.expert_forward(e, (weights[t, slot] * x[t])[None])[0]
        rows.append(acc)
    want = torch.stack(rows)
    torch.testing.assert_close(out.hidden, want, rtol=1e-12, atol=1e-12)
    assert not out.hidden[1].any()  # the padding token gets no routed output
    g1 = torch.autograd.grad(out.hidden.sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(want.sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


def test_chunked_mask_counts_real_tokens_like_transformers():
    from transformers.masking_utils import chunked_causal_mask_function, padding_mask_function

    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, :3] = 0
    ours = build_attention_mask(pad, 2, 9, 0, None, torch.device("cpu"), chunk_size=4)
    left = torch.tensor([0, 3])
    fn, real = chunked_causal_mask_function(4, left), padding_mask_function(pad.bool())
    for b in range(2):
        for q in range(9):
            for k in range(9):
                b_, q_, k_ = torch.tensor(b), torch.tensor(q), torch.tensor(k)
                want = bool(fn(b_, 0, q_, k_)) and bool(real(b_, 0, q_, k_))
                if pad[b, q]:  # rows of padding queries are unused (moekit lets them see themselves)
                    assert bool(ours[b, 0, q, k]) == want, (b, q, k)
    # Without padding: slots [4c, 4c + 4) see only their own chunk.
    plain = build_attention_mask(None, 1, 9, 0, None, torch.device("cpu"), chunk_size=4)[0, 0]
    assert plain[5].tolist() == [False] * 4 + [True, True] + [False] * 3


def test_temperature_and_l2_norm_by_hand():
    cfg = AttentionConfig(
        dim=8, num_heads=2, num_kv_heads=1, head_dim=4, rope=False, temperature_scale=0.5, temperature_floor=3
    )
    attn = Attention(cfg, 0)
    scale = attn.temperature(2, 5, torch.device("cpu"))[:, 0].tolist()
    want = [1 + 0.5 * math.log1p(math.floor((p + 1) / 3)) for p in range(2, 7)]
    assert scale == pytest.approx(want, abs=1e-6)
    assert scale[0] == pytest.approx(1 + 0.5 * math.log(2), abs=1e-6)  # slot 2: floor(3 / 3) = 1
    from moekit.blocks.attention import l2_norm

    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    torch.testing.assert_close(l2_norm(x, 0.0), x / (25 / 4) ** 0.5)
