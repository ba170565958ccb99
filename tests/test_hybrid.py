"""Hybrid Mamba/attention decoders: layouts, the hybrid cache, decoding = full forward, padding."""

from __future__ import annotations

import pytest
import torch

from moekit.blocks import KVCache, MambaConfig, MambaMixer
from moekit.layers import MoEConfig
from moekit.models import MoEForCausalLM
from moekit.models.config import ModelConfig
from moekit.models.decode import DecodeSession, fast_decode_supported
from moekit.models.layer_layouts import layout_from_pattern, periodic_layer_ids, periodic_layer_types


def _hybrid(pattern="mMaM", use_rope=False, attention_type="mha", seed=0, **kw):
    torch.manual_seed(seed)
    extra = {}
    if attention_type == "mla":
        extra = dict(
            attention_type="mla", kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4
        )
    cfg = ModelConfig(
        vocab_size=61,
        dim=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=48,
        moe=MoEConfig(dim=32, ffn_dim=24, num_experts=4, top_k=2),
        mamba=MambaConfig(dim=32, state_dim=4, conv_kernel=3, dt_bc_norm=True, chunk_size=4),
        use_rope=use_rope,
        **layout_from_pattern(pattern),
        **extra,
        **kw,
    )
    model = MoEForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so every layer moves the logits
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return model


def test_layouts_and_validation():
    assert periodic_layer_types(8, 8, 4) == ("mamba",) * 4 + ("attention",) + ("mamba",) * 3
    assert periodic_layer_ids(6, 2, 1) == (1, 3, 5)
    lay = layout_from_pattern("mM aA")
    assert lay["layer_types"] == ("mamba", "mamba", "attention", "attention")
    assert lay["moe_layer_indices"] == (1, 3)
    assert layout_from_pattern("mama")["moe_placement"] == "none"
    with pytest.raises(ValueError, match="one letter per layer"):
        layout_from_pattern("mxa")
    base = dict(vocab_size=8, dim=16, num_heads=2, ffn_dim=8, num_layers=2)
    with pytest.raises(ValueError, match="mamba is None"):
        ModelConfig(**base, layer_types=("mamba", "attention"))
    with pytest.raises(ValueError, match="layer_types has 1 entries"):
        ModelConfig(**base, layer_types=("mamba",), mamba=MambaConfig(dim=16))
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig(**base, layer_types=("mamba", "rnn"), mamba=MambaConfig(dim=16))
    with pytest.raises(ValueError, match="mamba.dim=8 must equal dim=16"):
        ModelConfig(**base, layer_types=("mamba", "attention"), mamba=MambaConfig(dim=8))
    cfg = _hybrid().config
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.mamba_layer_ids == [0, 1, 3] and cfg.moe_layer_ids == [1, 3]


def test_layers_get_the_right_mixers():
    model = _hybrid("maMA")
    kinds = [type(layer.mamba or layer.self_attn).__name__ for layer in model.layers]
    assert kinds == ["MambaMixer", "Attention", "MambaMixer", "Attention"]
    assert [layer.is_moe for layer in model.layers] == [False, False, True, True]
    assert all(not layer.self_attn.rope for layer in model.layers if layer.self_attn is not None)
    assert not fast_decode_supported(model)
    assert isinstance(model.layers[0].mamba, MambaMixer)
    # The SSM parameters keep Mamba's init (A = -(1..N)), not the generic one.
    torch.manual_seed(0)
    fresh = MoEForCausalLM(model.config)
    a_log = fresh.layers[0].mamba.A_log
    torch.testing.assert_close(a_log[0], torch.log(torch.arange(1, 5, dtype=torch.float32)))


@pytest.mark.parametrize(
    ("pattern", "use_rope", "attention_type"),
    [("mMaM", False, "mha"), ("aMmA", True, "mha"), ("Ma", True, "mla"), ("mm", False, "mha")],
)
def test_generate_with_cache_equals_full_forward(pattern, use_rope, attention_type):
    model = _hybrid(pattern, use_rope=use_rope, attention_type=attention_type)
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(1))
    cached = model.generate(ids, max_new_tokens=10)
    reference = model.generate(ids, max_new_tokens=10, use_cache=False)
    assert torch.equal(cached, reference)
    # Seeded sampling follows the logits more closely than greedy (which may repeat one token).
    sampled = [
        model.generate(
            ids, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(7), use_cache=c
        )
        for c in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1])
    assert len(set(sampled[0][0, 7:].tolist())) > 3


def test_cached_forward_in_pieces_matches_one_forward():
    model = _hybrid()
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config.num_layers)
        parts = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        parts.append(model(ids[:, 5:9], past_key_values=cache).logits)
        parts += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.seq_len == 12 and cache.mamba_state(0) is not None and cache.mamba_state(2) is None


def test_left_padded_batch_decodes_like_each_row_alone():
    model = _hybrid()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 61, (1, 8), generator=g), torch.randint(0, 61, (1, 5), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(out[0, 8:], model.generate(a, max_new_tokens=10)[0, 8:])
    assert torch.equal(out[1, 8:], model.generate(b, max_new_tokens=10)[0, 5:])


def test_session_uses_general_layers_and_training_gradients_flow():
    model = _hybrid()
    session = DecodeSession(model, torch.randint(0, 61, (1, 4)), max_new_tokens=2)
    assert not session.fast
    model.train()
    ids = torch.randint(0, 61, (2, 9))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for layer in (0, 1, 3):
        mixer = model.layers[layer].mamba
        for name in ("A_log", "D", "conv1d.weight", "dt_proj.bias", "x_proj.weight"):
            grad = mixer.get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, (layer, name)


def test_mamba_cache_refuses_rollback():
    model = _hybrid()
    with torch.no_grad():
        out = model(torch.randint(0, 61, (1, 6)), use_cache=True)
    with pytest.raises(ValueError, match="cannot be rolled back"):
        out.past_key_values.crop(3)


def test_hybrid_folder_round_trip(tmp_path):
    model = _hybrid()
    model.save_pretrained(tmp_path / "hybrid")
    again = MoEForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert again.config == model.config
    x = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
