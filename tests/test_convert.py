"""Hugging Face interop: tiny random models from transformers' own config classes round-trip
through moekit with the same logits, the same greedy tokens and bit-identical weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from moekit.convert import from_pretrained, save_hf  # noqa: E402
from moekit.layers import MoEConfig  # noqa: E402
from moekit.models import MoEForCausalLM, get_preset  # noqa: E402

torch.set_num_threads(1)
VOCAB = 100
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=3, initializer_range=0.1
)


def hf_configs():
    tr = transformers
    return {
        "mixtral": tr.MixtralConfig(
            **COMMON, intermediate_size=48, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
        ),
        "qwen2_moe": tr.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            norm_topk_prob=False,
        ),
        "qwen3_moe": tr.Qwen3MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            norm_topk_prob=True,
            decoder_sparse_step=1,
        ),
        "olmoe": tr.OlmoeConfig(
            **COMMON,
            intermediate_size=24,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            eos_token_id=2,
        ),
        "deepseek_v3": tr.DeepseekV3Config(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
        ),
        "llama": tr.LlamaConfig(**COMMON, intermediate_size=48, num_key_value_heads=2),
        "mistral": tr.MistralConfig(**COMMON, intermediate_size=48, num_key_value_heads=2, sliding_window=6),
        "qwen2": tr.Qwen2Config(**COMMON, intermediate_size=48, num_key_value_heads=2),
        "qwen3": tr.Qwen3Config(**COMMON, intermediate_size=48, num_key_value_heads=2, head_dim=8),
    }


def make_hf(name, **overrides):
    """A random HF model of family ``name`` with perturbed norms and biases (so every tensor matters)."""
    cfg = hf_configs()[name]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.copy_(torch.randn_like(b) * 0.1)
    return model


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, prompt, n=20):
    model.generation_config.eos_token_id = None  # moekit's generate below runs without eos too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trip(family, tmp):
    hf = make_hf(family)
    src = tmp / f"{family}-hf"
    hf.save_pretrained(src)
    model = from_pretrained(src)
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        got = model(x).logits
    assert (ref - got).abs().max() < 1e-5

    # Greedy decoding with the KV cache gives the same ids as transformers and as no-cache decoding.
    prompt = ids(1, 5, seed=2)
    want = hf_greedy(hf, prompt)
    assert torch.equal(model.generate(prompt, max_new_tokens=20), want)
    assert torch.equal(model.generate(prompt, max_new_tokens=20, use_cache=False), want)

    # Export -> re-import is exact, and transformers reads the export with the same logits.
    out = tmp / f"{family}-export"
    model.save_pretrained(out, format="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [type(hf).__name__]
    again = from_pretrained(out)
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf2(x).logits - ref).abs().max() < 1e-5
    # Same tensor names and shapes as transformers' own save_pretrained.
    ours, theirs = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_left_padding_matches_hf(tmp):
    hf = make_hf("qwen3_moe")
    hf.save_pretrained(tmp / "pad")
    model = from_pretrained(tmp / "pad")
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        ref, got = hf(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
    assert (ref - got)[mask.bool()].abs().max() < 1e-5


def _fused_folder(hf, folder):
    """A checkpoint in transformers 5's fused in-memory layout (``experts.gate_up_proj [E, 2F, D]``)."""
    folder.mkdir()
    hf.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, folder / "model.safetensors")
    return folder


