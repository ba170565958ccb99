"""moekit.blocks on their own: configs, parameter names, and each block against a slow reference."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moekit.blocks import (
    Attention,
    AttentionConfig,
    KVCache,
    MLAConfig,
    MLAttention,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
)


def test_blocks_import_without_the_decoder_lm():
    # Other families import blocks; that must not pull in moekit.models (or anything above).
    code = "import sys, moekit.blocks; print(sorted(m for m in sys.modules if m.startswith('moekit.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = {name.split(".")[1] for name in eval(out)}  # noqa: S307 - our own printed list
    assert loaded <= {"blocks", "config", "kernels", "layers"}, loaded


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (AttentionConfig, dict(dim=8, num_heads=4, num_kv_heads=3, head_dim=2), "num_kv_heads"),
        (AttentionConfig, dict(dim=8, num_heads=4, num_kv_heads=2, head_dim=2, qk_norm="x"), "qk_norm"),
        (RopeConfig, dict(head_dim=7), "head_dim"),
        (RopeConfig, dict(head_dim=8, scaling={"rope_type": "yarn", "factr": 2.0}), "scaling"),
        (
            MLAConfig,
            dict(dim=8, num_heads=2, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=3, v_head_dim=2),
            "qk_rope_head_dim",
        ),
    ],
)
def test_bad_block_config_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_configs_round_trip_through_json():
    for cfg in (
        AttentionConfig(dim=8, num_heads=4, num_kv_heads=2, head_dim=2, qk_norm="per_head", bias=True),
        RopeConfig(head_dim=8, scaling={"rope_type": "linear", "factor": 2.0}),
        MLAConfig(dim=8, num_heads=2, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2),
    ):
        assert type(cfg).from_json(cfg.to_json()) == cfg


def test_parameter_names_are_the_saved_names():
    attn = Attention(
        AttentionConfig(dim=8, num_heads=4, num_kv_heads=2, head_dim=2, qk_norm="per_head", bias=True), 0
    )
    assert set(attn.state_dict()) == {
        "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
        "o_proj.weight", "q_norm.weight", "k_norm.weight",
    }  # fmt: skip
    mla = MLAttention(
        MLAConfig(
            dim=8,
            num_heads=2,
            kv_lora_rank=4,
            qk_nope_head_dim=2,
            qk_rope_head_dim=2,
            v_head_dim=2,
            q_lora_rank=3,
        ),
        0,
    )
    assert set(mla.state_dict()) == {
        "q_a_proj.weight", "q_a_norm.weight", "q_b_proj.weight", "kv_a_proj.weight", "kv_a_norm.weight",
        "kv_b_proj.weight", "o_proj.weight",
    }  # fmt: skip
    assert set(RMSNorm(4).state_dict()) == {"weight"}
    assert not RotaryEmbedding(RopeConfig(head_dim=4)).state_dict()  # tables are rebuilt, never saved


def _reference_attention(attn: Attention, x, positions, window=None):
    """Per-query loop in float64: RoPE by explicit angles, softmax over the allowed keys."""
    b, s, _ = x.shape
    h, g, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, s, h, d)
    k = attn.k_proj(x).view(b, s, g, d)
    v = attn.v_proj(x).view(b, s, g, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    inv = torch.tensor([10000.0 ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)

    def rope(t, pos):
        ang = pos * inv
        cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
        return t * cos + torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1) * sin

    out = torch.zeros(b, s, h, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(s):
            for hi in range(h):
                gi = hi // (h // g)
                keys = [j for j in range(i + 1) if window is None or i - j < window]
                qi = rope(q[bi, i, hi], float(positions[i]))
                scores = torch.stack(
                    [qi @ rope(k[bi, j, gi], float(positions[j])) for j in keys]
                ) / math.sqrt(d)
                out[bi, i, hi] = sum(p * v[bi, j, gi] for p, j in zip(scores.softmax(0), keys))
    return attn.o_proj(out.reshape(b, s, h * d))


@pytest.mark.parametrize("window", [None, 2])
def test_attention_matches_the_slow_reference_with_cache_and_window(window):
    torch.manual_seed(0)
    cfg = AttentionConfig(dim=8, num_heads=4, num_kv_heads=2, head_dim=4, qk_norm="per_head")
    attn = Attention(cfg, layer_idx=0).double()
    rotary = RotaryEmbedding(RopeConfig(head_dim=4, max_position_embeddings=4))  # grows on demand
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    pos = torch.arange(6)
    expected = _reference_attention(attn, x, pos, window)
    cos, sin = rotary(pos.expand(2, -1))
    mask = build_attention_mask(None, 2, 6, 0, window, x.device)
    torch.testing.assert_close(attn(x, cos.double(), sin.double(), mask), expected)
    # The same through a KV cache: 4 tokens, then 2.
    cache = KVCache(1)
    parts = []
    for lo, hi in ((0, 4), (4, 6)):
        cos, sin = rotary(pos[lo:hi].expand(2, -1))
        mask = build_attention_mask(None, 2, hi - lo, lo, window, x.device)
        parts.append(attn(x[:, lo:hi], cos.double(), sin.double(), mask, cache))
    torch.testing.assert_close(torch.cat(parts, 1), expected)
    assert cache.seq_len == 6


def test_rms_norm_and_rotary_definitions():
    x = torch.randn(3, 8, dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-5).double()
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), eps=1e-5))
    # Rotating by position p then q equals rotating by p + q (a rotation group), in float32 tables.
    rotary = RotaryEmbedding(RopeConfig(head_dim=8))
    t = torch.randn(1, 1, 1, 8)
    c, s = rotary(torch.tensor([[3, 4, 7]]))
    twice = apply_rotary(apply_rotary(t, c[:, :, :1], s[:, :, :1]), c[:, :, 1:2], s[:, :, 1:2])
    torch.testing.assert_close(twice, apply_rotary(t, c[:, :, 2:], s[:, :, 2:]), atol=1e-5, rtol=1e-5)
