"""More Hugging Face MoE families, beyond the round trips of ``test_convert_families.py``:
sparsemixer against transformers' eval path, left padding, refusals by name, and a transformers
cache bug that moekit does not copy."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.convert import from_pretrained  # noqa: E402
from moekit.models import MoEForCausalLM  # noqa: E402
from tests.test_convert_families import (  # noqa: E402
    LINEAR,
    _saved,
    hf_config,
    ids,
    make_hf,
    max_diff,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.1, 0.5])
def test_sparsemixer_matches_transformers_eval_path(eps):
    """moekit's sparsemixer strategy against transformers' own function, on logits whose margins bite."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from moekit.layers import MoEConfig
    from moekit.layers.strategies import SparseMixerRouting

    g = torch.Generator().manual_seed(0)
    logits = (
        torch.randn(200, 8, generator=g, dtype=torch.float64)
        * torch.tensor([0.05, 1.0, 3.0]).repeat(67)[:200, None].double()
    )
    cfg = MoEConfig(dim=8, ffn_dim=8, num_experts=8, router_type="sparsemixer", sparsemixer_eps=eps)
    ids_TK, weights_TK, _ = SparseMixerRouting.select(cfg, logits, None, 2, training=False)
    want_w, want_ids = sparsemixer(logits, jitter_eps=eps, training=False)
    assert torch.equal(ids_TK, want_ids)
    torch.testing.assert_close(weights_TK, want_w, rtol=0, atol=1e-15)
    # The margin masks experts for some tokens (so the test would notice a plain softmax).
    plain = torch.softmax(logits, -1).gather(-1, ids_TK[:, :1])
    assert eps == 0.0 or bool((weights_TK[:, :1] - plain).abs().max() > 1e-3)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("glm4_moe", {}),
        ("ernie4_5_moe", {}),
        ("phimoe", dict(sliding_window=4)),
        ("granitemoeshared", {}),
        ("flex_olmo", {}),
        ("gpt_oss", {}),
        ("llama4_text", {}),
        ("jetmoe", {}),
        ("minimax", {}),
    ],
)
def test_left_padding_matches_hf(family, overrides, tmp_path):
    hf = make_hf(family, **overrides)
    hf.save_pretrained(tmp_path / "pad")
    model = from_pretrained(tmp_path / "pad")
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        ref, got = hf(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
    assert max_diff(ref[mask.bool()], got[mask.bool()]) < 1e-5


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "option", "pattern"),
    [
        ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
        ("deepseek_v2", {"attention_bias": True}, "attention_bias"),
        ("deepseek_v2", {"mlp_bias": True}, "mlp_bias"),
        ("glm4_moe", {"hidden_act": "gelu"}, "hidden_act"),
        ("granitemoe", {"attention_bias": True}, "attention_bias"),
        ("granitemoe", {"shared_intermediate_size": 8}, "shared_intermediate_size"),
        ("ernie4_5_moe", {"use_bias": True}, "use_bias"),
        ("ernie4_5_moe", {"moe_norm_min": 0.9}, "moe_norm_min"),
        ("phimoe", {"num_experts_per_tok": 3}, "num_experts_per_tok"),
        ("phimoe", {"rope_parameters": LINEAR}, "rope_type"),
        ("dbrx", {"ffn_config": {"moe_normalize_expert_weights": 2.0}}, "moe_normalize_expert_weights"),
        ("dbrx", {"ffn_config": {"ffn_act_fn": {"name": "gelu"}}}, "ffn_act_fn"),
        ("dbrx", {"tie_word_embeddings": True}, "tie_word_embeddings"),
        ("jetmoe", {"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
        (
            "gpt_oss",
            {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
            "layer_types",
        ),
        ("llama4_text", {"layer_types": ["sliding_attention"] * 4}, "layer_types"),
    ],
)
def test_unmodelled_hf_option_is_refused_by_name(family, option, pattern):
    from moekit.convert import config_from_hf

    hf = hf_config(family).to_dict()
    for key, value in option.items():
        # DBRX's nested ffn_config is edited key by key; other options replace the value.
        hf[key] = hf[key] | value if key == "ffn_config" else value
    with pytest.raises(ValueError, match=pattern):
        config_from_hf(hf)


def _exportable(**fields):
    from moekit.models import get_preset

    return MoEForCausalLM(get_preset("moe-tiny").replace(**fields))


@pytest.mark.parametrize(
    ("fields", "family", "pattern"),
    [
        (dict(partial_rotary_factor=0.5), None, "partial_rotary_factor"),
        (dict(residual_multiplier=0.5), "qwen3_moe", "residual_multiplier"),
        (dict(clip_qkv=2.0), "qwen3_moe", "clip_qkv"),
        (dict(norm_type="layernorm", norm_bias=True), "qwen3_moe", "norm_type"),
        (dict(rope_interleave=True), "qwen3_moe", "rope_interleave"),
        (dict(logits_scaling=2.0), "glm4_moe", "logits_scaling"),
        (dict(qk_norm="none"), "phimoe", "router_type"),
        (dict(), "dbrx", "qk_norm|norm_type"),
        (dict(), "deepseek_v2", "attention_type"),
    ],
)
def test_inexpressible_feature_refuses_export(fields, family, pattern, tmp_path):
    from moekit.convert import save_hf

    with pytest.raises(ValueError, match=pattern):
        save_hf(_exportable(**fields), tmp_path / "out", family=family)


@pytest.mark.parametrize(
    ("model_type", "pattern"),
    [
        ("granitemoehybrid", "model_type 'granitemoehybrid' is not supported: .*Mamba2"),
        ("qwen3_next", "DeltaNet"),
        ("gpt2", "unknown Hugging Face model_type 'gpt2'"),
    ],
)
def test_unsupported_family_is_named_with_the_supported_ones(model_type, pattern):
    from moekit.convert import config_from_hf

    with pytest.raises(ValueError, match=pattern) as err:
        config_from_hf({"model_type": model_type})
    for family in (
        "glm4_moe",
        "deepseek_v2",
        "granitemoe",
        "granitemoeshared",
        "ernie4_5_moe",
        "phimoe",
        "dbrx",
    ):
        assert family in str(err.value)


def test_minimax_cache_bug_in_transformers_is_not_copied(tmp_path):
    """transformers 5.24's MiniMax decodes differently with its cache than without it when layer 0
    is a lightning layer and a sliding window is set (its mask reads the cache length from layer
    0, which holds no keys). moekit, with or without its cache, gives transformers' no-cache tokens."""
    hf = make_hf(
        "minimax",
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        sliding_window=5,
    )
    prompt = ids(1, 5, seed=2)
    hf.generation_config.eos_token_id = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
        uncached = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, use_cache=False)
    assert not torch.equal(cached, uncached)  # the upstream bug; drop this test once it is fixed
    model = from_pretrained(_saved(hf, tmp_path / "hf"))
    assert torch.equal(model.generate(prompt, max_new_tokens=20), uncached)
    assert torch.equal(model.generate(prompt, max_new_tokens=20, use_cache=False), uncached)