def _per_expert_folder(hf, folder, names):
    """A per-expert checkpoint written by hand from the fused tensors; ``names(i, e, part)`` names them."""
    folder.mkdir()
    hf.config.save_pretrained(folder)
    out = {}
    for k, v in hf.state_dict().items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            i = int(k.split(".")[2])
            for e in range(v.shape[0]):
                if k.endswith("gate_up_proj"):
                    gate, up = v[e].chunk(2, dim=0)
                    out[names(i, e, "gate")] = gate.contiguous()
                    out[names(i, e, "up")] = up.contiguous()
                else:
                    out[names(i, e, "down")] = v[e].contiguous()
        elif k.endswith("mlp.gate.weight") and "mixtral" in hf.config.model_type:
            out[k.replace(".mlp.", ".block_sparse_moe.")] = v.contiguous()
        else:
            out[k] = v.contiguous()
    save_file(out, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_and_per_expert_layouts(family, tmp):
    hf = make_hf(family)
    if family == "mixtral":

        def names(i, e, part):
            return f"model.layers.{i}.block_sparse_moe.experts.{e}.{dict(gate='w1', up='w3', down='w2')[part]}.weight"
    else:

        def names(i, e, part):
            return f"model.layers.{i}.mlp.experts.{e}.{part}_proj.weight"

    fused = from_pretrained(_fused_folder(hf, tmp / f"{family}-fused"))
    per_expert = from_pretrained(_per_expert_folder(hf, tmp / f"{family}-per-expert", names))
    sd1, sd2 = fused.state_dict(), per_expert.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = ids()
    with torch.no_grad():
        assert (fused(x).logits - hf(x).logits).abs().max() < 1e-5


def test_moekit_preset_runs_in_transformers(tmp):
    """The promise: a model trained in moekit (default preset conventions) runs in transformers."""
    torch.manual_seed(0)
    model = MoEForCausalLM(get_preset("moe-tiny")).eval()
    save_hf(model, tmp / "tiny")
    assert json.loads((tmp / "tiny" / "config.json").read_text())["model_type"] == "qwen3_moe"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "tiny").eval()
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max() < 1e-5
    dense = MoEForCausalLM(get_preset("dense-small").replace(num_layers=1, dim=64, head_dim=8, ffn_dim=64))
    save_hf(dense, tmp / "dense")
    assert json.loads((tmp / "dense" / "config.json").read_text())["model_type"] == "qwen3"


def test_sharded_export_bf16_and_tokenizer(tmp):
    hf = make_hf("qwen3_moe")
    src = tmp / "bf16"
    hf.to(torch.bfloat16).save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    model = from_pretrained(src)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert from_pretrained(src, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32
    save_hf(model, tmp / "sharded", max_shard_bytes=20_000)
    out = tmp / "sharded"
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    assert (out / "tokenizer_config.json").is_file()
    again = from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        ref = from_pretrained(out, dtype=torch.float32)(x).logits
        assert (hf2(x).logits - ref).abs().max() < 1e-5


def test_moekit_folder_through_convert(tmp):
    model = MoEForCausalLM(get_preset("moe-tiny"))
    model.save_pretrained(tmp / "native")
    again = from_pretrained(tmp / "native")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# ---- errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def olmoe_folder(tmp):
    folder = tmp / "olmoe-err"
    make_hf("olmoe").save_pretrained(folder)
    return folder


def _edit(folder, dst, config=None, drop=None):
    dst.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(folder / "model.safetensors")
    if drop:
        del tensors[drop]
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(olmoe_folder, tmp):
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight'"
    ):
        from_pretrained(_edit(olmoe_folder, tmp / "missing", drop=key))


def test_wrong_shape_is_named(olmoe_folder, tmp):
    with pytest.raises(
        ValueError, match=r"tensor 'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight' has shape"
    ):
        from_pretrained(_edit(olmoe_folder, tmp / "shape", config={"intermediate_size": 20}))


def test_unknown_model_type_is_named(olmoe_folder, tmp):
    with pytest.raises(ValueError, match="unknown Hugging Face model_type 'gpt2'"):
        from_pretrained(_edit(olmoe_folder, tmp / "gpt2", config={"model_type": "gpt2"}))


