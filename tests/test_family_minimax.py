"""MiniMax's lightning attention against oracles: the float64 token-by-token recurrence (forward and
gradients, any block size, from a carried state), transformers' own ``MiniMaxLightningAttention`` on
the same weights, decoding through the cache, and the export of its derived decay tables. The round
trips (logits, 20 greedy tokens, export) are in tests/test_convert_families.py."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.blocks import KVCache, LightningAttention, LightningConfig, lightning_scan, lightning_slopes  # noqa: E402

torch.set_num_threads(1)


def _recurrence(q, k, v, slope, state):
    """o_t = q_t S_t, S_t = exp(-s) S_{t-1} + k_t^T v_t, one token at a time (float64)."""
    outs = []
    decay = torch.exp(-slope)
    for t in range(q.shape[2]):
        state = decay * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ state)[:, :, 0])
    return torch.stack(outs, 2), state


@pytest.mark.parametrize("block", [1, 3, 4, 64])
def test_block_scan_equals_the_recurrence_forward_and_grads(block):
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 10, 4)
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    state0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    slope = lightning_slopes(3, 1, 4).double()
    got, got_state = lightning_scan(q, k, v, slope, state0, block)
    want, want_state = _recurrence(q, k, v, slope, state0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_state, want_state, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad((got.square().sum() + got_state.sum()), (q, k, v))
    gb = torch.autograd.grad((want.square().sum() + want_state.sum()), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lightning_matches_transformers_and_decodes_through_the_cache():
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = transformers.MiniMaxConfig(
        hidden_size=16, num_attention_heads=2, head_dim=8, num_hidden_layers=3, block_size=3
    )
    torch.manual_seed(0)
    theirs = MiniMaxLightningAttention(cfg, 1).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    ours = LightningAttention(LightningConfig(dim=16, num_heads=2, head_dim=8, num_layers=3, block_size=5), 1)
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if k in ours.state_dict()})
    assert torch.equal(ours.slope_rate, theirs.slope_rate)  # the same decay rates, computed here
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        want = theirs(x, None, None)[0]
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)
        cache = KVCache(1)
        ours.layer_idx = 0  # one-layer cache; the slope stays layer 1's
        steps = [ours(x[:, :5], None, cache)] + [ours(x[:, t : t + 1], None, cache) for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="recurrent state over 8 tokens"):
        cache.crop(4)


def test_padding_tokens_leave_the_state_alone():
    layer = LightningAttention(LightningConfig(dim=8, num_heads=2, head_dim=4, num_layers=2), 0)
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[False, False, True, True, True, True]])
    with torch.no_grad():
        padded = layer(x, mask)[:, 2:]
        alone = layer(x[:, 2:])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
