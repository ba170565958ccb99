"""More Hugging Face MoE families (issue 17 part 2): tiny random models from transformers' own
config classes import with the same logits (1e-5, fp32), decode the same 20 greedy tokens with and
without the cache, export back exactly, and transformers reproduces the export."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from moekit.convert import from_pretrained  # noqa: E402
from moekit.models import MoEForCausalLM  # noqa: E402

torch.set_num_threads(1)
VOCAB = 100
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=3, initializer_range=0.1
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
}
LINEAR = {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "original_max_position_embeddings": 16,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


def hf_config(name, **overrides):
    tr = transformers
    overrides = dict(overrides)
    base = {
        "glm4_moe": lambda: tr.Glm4MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_key_value_heads=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
        ),
        "deepseek_v2": lambda: tr.DeepseekV2Config(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            routed_scaling_factor=1.5,
        ),
        "granitemoe": lambda: tr.GraniteMoeConfig(
            **COMMON,
            intermediate_size=24,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.3,
            logits_scaling=4.0,
        ),
        "granitemoeshared": lambda: tr.GraniteMoeSharedConfig(
            **COMMON,
            intermediate_size=24,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=16,
            embedding_multiplier=3.0,
            residual_multiplier=0.7,
            attention_multiplier=0.2,
            logits_scaling=2.0,
        ),
        "ernie4_5_moe": lambda: tr.Ernie4_5_MoeConfig(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_key_value_heads=2,
            moe_num_experts=4,
            moe_k=2,
            moe_num_shared_experts=1,
        ),
        "phimoe": lambda: tr.PhimoeConfig(
            **COMMON,
            intermediate_size=24,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_jitter_noise=0.1,
        ),
        # transformers 5.24's DBRX crashes with clip_qkv=None (clamp with no bounds): 1e4 never clips.
        "dbrx": lambda: tr.DbrxConfig(
            d_model=32,
            n_heads=4,
            n_layers=3,
            max_seq_len=64,
            vocab_size=VOCAB,
            initializer_range=0.1,
            attn_config=overrides.pop("attn_config", dict(kv_n_heads=1, clip_qkv=1e4, rope_theta=10000.0)),
            ffn_config=overrides.pop("ffn_config", dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=1)),
        ),
        "dots1": lambda: tr.Dots1Config(
            **COMMON,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_key_value_heads=2,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.0,
            sliding_window=None,
        ),
        "hunyuan_v1_moe": lambda: tr.HunYuanMoEV1Config(
            **COMMON,
            intermediate_size=24,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            moe_topk=2,
        ),
        "gpt_oss": lambda: tr.GptOssConfig(
            **COMMON,
            intermediate_size=24,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
        "llama4_text": lambda: tr.Llama4TextConfig(
            **(COMMON | dict(num_hidden_layers=4)),
            intermediate_size=24,
            intermediate_size_mlp=40,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,
            attention_chunk_size=4,
            floor_scale=3,  # the temperature tuning bites from the 3rd token on
            attn_scale=0.5,
        ),
        "jetmoe": lambda: tr.JetMoeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            initializer_range=0.1,
            num_key_value_heads=2,
            kv_channels=8,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        "minimax": lambda: tr.MiniMaxConfig(
            **COMMON,
            intermediate_size=24,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            block_size=4,  # prompts span several lightning blocks
        ),
        # A released-style multimodal folder: the text model above under language_model.*.
        "llama4": lambda: tr.Llama4Config(
            text_config=hf_config("llama4_text").to_dict(),
            vision_config=dict(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=16,
                image_size=28,
                patch_size=14,
                vision_output_dim=16,
                projector_input_dim=16,
                projector_output_dim=16,
            ),
        ),
        "flex_olmo": lambda: tr.FlexOlmoConfig(
            **COMMON,
            intermediate_size=24,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            pad_token_id=0,
            eos_token_id=1,
        ),
    }[name]()
    target = base.text_config if name == "llama4" else base  # llama4's options are its text model's
    for k, v in overrides.items():
        setattr(target, k, v)
    return base


def make_hf(name, **overrides):
    """A random HF model of ``name`` with perturbed norms, biases and correction biases."""
    cfg = hf_config(name, **overrides)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "llama4":
            model = transformers.Llama4ForConditionalGeneration(cfg).eval()
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # GPT-OSS's stacked expert biases ([E, 2F], [E, D]) start at zero too.
            if p.dim() == 1 or "correction_bias" in str(p.shape) or pname.endswith("proj_bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "e_score_correction_bias" in pname:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, prompt, n=20):
    model.generation_config.eos_token_id = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)


def max_diff(a, b):
    return float((a - b).abs().max())


def _saved(model, folder):
    model.save_pretrained(folder)
    return folder


def round_trip(family, tmp_path, overrides, check_layout=True, expect_plain=False):
    """The full contract; returns the measured max logit difference."""
    hf = make_hf(family, **overrides)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    model = from_pretrained(src)
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        diff = max_diff(ref, model(x).logits)
    assert diff < 1e-5, diff

    prompt = ids(1, 5, seed=2)
    want = hf_greedy(hf, prompt)
    assert torch.equal(model.generate(prompt, max_new_tokens=20), want)
    assert torch.equal(model.generate(prompt, max_new_tokens=20, use_cache=False), want)

    # moekit's own folder keeps every new field and tensor.
    native = MoEForCausalLM.from_pretrained(_saved(model, tmp_path / "native"))
    with torch.no_grad():
        assert torch.equal(native(x).logits, model(x).logits)

    out = tmp_path / "export"
    model.save_pretrained(out, format="hf")
    config = json.loads((out / "config.json").read_text())
    # A shared-expert family without its shared expert exports as the plain family (same tensors).
    arch = type(hf).__name__
    if expect_plain:
        family, arch = "granitemoe", "GraniteMoeForCausalLM"
    assert config["model_type"] == family and config["architectures"] == [arch]
    again = from_pretrained(out)
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert max_diff(hf2(x).logits, ref) < 1e-5
    if check_layout:
        ours, theirs = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    return diff


CASES = [
    ("glm4_moe", {}),
    (
        "glm4_moe",
        dict(
            use_qk_norm=True,
            attention_bias=True,
            head_dim=16,
            n_shared_experts=2,
            norm_topk_prob=False,
            rope_parameters=LINEAR | {"partial_rotary_factor": 0.25},
        ),
    ),
    ("glm4_moe", dict(rope_parameters=YARN | {"partial_rotary_factor": 0.5}, max_position_embeddings=64)),
    ("dots1", {}),
    (
        "dots1",
        dict(
            sliding_window=5,
            layer_types=["sliding_attention"] * 3,
            attention_bias=True,
            head_dim=16,
            n_shared_experts=2,
            norm_topk_prob=False,
            rope_parameters=YARN,
        ),
    ),
    ("hunyuan_v1_moe", {}),
    ("hunyuan_v1_moe", dict(attention_bias=True, head_dim=16, moe_topk=1, rope_parameters=LINEAR)),
    ("gpt_oss", {}),
    (
        "gpt_oss",
        dict(
            head_dim=16,
            num_key_value_heads=1,
            sliding_window=3,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"],
            attention_bias=False,
            swiglu_limit=0.05,  # small enough that the clamp bites on these tiny activations
            swiglu_alpha=1.3,
            num_experts_per_tok=3,
            rope_parameters=LINEAR,
        ),
    ),
    ("gpt_oss", dict(rope_parameters=YARN | {"truncate": False}, max_position_embeddings=64)),
    ("llama4_text", {}),
    (
        "llama4_text",
        dict(
            head_dim=16,
            num_key_value_heads=1,
            num_experts_per_tok=2,
            moe_layers=[0, 1, 3],
            no_rope_layers=[1, 1, 0, 1],
            layer_types=["chunked_attention", "full_attention", "full_attention", "chunked_attention"],
            attention_chunk_size=3,
            use_qk_norm=False,
            attention_bias=True,
            rope_parameters=LLAMA3,
        ),
    ),
    (
        "llama4_text",
        dict(
            attn_temperature_tuning=False,
            attention_chunk_size=None,
            rope_parameters=LINEAR,
            layer_types=["full_attention"] * 4,
        ),
    ),
    ("jetmoe", {}),
    (
        "jetmoe",
        dict(
            kv_channels=16,
            num_key_value_heads=1,
            num_attention_heads=3,  # transformers derives num_key_value_heads * num_experts_per_tok
            num_local_experts=5,
            num_experts_per_tok=3,
            tie_word_embeddings=False,
            rope_parameters=LINEAR,
        ),
    ),
    (
        "jetmoe",
        dict(num_experts_per_tok=1, num_attention_heads=2, rope_parameters=YARN, max_position_embeddings=64),
    ),
    ("minimax", {}),
    (
        "minimax",
        dict(
            num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
            head_dim=16,
            num_key_value_heads=1,
            block_size=3,
            full_attn_alpha_factor=0.7,
            full_attn_beta_factor=1.3,
            linear_attn_alpha_factor=1.5,
            linear_attn_beta_factor=0.6,
            mlp_alpha_factor=0.9,
            mlp_beta_factor=1.1,
            rope_parameters=LINEAR,
        ),
    ),
    (
        "minimax",
        dict(
            block_size=256,
            num_experts_per_tok=1,
            sliding_window=5,
            rope_parameters=YARN,
            max_position_embeddings=64,
        ),
    ),
    ("flex_olmo", {}),
    (
        "flex_olmo",
        dict(attention_bias=True, norm_topk_prob=True, num_key_value_heads=4, rope_parameters=YARN),
    ),
    ("deepseek_v2", {}),
    ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1, norm_topk_prob=True)),
    (
        "deepseek_v2",
        dict(
            q_lora_rank=None,
            qk_rope_head_dim=8,
            head_dim=8,  # transformers derives it from qk_rope_head_dim at construction only
            v_head_dim=12,
            n_shared_experts=2,
            first_k_dense_replace=0,
            rope_parameters=YARN | {"mscale": 1.0, "mscale_all_dim": 0.707},
            max_position_embeddings=64,
        ),
    ),
    ("granitemoe", {}),
    (
        "granitemoe",
        dict(head_dim=16, num_key_value_heads=1, rope_parameters=LINEAR, tie_word_embeddings=True),
    ),
    ("granitemoeshared", {}),
    ("granitemoeshared", dict(shared_intermediate_size=0, num_experts_per_tok=1, rope_parameters=YARN)),
    ("ernie4_5_moe", {}),
    (
        "ernie4_5_moe",
        dict(
            num_hidden_layers=4,
            moe_layer_start_index=0,
            moe_layer_end_index=3,
            moe_layer_interval=2,
            moe_num_shared_experts=2,
            head_dim=16,
            tie_word_embeddings=False,
            rope_parameters=LINEAR,
        ),
    ),
    ("phimoe", {}),
    (
        "phimoe",
        dict(
            attention_bias=True,
            lm_head_bias=True,
            sliding_window=5,
            router_jitter_noise=0.01,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 5e4},
        ),
    ),
    ("dbrx", {}),
    (
        "dbrx",
        dict(
            attn_config=dict(kv_n_heads=2, clip_qkv=0.3, rope_theta=5e4),
            ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2),
            rope_parameters={"rope_type": "default", "rope_theta": 5e4},
        ),
    ),
    (
        "dbrx",
        dict(
            attn_config=dict(kv_n_heads=4, clip_qkv=1.0, rope_theta=10000.0),
            ffn_config=dict(
                ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=None
            ),
            rope_parameters=LINEAR,
        ),
    ),
]


@pytest.mark.parametrize(("family", "overrides"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_family(family, overrides, tmp_path):
    round_trip(family, tmp_path, overrides, expect_plain=overrides.get("shared_intermediate_size") == 0)
