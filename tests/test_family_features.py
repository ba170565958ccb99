"""The ModelConfig/AttentionConfig features added for more HF families, against slow float64
references written from the formulas (not from the blocks), and the decode paths they take."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.blocks import Attention, AttentionConfig, RopeConfig, RotaryEmbedding
from moekit.models import MoEForCausalLM, get_preset
from moekit.models.decode import fast_decode_supported


def _rotate_pairs(x, pos, inv_freq, rot, interleave):
    """Reference RoPE of one head vector ``x [Dh]`` at ``pos``: rotates ``rot`` leading dims."""
    out = x.clone()
    half = rot // 2
    for j in range(half):
        a, b = (2 * j, 2 * j + 1) if interleave else (j, j + half)
        ang = pos * inv_freq[j]
        c, s = math.cos(ang), math.sin(ang)
        out[a] = x[a] * c - x[b] * s
        out[b] = x[b] * c + x[a] * s
    return out


def _rms(v, w, eps):
    return v / torch.sqrt(v.pow(2).mean() + eps) * w


def reference_attention(attn: Attention, cfg: AttentionConfig, x_SD, inv_freq, rot, interleave):
    """Causal attention of one sequence, token by token and head by head, in float64."""
    s_len = x_SD.shape[0]
    h, g, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = attn.q_proj(x_SD).view(s_len, h, dh)
    k = attn.k_proj(x_SD).view(s_len, g, dh)
    v = attn.v_proj(x_SD).view(s_len, g, dh)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    out = torch.zeros(s_len, h, dh, dtype=x_SD.dtype)
    scale = cfg.softmax_scale if cfg.softmax_scale is not None else dh**-0.5

    def prep(vec, norm, pos):
        if cfg.qk_norm == "per_head" and not cfg.qk_norm_after_rope:
            vec = _rms(vec, norm.weight, norm.eps)
        vec = _rotate_pairs(vec, pos, inv_freq, rot, interleave)
        if cfg.qk_norm_after_rope:
            vec = _rms(vec, norm.weight, norm.eps)
        return vec

    for t in range(s_len):
        for head in range(h):
            kv = head // (h // g)
            qv = prep(q[t, head], getattr(attn, "q_norm", None), t)
            scores = torch.stack(
                [qv @ prep(k[u, kv], getattr(attn, "k_norm", None), u) * scale for u in range(t + 1)]
            )
            p = torch.softmax(scores, 0)
            out[t, head] = sum(p[u] * v[u, kv] for u in range(t + 1))
    return attn.o_proj(out.reshape(s_len, h * dh))


CASES = {
    "partial_rope": dict(rot_factor=0.5),
    "interleave": dict(rope_interleave=True),
    "scale_clip_bias": dict(softmax_scale=0.3, clip_qkv=0.4, out_bias=True, bias=True),
    "qk_norm_after_rope": dict(qk_norm="per_head", qk_norm_after_rope=True),
    "qk_norm_partial": dict(qk_norm="per_head", rot_factor=0.25),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_features_match_reference(case):
    opts = dict(CASES[case])
    rot_factor = opts.pop("rot_factor", 1.0)
    cfg = AttentionConfig(dim=16, num_heads=4, num_kv_heads=2, head_dim=8, **opts)
    torch.manual_seed(0)
    attn = Attention(cfg, 0).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    rot = int(cfg.head_dim * rot_factor)
    rope = RotaryEmbedding(RopeConfig(head_dim=rot, theta=100.0, max_position_embeddings=16))
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    pos = torch.arange(7)[None]
    cos, sin = rope(pos)
    got = attn(x, cos.double(), sin.double(), None)[0]
    want = reference_attention(attn, cfg, x[0], rope.inv_freq, rot, cfg.rope_interleave)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # RoPE tables are float32


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_multipliers_and_norm_placement_match_reference(placement):
    """A 1-layer model: embedding/residual multipliers, logits scaling, pre/post norm order."""
    base = get_preset("moe-tiny")
    cfg = base.replace(
        num_layers=1,
        qk_norm="none",
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        logits_scaling=3.0,
        norm_placement=placement,
        norm_type="layernorm",
        norm_bias=True,
    )
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg).double().eval()
    layer = model.layers[0]
    x_ids = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        h = model.embed_tokens(x_ids) * 2.0
        cos, sin = model.rotary(torch.arange(6)[None])
        if placement == "pre":
            h = h + 0.5 * layer.self_attn(layer.input_layernorm(h), cos, sin, None)
            h = h + 0.5 * layer.mlp(layer.post_attention_layernorm(h)).hidden
        else:
            h = h + 0.5 * layer.post_attention_layernorm(layer.self_attn(h, cos, sin, None))
            h = h + 0.5 * layer.post_feedforward_layernorm(layer.mlp(h).hidden)
        want = model.lm_head(model.norm(h)) / 3.0
        got = model(x_ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not fast_decode_supported(model)
    prompt = x_ids[:, :3]
    assert torch.equal(
        model.generate(prompt, max_new_tokens=6), model.generate(prompt, max_new_tokens=6, use_cache=False)
    )


@pytest.mark.parametrize(
    ("fields", "fast"),
    [
        (dict(partial_rotary_factor=0.5), True),
        (dict(rope_interleave=True), True),
        (dict(qk_norm_after_rope=True), True),
        (dict(attention_multiplier=0.2), False),
        (dict(clip_qkv=1.0), False),
        (dict(norm_placement="post"), False),
    ],
)
def test_fast_decode_path_takes_or_declines_each_feature(fields, fast):
    """Which decode path runs, and that it gives the general layers' tokens."""
    from moekit.models.decode import DecodeSession

    torch.manual_seed(0)
    model = MoEForCausalLM(get_preset("moe-tiny").replace(num_layers=1, **fields)).eval()
    assert fast_decode_supported(model) is fast
    prompt = torch.randint(0, 512, (2, 4))
    tokens = {}
    for use_fast in (True, False):
        session = DecodeSession(model, prompt, max_new_tokens=4)
        session.fast = session.fast and use_fast
        logits, out = session.prefill(), []
        for _ in range(4):
            nxt = logits.argmax(-1)
            out.append(nxt)
            logits = session.step(nxt)
        tokens[use_fast] = torch.stack(out, 1)
    assert torch.equal(tokens[True], tokens[False])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(partial_rotary_factor=0.01), "partial_rotary_factor"),
        (dict(residual_multiplier=0.0), "residual_multiplier"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(norm_bias=True), "norm_bias"),
        (dict(norm_placement="sandwich"), "norm_placement"),
        (dict(qk_norm="none", qk_norm_after_rope=True), "qk_norm_after_rope"),
        (dict(clip_qkv=-1.0), "clip_qkv"),
        (dict(tie_word_embeddings=True, lm_head_bias=True), "lm_head_bias"),
    ],
)
def test_bad_feature_values_name_the_field(fields, field):
    with pytest.raises(ValueError, match=field):
        get_preset("moe-tiny").replace(**fields)
