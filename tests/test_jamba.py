"""transformers' Jamba through moekit: tiny random models built with ``transformers.JambaConfig``
import with the same logits and greedy tokens (with and without the cache) and export back exactly."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from moekit.blocks import MambaConfig  # noqa: E402
from moekit.convert import from_pretrained, save_hf  # noqa: E402
from moekit.convert.families.jamba import find_period  # noqa: E402
from moekit.layers import MoEConfig  # noqa: E402
from moekit.models import MoEForCausalLM  # noqa: E402
from moekit.models.config import ModelConfig  # noqa: E402
from moekit.models.layer_layouts import layout_from_pattern  # noqa: E402

VOCAB = 100
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=4,
    intermediate_size=40,
    num_experts=4,
    num_experts_per_tok=2,
    attn_layer_period=4,
    attn_layer_offset=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,
    initializer_range=0.1,
    use_mamba_kernels=False,
)
VARIANTS = {
    "default": {},
    # Other SSM shapes, layouts and routing: d_state/d_conv/expand/dt_rank, proj biases, no conv
    # bias, attention first and every 3rd, MoE on even layers, top-1 and top-3, head_dim.
    "shapes": dict(
        mamba_d_state=4,
        mamba_d_conv=2,
        mamba_expand=3,
        mamba_dt_rank=5,
        mamba_proj_bias=True,
        mamba_conv_bias=False,
    ),
    "layout": dict(
        num_hidden_layers=5,
        attn_layer_period=3,
        attn_layer_offset=0,
        expert_layer_period=2,
        expert_layer_offset=0,
        num_experts_per_tok=1,
        tie_word_embeddings=True,
    ),
    "top3": dict(num_experts=6, num_experts_per_tok=3, attn_layer_period=2, attn_layer_offset=1, head_dim=12),
}


def make_hf(**overrides):
    cfg = transformers.JambaConfig(**(BASE | overrides))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "A_log" not in name:
                p.add_(torch.randn_like(p) * 0.1)  # norms, D, biases: every tensor matters
            elif "A_log" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("jamba")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_jamba_round_trip(variant, tmp):
    torch.set_num_threads(1)
    overrides = VARIANTS[variant]
    if "head_dim" in overrides:
        head_dim = overrides.pop("head_dim")
        hf = make_hf(**overrides)
        hf.config.head_dim = head_dim
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(hf.config).eval()
        overrides["head_dim"] = head_dim
    else:
        hf = make_hf(**overrides)
    src = tmp / f"{variant}-hf"
    hf.save_pretrained(src)
    model = from_pretrained(src)
    cfg = model.config
    assert not cfg.use_rope and cfg.mamba.dt_bc_norm and cfg.moe.norm_topk_prob is False
    assert [cfg.layer_type(i) for i in range(cfg.num_layers)] == [
        "attention" if t == "attention" else "mamba" for t in hf.config.layers_block_type
    ]
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_layers)] == [
        n > 1 for n in hf.config.layers_num_experts
    ]

    x = ids()
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding: Jamba zeroes those positions before the conv and the scan
    with torch.no_grad():
        ref, got = hf(x).logits, model(x).logits
        assert (ref - got).abs().max() < 1e-5
        ref_pad, got_pad = hf(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
        assert (ref_pad - got_pad)[mask.bool()].abs().max() < 1e-5

    prompt = ids(1, 5, seed=2)
    hf.generation_config.eos_token_id = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=20), want)
    assert torch.equal(model.generate(prompt, max_new_tokens=20, use_cache=False), want)

    out = tmp / f"{variant}-export"
    model.save_pretrained(out, format="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "jamba" and config["architectures"] == ["JambaForCausalLM"]
    again = from_pretrained(out)
    assert again.config == model.config
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf2(x).logits - ref).abs().max() < 1e-5
    ours, theirs = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_moekit_hybrid_exports_to_jamba_and_refusals(tmp):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=24,
        moe=MoEConfig(dim=32, ffn_dim=24, num_experts=4, top_k=2, norm_topk_prob=False),
        mamba=MambaConfig(dim=32, state_dim=4, dt_bc_norm=True),
        use_rope=False,
        **layout_from_pattern("mMaMmM"),
    )
    model = MoEForCausalLM(cfg).eval()
    save_hf(model, tmp / "moekit-jamba")
    hf_cfg = json.loads((tmp / "moekit-jamba" / "config.json").read_text())
    assert hf_cfg["model_type"] == "jamba"
    assert (hf_cfg["attn_layer_period"], hf_cfg["attn_layer_offset"]) == (4, 2)  # the smallest period
    assert (hf_cfg["expert_layer_period"], hf_cfg["expert_layer_offset"]) == (2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "moekit-jamba").eval()
    x = ids()
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max() < 1e-5

    with pytest.raises(ValueError, match="moe_layer_indices.*not periodic"):
        save_hf(MoEForCausalLM(cfg.replace(moe_layer_indices=(1, 2))), tmp / "bad1")
    with pytest.raises(ValueError, match="use_rope"):
        save_hf(MoEForCausalLM(cfg.replace(use_rope=True)), tmp / "bad2")
    with pytest.raises(ValueError, match="norm_topk_prob"):
        save_hf(MoEForCausalLM(cfg.replace(moe=cfg.moe.replace(norm_topk_prob=True))), tmp / "bad3")
    # Attention-only families refuse a hybrid rather than dropping its Mamba layers.
    with pytest.raises(ValueError, match="layer_types"):
        save_hf(model, tmp / "bad4", family="qwen3_moe")
    with pytest.raises(ValueError, match="hidden_act"):
        from moekit.convert import config_from_hf

        config_from_hf(make_hf().config.to_dict() | {"hidden_act": "gelu"})


def test_find_period():
    assert find_period(8, [4]) == (5, 4)
    assert find_period(8, [1, 3, 5, 7]) == (2, 1)
    assert find_period(6, [0, 3]) == (3, 0)
    assert find_period(6, [1, 2]) is None
    assert find_period(4, []) == (5, 4)
