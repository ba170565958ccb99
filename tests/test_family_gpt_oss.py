"""GPT-OSS's own features, each against an oracle: MXFP4 dequantization (by hand and transformers'
own function), an MXFP4 checkpoint imported with transformers' logits, attention sinks (float64
softmax with the sink column, forward and gradients), the clamped SwiGLU (transformers'
``GptOssExperts._apply_gate``), and the tools that refuse biased experts by name.
The dense round trips (logits, 20 greedy tokens, export) are in tests/test_convert_families.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from moekit.blocks import attend_with_sinks, build_attention_mask  # noqa: E402
from moekit.convert import from_pretrained  # noqa: E402
from moekit.convert.mxfp4 import FP4_E2M1, dequantize_mxfp4  # noqa: E402
from moekit.layers.experts import activate  # noqa: E402

torch.set_num_threads(1)


def _random_mxfp4(shape_rows, groups, seed, scale_range=(124, 129)):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape_rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(*scale_range, (*shape_rows, groups), generator=g, dtype=torch.uint8)
    return blocks, scales


def test_mxfp4_dequantizes_as_by_hand():
    # A hand-checked byte: 0x2F = high nibble 2 (+1.0), low nibble 15 (-6.0); scale 128 = 2^1.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2F
    out = dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8))
    assert out.shape == (1, 32) and out[0, :2].tolist() == [-12.0, 2.0] and not out[0, 2:].any()

    blocks, scales = _random_mxfp4((3,), 2, seed=0)
    want = torch.empty(3, 64, dtype=torch.float64)
    for r in range(3):
        for grp in range(2):
            for b in range(16):
                byte = int(blocks[r, grp, b])
                for half, nibble in enumerate((byte & 0xF, byte >> 4)):
                    want[r, grp * 32 + 2 * b + half] = FP4_E2M1[nibble] * 2.0 ** (int(scales[r, grp]) - 127)
    assert torch.equal(dequantize_mxfp4(blocks, scales, dtype=torch.float64), want)


def test_mxfp4_matches_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_mxfp4((4, 6), 3, seed=1, scale_range=(110, 140))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, G*32, R]
    assert torch.equal(dequantize_mxfp4(blocks, scales), theirs.transpose(1, 2))


def test_mxfp4_shape_mismatch_is_named():
    blocks, scales = _random_mxfp4((2,), 2, seed=2)
    with pytest.raises(ValueError, match=r"MXFP4 blocks \(2, 2, 16\) and scales \(2, 1\) do not pair up"):
        dequantize_mxfp4(blocks, scales[:, :1])


def _gpt_oss(**overrides):
    from tests.test_convert_families import make_hf

    return make_hf("gpt_oss", **overrides)


def test_mxfp4_checkpoint_imports_with_transformers_logits(tmp_path):
    """A released-style checkpoint: expert weights as MXFP4 blocks/scales, the rest dense."""
    hf = _gpt_oss(intermediate_size=32)  # F and D multiples of 32 (one MXFP4 block per row)
    num_e, dim, ffn = 4, 32, 32
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        gu_blocks, gu_scales = _random_mxfp4((num_e, 2 * ffn), dim // 32, seed=10 + i, scale_range=(121, 125))
        dn_blocks, dn_scales = _random_mxfp4((num_e, dim), ffn // 32, seed=20 + i, scale_range=(121, 125))
        with torch.no_grad():  # the reference runs the dequantized values in its own layout
            hf.model.layers[i].mlp.experts.gate_up_proj.copy_(
                dequantize_mxfp4(gu_blocks, gu_scales).transpose(1, 2)
            )
            hf.model.layers[i].mlp.experts.down_proj.copy_(
                dequantize_mxfp4(dn_blocks, dn_scales).transpose(1, 2)
            )
        del state[p + "gate_up_proj"], state[p + "down_proj"]
        state |= {
            p + "gate_up_proj_blocks": gu_blocks,
            p + "gate_up_proj_scales": gu_scales,
            p + "down_proj_blocks": dn_blocks,
            p + "down_proj_scales": dn_scales,
        }
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    config = hf.config.to_dict() | {"quantization_config": {"quant_method": "mxfp4"}}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "model.safetensors")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every checkpoint tensor (blocks and scales) is used
        model = from_pretrained(folder)
    x = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(x).logits
        assert float((model(x).logits - ref).abs().max()) < 1e-5
    # Export writes the dense layout, which transformers loads without a quantization config.
    model.save_pretrained(tmp_path / "dense", format="hf")
    written = load_file(tmp_path / "dense" / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in written
    assert not any(k.endswith(("_blocks", "_scales")) for k in written)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        assert float((again(x).logits - ref).abs().max()) < 1e-5


def test_other_quantization_methods_are_refused(tmp_path):
    from moekit.convert import config_from_hf

    hf = _gpt_oss().config.to_dict() | {"quantization_config": {"quant_method": "gptq"}}
    with pytest.raises(ValueError, match="quantization_config.quant_method='gptq'"):
        config_from_hf(hf)


def _sink_oracle(q, k, v, allowed_BHSK, sinks_H, scale):
    """float64: softmax over [q.k * scale, sink] per row, the sink column dropped."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed_BHSK, float("-inf"))
    sink = sinks_H.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    return probs @ v


