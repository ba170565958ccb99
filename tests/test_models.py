"""The MoE decoder LM: config rules, KV-cache generation, save/load, and model-level MoE invariants."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.layers import MoEConfig
from moekit.models import (
    KVCache,
    ModelConfig,
    MoEForCausalLM,
    generate,
    get_preset,
    is_moekit_folder,
    list_presets,
)

V, D = 64, 32


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: a second thread buys nothing, and on a shared 2-core machine spinning
    # OpenMP workers made the overfit test 30x slower under load.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**kw) -> ModelConfig:
    """dim 32, 2 layers, 4 heads / 2 kv heads, 4 experts top-2 unless overridden."""
    moe_kw = kw.pop("moe_kw", {})
    moe_kw.setdefault("num_experts", 4)
    moe_kw.setdefault("ffn_dim", 32)
    kw.setdefault("moe", MoEConfig(dim=D, **moe_kw))
    kw.setdefault("num_heads", 4)
    kw.setdefault("num_kv_heads", 2)
    kw.setdefault("num_layers", 2)
    kw.setdefault("ffn_dim", 64)
    return ModelConfig(vocab_size=V, dim=D, **kw)


def tiny_model(dtype=torch.float32, **kw) -> MoEForCausalLM:
    torch.manual_seed(0)
    return MoEForCausalLM(tiny_config(**kw)).to(dtype).eval()


# --- config --------------------------------------------------------------------------------------


def test_config_json_round_trip():
    cfgs = [get_preset(name) for name in list_presets()]
    cfgs.append(
        tiny_config(
            num_layers=4,
            moe_placement="explicit",
            moe_layer_indices=(1, 3),
            experts_per_layer=(4, 2),
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
            qk_norm="full",
            sliding_window=8,
        )
    )
    for cfg in cfgs:
        back = ModelConfig.from_json(cfg.to_json())
        assert back == cfg
        assert (back.moe is None) == (cfg.moe is None)
        if back.moe is not None:
            assert isinstance(back.moe, MoEConfig)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(num_heads=5), "num_heads"),
        (dict(moe=MoEConfig(dim=16, ffn_dim=8)), "moe.dim"),
        (dict(moe_placement="sometimes"), "moe_placement"),
        (dict(qk_norm="both"), "qk_norm"),
        (dict(moe_placement="explicit"), "moe_layer_indices"),
        (dict(moe_placement="explicit", moe_layer_indices=(0, 5)), "moe_layer_indices"),
        (dict(moe_layer_indices=(0,)), "moe_layer_indices"),
        (dict(experts_per_layer=(4,)), "experts_per_layer"),
        (dict(experts_per_layer=(4, 1)), "experts_per_layer"),  # fewer experts than top_k
        (dict(moe_placement="every_other", ffn_dim=0), "ffn_dim"),
        (dict(moe_layer_freq=0), "moe_layer_freq"),
        (dict(rope_scaling={"rope_type": "yarn", "factr": 2.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "rope_scaling"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(z_loss_coef=-1.0), "z_loss_coef"),
    ],
)
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        tiny_config(**kwargs)


def test_from_dict_rejects_unknown_key():
    data = tiny_config().to_dict()
    data["num_expert"] = 4
    with pytest.raises(ValueError, match="num_expert"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(), [0, 1, 2, 3, 4, 5]),
        (dict(moe_placement="every_other"), [1, 3, 5]),
        (dict(moe_placement="first_half"), [0, 1, 2]),
        (dict(moe_placement="second_half"), [3, 4, 5]),
        (dict(moe_placement="explicit", moe_layer_indices=(0, 4)), [0, 4]),
        (dict(moe_placement="none"), []),
        (dict(moe=None), []),
        (dict(num_dense_first_layers=3), [3, 4, 5]),  # DeepSeek first_k_dense_replace
        (dict(moe_layer_freq=3), [2, 5]),  # Qwen2-MoE decoder_sparse_step
        (dict(num_dense_first_layers=2, moe_layer_freq=2), [3, 5]),
    ],
)
def test_placement_rules(kwargs, expected):
    cfg = tiny_config(num_layers=6, **kwargs)
    assert cfg.moe_layer_ids == expected
    assert [cfg.is_moe_layer(i) for i in range(6)] == [i in expected for i in range(6)]


def test_explicit_placement_rejects_other_rules():
    with pytest.raises(ValueError, match="explicit"):
        tiny_config(moe_placement="explicit", moe_layer_indices=(1,), num_dense_first_layers=1)


def test_per_layer_expert_counts_and_parameter_names():
    model = tiny_model(num_layers=3, experts_per_layer=(4, 2, 6))
    names = dict(model.named_parameters())
    assert names["layers.0.mlp.experts.w_in"].shape[0] == 4
    assert names["layers.1.mlp.experts.w_out"].shape[0] == 2
    assert names["layers.2.mlp.router.weight"].shape == (6, D)
    assert "layers.0.self_attn.q_proj.weight" in names
    dense = tiny_model(moe_placement="every_other")
    assert "layers.0.mlp.w_in.weight" in dict(dense.named_parameters())
    with pytest.raises(ValueError, match="gating_residual"):
        tiny_config(experts_per_layer=(4, 2), moe_kw=dict(gating_residual=True))


def test_presets_registry():
    assert {"moe-tiny", "moe-small", "moe-base", "dense-small", "dense-base"} <= set(list_presets())
    with pytest.raises(ValueError, match="moe-small"):
        get_preset("moe-huge")
    tiny = get_preset("moe-tiny")
    assert (tiny.vocab_size, tiny.dim, tiny.num_layers, tiny.moe.num_experts, tiny.moe.top_k) == (
        512,
        64,
        2,
        4,
        2,
    )


def test_active_parameters_match_dense_twin():
    moe = MoEForCausalLM(get_preset("moe-small"))
    dense = MoEForCausalLM(get_preset("dense-small"))
    active, total = moe.num_parameters(active_only=True), moe.num_parameters()
    assert total > 2 * active
    assert abs(active - dense.num_parameters()) / dense.num_parameters() < 0.02
    assert dense.num_parameters(active_only=True) == dense.num_parameters()


def test_tied_embeddings_count_once():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = tiny_model()
    assert untied.num_parameters() - model.num_parameters() == V * D


# --- forward -------------------------------------------------------------------------------------


def test_labels_are_shifted_and_ignore_index():
    model = tiny_model()
    ids = torch.randint(0, V, (2, 10))
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, V)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, expected)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    torch.testing.assert_close(out.aux_loss, 0.01 * out.aux_losses["load_balance"])
    assert out.logits.shape == (2, 10, V) and len(out.routing) == 2
    assert model(ids).loss is None


def test_dense_model_has_zero_aux_loss():
    out = tiny_model(moe=None)(torch.randint(0, V, (1, 5)))
    assert out.routing == [] and float(out.aux_loss) == 0.0 and len(out.aux_losses) == 0


def test_one_expert_moe_equals_dense():
    moe_cfg = MoEConfig(dim=D, ffn_dim=48, num_experts=1, top_k=1)
    moe = tiny_model(dtype=torch.float64, moe=moe_cfg)
    dense = MoEForCausalLM(tiny_config(moe=None, ffn_dim=48)).double().eval()
    state = {k: v for k, v in moe.state_dict().items() if ".mlp." not in k}
    for i in range(2):
        state[f"layers.{i}.mlp.w_in.weight"] = moe.layers[i].mlp.experts.w_in[0]
        state[f"layers.{i}.mlp.w_out.weight"] = moe.layers[i].mlp.experts.w_out[0]
    dense.load_state_dict(state)
    ids = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-12, atol=1e-12)


def test_gating_residual_passes_logits_between_layers():
    model = tiny_model(moe_kw=dict(gating_residual=True))
    ids = torch.randint(0, V, (2, 6))
    before = model(ids).logits
    with torch.no_grad():
        model.layers[0].mlp.router.residual_weight.normal_()  # first MoE layer never gets a residual
    torch.testing.assert_close(model(ids).logits, before)
    with torch.no_grad():
        model.layers[1].mlp.router.residual_weight.normal_(std=5.0)
    assert not torch.allclose(model(ids).logits, before)


def test_moe_k_overrides_top_k():
    model = tiny_model()
    ids = torch.randint(0, V, (2, 6))
    assert float(model(ids).routing[0].experts_per_token) == 2.0
    out = model(ids, moe_k=1)
    assert all(float(r.experts_per_token) == 1.0 for r in out.routing)
    assert float(model(ids, moe_k=3).routing[1].experts_per_token) == 3.0


def test_attention_mask_excludes_padding_from_routing():
    model = tiny_model()
    ids = torch.randint(0, V, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = model(ids, attention_mask=mask)
    for info in out.routing:
        assert float(info.tokens_per_expert.sum()) == 10 * 2  # 10 real tokens, top-2
    assert torch.isfinite(out.logits).all()


def test_gradient_checkpointing_matches():
    model = tiny_model(dtype=torch.float64).train()
    ids = torch.randint(0, V, (2, 8))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_overfit_tiny_batch():
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(ffn_dim=64, moe_kw=dict(ffn_dim=64))).train()
    ids = torch.randint(0, V, (8, 32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(ids, labels=ids).lm_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.detach().item() < 0.1


# --- rope ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1},
    ],
)  # fmt: skip
def test_rope_scaling_matches_transformers(rope_scaling):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    cfg = tiny_config(rope_scaling=rope_scaling, max_position_embeddings=256, rope_theta=500.0)
    hf = LlamaConfig(
        hidden_size=D,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_theta": 500.0, **rope_scaling},
    )
    fn = rope_utils.ROPE_INIT_FUNCTIONS[rope_scaling["rope_type"]]
    hf_inv, hf_scale = fn(hf, torch.device("cpu"))
    inv, scale = cfg.rope_inv_freq_and_scale()
    torch.testing.assert_close(torch.tensor(inv, dtype=torch.float32), hf_inv.float(), rtol=1e-5, atol=0)
    assert scale == pytest.approx(hf_scale)


def test_rope_tables_stay_float32_in_bf16():
    model = tiny_model(dtype=torch.bfloat16)
    assert model.rotary.cos.dtype == torch.float32
    out = model(torch.randint(0, V, (1, 5)))
    assert out.logits.dtype == torch.bfloat16


# --- generation and KV cache ---------------------------------------------------------------------

GEN_VARIANTS = [
    dict(),
    dict(qk_norm="per_head", sliding_window=4),  # Qwen3-MoE / Mixtral
    dict(qk_norm="full", moe_kw=dict(norm_topk_prob=False)),  # OLMoE
    # Qwen2-MoE: qkv bias, gated shared expert, decoder_sparse_step=2.
    dict(attention_bias=True, moe_layer_freq=2, moe_kw=dict(shared_ffn_dim=16, shared_expert_gate=True)),
    # DeepSeek-V3: dense first layer, sigmoid group-limited routing with expert bias, yarn.
    dict(
        num_layers=3,
        num_dense_first_layers=1,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        moe_kw=dict(
            score_func="sigmoid",
            num_expert_groups=2,
            num_limited_groups=1,
            use_expert_bias=True,
            routed_scaling_factor=2.5,
        ),
    ),
    # MoE++ with gating residual, top-p routing, PR-MoE pyramid.
    dict(moe_kw=dict(gating_residual=True, num_zero_experts=1, num_copy_experts=1, num_constant_experts=1)),
    dict(moe_kw=dict(router_type="top_p", top_p=0.4)),
    dict(experts_per_layer=(2, 4), moe_kw=dict(residual_moe=True)),
]


@pytest.mark.parametrize("kwargs", GEN_VARIANTS)
def test_generation_cache_matches_no_cache_and_padding(kwargs):
    # float64 so that argmax ties or routing flips from rounding cannot make the paths disagree.
    model = tiny_model(dtype=torch.float64, **kwargs)
    torch.manual_seed(1)
    rows = [torch.randint(1, V, (n,)) for n in (7, 4, 5)]
    singles = [model.generate(r[None], max_new_tokens=8, use_cache=False) for r in rows]
    for row, single in zip(rows, singles):
        assert torch.equal(model.generate(row[None], max_new_tokens=8), single)
    # Left-padded batch: each row equals its unpadded single-row result.
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    for use_cache in (True, False):
        batch = generate(model, ids, attention_mask=mask, max_new_tokens=8, use_cache=use_cache)
        for i, single in enumerate(singles):
            assert torch.equal(batch[i, width:], single[0, len(rows[i]) :])


def test_generation_eos_pad_sampling_streamer():
    model = tiny_model()
    prompt = torch.randint(1, V, (2, 3))
    greedy = model.generate(prompt, max_new_tokens=6)
    eos = int(greedy[0, 4])  # the second generated token of row 0
    out = model.generate(prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert int(out[0, 4]) == eos and (out[0, 5:] == 0).all()
    seen = []
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(
        prompt, max_new_tokens=5, do_sample=True, top_k=5, top_p=0.9, generator=g1, streamer=seen.append
    )
    s2 = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=5, top_p=0.9, generator=g2)
    assert torch.equal(s1, s2) and len(seen) == 5 and torch.equal(torch.stack(seen, 1), s1[:, 3:])


def test_kv_cache_grows_in_chunks():
    cache = KVCache(num_layers=1, chunk_size=4)
    k = torch.randn(2, 1, 3, 8)
    cache.update(0, k, k)
    first = cache.keys[0]
    assert cache.capacity(0) == 4
    cache.update(0, k[:, :, :1], k[:, :, :1])
    assert cache.keys[0] is first  # filled in place, no reallocation
    all_k, _ = cache.update(0, k, k)
    assert cache.capacity(0) == 8 and cache.seq_len == 7
    torch.testing.assert_close(all_k[:, :, 4:], k)
    torch.testing.assert_close(all_k[:, :, :3], k)


def test_prefill_in_two_chunks_matches_full_forward():
    model = tiny_model(dtype=torch.float64, sliding_window=5)
    ids = torch.randint(0, V, (2, 9))
    full = model(ids).logits
    first = model(ids[:, :6], use_cache=True)
    second = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full)


# --- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model = tiny_model(tie_word_embeddings=True, moe_kw=dict(use_expert_bias=True))
    with torch.no_grad():
        model.layers[0].mlp.router.expert_bias.normal_()
    model.save_pretrained(tmp_path)
    assert is_moekit_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "moekit" and "moekit_version" in config
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = MoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, V, (2, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    bf16 = MoEForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16(ids).logits.float(), model(ids).logits, atol=0.05, rtol=0.05)
    # format="hf" goes through moekit.convert, which refuses the softmax expert bias (no HF family has it).
    with pytest.raises(ValueError, match="use_expert_bias"):
        model.save_pretrained(tmp_path / "hf", format="hf")


def test_load_errors_name_the_problem(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)

    missing = dict(tensors)
    del missing["layers.1.mlp.router.weight"]
    save_file(missing, weights)
    with pytest.raises(ValueError, match=r"missing tensor.*layers\.1\.mlp\.router\.weight"):
        MoEForCausalLM.from_pretrained(tmp_path)

    shaped = dict(tensors)
    shaped["norm.weight"] = torch.ones(D + 1)
    save_file(shaped, weights)
    with pytest.raises(ValueError, match=r"norm\.weight.*shape \(33,\).*\(32,\)"):
        MoEForCausalLM.from_pretrained(tmp_path)

    extra = dict(tensors, **{"layers.9.mlp.w_in.weight": torch.ones(2)})
    save_file(extra, weights)
    with pytest.raises(ValueError, match=r"unknown tensor.*layers\.9"):
        MoEForCausalLM.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 32}))
    assert not is_moekit_folder(tmp_path)
    with pytest.raises(ValueError, match="config.json is not a moekit config"):
        MoEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json not found"):
        MoEForCausalLM.from_pretrained(tmp_path)


def test_dense_first_layer_exports_as_qwen3_moe_mlp_only_layers(tmp_path):
    """moe-small's layout (layer 0 dense): the HF folder says mlp_only_layers=[0] and transformers'
    Qwen3-MoE reproduces the logits."""
    from transformers import AutoModelForCausalLM

    assert get_preset("moe-small").dense_layer_indices == [0]
    torch.manual_seed(0)
    model = MoEForCausalLM(get_preset("moe-tiny").replace(num_dense_first_layers=1)).eval()
    model.save_pretrained(tmp_path, format="hf")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["model_type"], cfg["mlp_only_layers"]) == ("qwen3_moe", [0])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-5