@pytest.mark.parametrize(
    "option",
    [
        {"clip_qkv": 8.0},
        {"hidden_act": "gelu"},
        {"rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}},
    ],
)
def test_unsupported_hf_option_is_named(olmoe_folder, tmp, option):
    name = next(iter(option))
    pattern = "rope_type" if name == "rope_parameters" else name
    with pytest.raises(ValueError, match=pattern):
        from_pretrained(_edit(olmoe_folder, tmp / f"opt-{name}", config=option))


def test_pickle_is_refused(tmp):
    folder = tmp / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"} | hf_configs()["llama"].to_dict()))
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        from_pretrained(folder)


def _tiny(**moe):
    cfg = get_preset("moe-tiny")
    return MoEForCausalLM(cfg.replace(moe=cfg.moe.replace(**moe)))


@pytest.mark.parametrize(
    ("model_fn", "option"),
    [
        (lambda: _tiny(router_type="top_p"), "router_type"),
        (lambda: _tiny(num_zero_experts=1), "num_zero_experts"),
        (lambda: _tiny(capacity_factor=1.25), "capacity_factor"),
        (lambda: _tiny(router_type="expert_choice"), "router_type"),
        (
            lambda: MoEForCausalLM(get_preset("moe-tiny").replace(experts_per_layer=(4, 2))),
            "experts_per_layer",
        ),
        (lambda: MoEForCausalLM(get_preset("moepp-small").replace(num_layers=1)), "num_zero_experts"),
    ],
)
def test_inexpressible_export_is_refused(model_fn, option, tmp):
    with pytest.raises(ValueError, match=option):
        save_hf(model_fn(), tmp / f"refused-{option}")


def test_explicit_family_refusal_names_option(tmp):
    model = MoEForCausalLM(get_preset("moe-tiny"))
    with pytest.raises(ValueError, match="qk_norm"):
        save_hf(model, tmp / "as-mixtral", family="mixtral")


def test_mla_cache_matches_no_cache():
    cfg = get_preset("moe-tiny").replace(
        attention_type="mla",
        qk_norm="none",
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        rope_interleave=True,
    )
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg).eval()
    prompt = torch.randint(0, 512, (2, 6))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    a = model.generate(prompt, attention_mask=mask, max_new_tokens=8)
    b = model.generate(prompt, attention_mask=mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(a, b)
    assert isinstance(cfg.moe, MoEConfig)


def test_cli_convert(tmp):
    import argparse

    from moekit.cli import convert as cli

    make_hf("mixtral").save_pretrained(tmp / "cli-src")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for fmt in ("moekit", "hf"):
        args = parser.parse_args(
            ["--from", str(tmp / "cli-src"), "--to", str(tmp / f"cli-{fmt}"), "--format", fmt]
        )
        assert cli.run(args) == 0
    a, b = from_pretrained(tmp / "cli-moekit"), from_pretrained(tmp / "cli-hf")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert json.loads((tmp / "cli-hf" / "config.json").read_text())["model_type"] == "mixtral"


YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 8,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("deepseek_v3", dict(rope_parameters=YARN, max_position_embeddings=64)),
        ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False)),
        ("llama", dict(rope_parameters=LLAMA3)),
        ("mixtral", dict(sliding_window=5, tie_word_embeddings=True)),
        ("qwen2_moe", dict(decoder_sparse_step=2, mlp_only_layers=[])),
    ],
)
def test_family_options(family, overrides, tmp):
    hf = make_hf(family, **overrides)
    src = tmp / f"opts-{family}-{'-'.join(overrides)}"
    hf.save_pretrained(src)
    model = from_pretrained(src)
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.embed_tokens.weight
    x = ids(2, 20)
    with torch.no_grad():
        assert (hf(x).logits - model(x).logits).abs().max() < 1e-5
    save_hf(model, src.with_name(src.name + "-out"))
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(src.with_name(src.name + "-out")).eval()
    with torch.no_grad():
        assert (hf2(x).logits - model(x).logits).abs().max() < 1e-5


def test_deepseek_bf16_keeps_router_fp32(tmp):
    hf = make_hf("deepseek_v3")
    hf.to(torch.bfloat16).save_pretrained(tmp / "ds-bf16")
    model = from_pretrained(tmp / "ds-bf16")
    router = model.layers[1].mlp.router
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert router.weight.dtype == torch.float32 and router.expert_bias.dtype == torch.float32
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp / "ds-bf16", dtype=torch.bfloat16)
    assert torch.equal(router.expert_bias, hf_bf16.model.layers[1].mlp.gate.e_score_correction_bias)
    assert model(ids()).logits.dtype == torch.bfloat16
