"""JetMoE's mixture of attention heads against transformers' own ``JetMoeAttention`` on the same
weights, and against itself token by token through the KV cache; the MoE output bias. The round
trips (logits, 20 greedy tokens, export) are in tests/test_convert_families.py."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.blocks import KVCache, MixtureOfAttentionHeads, MoAConfig, RopeConfig, RotaryEmbedding  # noqa: E402

torch.set_num_threads(1)


def _pair(top_k=2, num_kv=2, head=8):
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeAttention, JetMoeRotaryEmbedding

    cfg = transformers.JetMoeConfig(
        hidden_size=16,
        num_key_value_heads=num_kv,
        kv_channels=head,
        num_local_experts=4,
        num_experts_per_tok=top_k,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = JetMoeAttention(cfg, 0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    ours = MixtureOfAttentionHeads(
        MoAConfig(dim=16, num_experts=4, top_k=top_k, num_kv_heads=num_kv, head_dim=head), 0
    )
    with torch.no_grad():
        ours.router.weight.copy_(theirs.experts.router.layer.weight)
        ours.w_q.copy_(theirs.experts.input_linear.weight)
        ours.w_o.copy_(theirs.experts.output_linear.weight)
        ours.kv_proj.weight.copy_(theirs.kv_proj.weight)
        ours.out_bias.copy_(theirs.experts.bias)
    return theirs, ours, JetMoeRotaryEmbedding(cfg)


@pytest.mark.parametrize(("top_k", "num_kv", "head"), [(2, 2, 8), (3, 1, 4), (1, 2, 8)])
def test_moa_matches_transformers_attention(top_k, num_kv, head):
    theirs, ours, hf_rope = _pair(top_k, num_kv, head)
    x = torch.randn(2, 7, 16)
    pos = torch.arange(7)[None].expand(2, -1)
    cos, sin = hf_rope(x, pos)
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = theirs(x, attention_mask=causal, position_embeddings=(cos, sin))[0]
        rope = RotaryEmbedding(RopeConfig(head_dim=head))
        got = ours(x, *rope(pos, 7), None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_moa_decodes_through_the_cache_like_the_full_forward():
    _, ours, _ = _pair()
    rope = RotaryEmbedding(RopeConfig(head_dim=8))
    x = torch.randn(1, 6, 16)
    pos = torch.arange(6)[None]
    with torch.no_grad():
        full = ours(x, *rope(pos, 6), None)
        cache = KVCache(1)
        steps = [ours(x[:, :3], *rope(pos[:, :3], 6), None, cache)]
        for t in range(3, 6):
            mask = torch.ones(1, 1, 1, t + 1, dtype=torch.bool)
            steps.append(ours(x[:, t : t + 1], *rope(pos[:, t : t + 1], 6), mask, cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)


def test_moe_output_bias_is_added_once():
    from moekit.layers import MoEConfig, MoELayer

    layer = MoELayer(
        MoEConfig(dim=8, ffn_dim=4, num_experts=4, top_k=2, softmax_order="after_topk", output_bias=True)
    )
    plain = MoELayer(layer.config.replace(output_bias=False))
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "output_bias"})
    with torch.no_grad():
        layer.output_bias.copy_(torch.arange(8.0))
        x = torch.randn(5, 8)
        torch.testing.assert_close(layer(x).hidden, plain(x).hidden + torch.arange(8.0))
    assert not layer.supports_fast_decode