@pytest.mark.parametrize("window", [None, 3])
def test_attention_sinks_match_the_float64_oracle_forward_and_grads(window):
    g = torch.Generator().manual_seed(0)
    b, h, kv, s, d = 2, 4, 2, 7, 8
    q = torch.randn(b, h, s, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, kv, s, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, kv, s, d, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = (torch.randn(h, generator=g, dtype=torch.float64) * 2).requires_grad_()
    pad = torch.ones(b, s, dtype=torch.long)
    pad[1, :2] = 0
    mask = build_attention_mask(pad, b, s, 0, window, q.device)
    got = attend_with_sinks(q, k, v, mask, sinks, scale=0.3)
    want = _sink_oracle(q, k, v, mask.expand(b, h, s, s), sinks, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v, sinks))
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v, sinks))
    for a, w in zip(grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10)
    # The sink really takes mass: without it the rows would sum to one.
    plain = _sink_oracle(q, k, v, mask.expand(b, h, s, s), torch.full_like(sinks, -1e30), 0.3)
    assert float((plain - want).detach().abs().max()) > 1e-2
    # mask=None is causal attention over S == K keys.
    causal = build_attention_mask(None, b, s, 0, None, q.device)
    if causal is None:
        causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(
        attend_with_sinks(q, k, v, None, sinks, 0.3),
        _sink_oracle(q, k, v, causal.expand(b, h, s, s), sinks, 0.3),
    )


@pytest.mark.parametrize(("alpha", "limit"), [(1.702, 7.0), (1.3, 0.4)])
def test_clamped_swiglu_matches_transformers(alpha, limit):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = transformers.GptOssConfig(
        hidden_size=8, intermediate_size=5, swiglu_alpha=alpha, swiglu_limit=limit
    )
    experts = GptOssExperts(cfg)
    h = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    theirs = experts._apply_gate(h)  # columns interleaved: gate at 2j, up at 2j + 1
    ours = activate(torch.cat([h[:, 0::2], h[:, 1::2]], -1), "swiglu_clamped", alpha, limit)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert bool((h.abs() > limit).any())  # the clamp bites


def test_tools_refuse_biased_experts_by_name(tmp_path):
    from moekit.compress import QuantConfig, quantize_model
    from moekit.offload import offload_model

    hf = _gpt_oss()
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"^offload: MoE layer 0 has expert biases") as err:
        offload_model(model, tmp_path / "store", cache_bytes=10_000)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^quantize: MoE layer 0 has expert biases"):
        quantize_model(model, QuantConfig(bits=8, group_size=8))
    assert type(model.layers[0].mlp.experts).__name__ == "BiasedExpertWeights"  # nothing replaced


def test_pruning_keeps_the_expert_biases(tmp_path):
    from moekit.surgery import PruneConfig, prune_experts

    _gpt_oss().save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    pruned = prune_experts(model, PruneConfig(num_keep=3, metric="random"))
    for old, new, kept in zip(model.moe_layers, pruned.moe_layers, pruned.pruned_experts):
        assert torch.equal(new.experts.b_in, old.experts.b_in[kept])
        assert torch.equal(new.experts.b_out, old.experts.b_out[kept])
        assert torch.equal(new.router.bias, old.router.bias[kept])
