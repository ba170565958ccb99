"""LoRA experts (Uni-MoE, ``MoEConfig(expert_kind="lora")``): an oracle in float64 (forward and
gradients) against a hand-written per-token reference, the frozen shared base, LoRA upcycling
equal to its dense parent at init, merging into full experts, and config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.layers import LoRAExpertWeights, MoEConfig, MoELayer, merge_lora_experts
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.surgery import UpcycleConfig, upcycle

torch.set_num_threads(1)


def lora_layer(activation: str, bias: bool = False, seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        dim=12, ffn_dim=10, num_experts=4, top_k=2, activation=activation, ffn_bias=bias,
        expert_kind="lora", lora_rank=3, lora_alpha=6.0, **kw,
    )  # fmt: skip
    layer = MoELayer(cfg).double()
    with torch.no_grad():  # B != 0 so the adapters matter; biases nonzero so they are checked
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
    return layer


def reference(layer: MoELayer, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: each projection W + s B A written out by hand."""
    ex: LoRAExpertWeights = layer.experts
    s, ffn = ex.alpha / ex.rank, ex.ffn_dim
    out = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            x = x_TD[t]
            projs = []
            for p in range(ex.num_in_proj):
                w = ex.w_in[p * ffn : (p + 1) * ffn] + s * ex.lora_in_B[e, p] @ ex.lora_in_A[e, p]
                h = w @ x
                if ex.b_in is not None:
                    h = h + ex.b_in[p * ffn : (p + 1) * ffn]
                projs.append(h)
            if layer.config.activation == "swiglu":
                a = F.silu(projs[0]) * projs[1]
            else:
                a = F.gelu(projs[0])
            y = (ex.w_out + s * ex.lora_out_B[e] @ ex.lora_out_A[e]) @ a
            if ex.b_out is not None:
                y = y + ex.b_out
            acc = acc + w_TK[t, k] * y
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize(
    "activation,bias,backend,ran",
    [
        ("swiglu", False, "auto", "lora_sorted"),
        ("swiglu", False, "grouped_mm", "lora_sorted"),  # no stacked weights: falls back
        ("swiglu", False, "eager", "eager"),
        ("gelu", True, "sorted", "lora_sorted"),
        ("gelu", True, "eager", "eager"),
    ],
)
def test_lora_experts_match_hand_reference_forward_and_grads_float64(activation, bias, backend, ran):
    layer = lora_layer(activation, bias, backend=backend)
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.backend == ran
    x_TD = x.reshape(-1, 12)
    ref = reference(layer, x_TD, out.routing.expert_ids, out.routing.weights).reshape_as(x)
    torch.testing.assert_close(out.hidden, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    params = [x, layer.router.weight] + [p for n, p in layer.experts.named_parameters() if "lora_" in n]
    got = torch.autograd.grad((out.hidden * g).sum(), params)
    # The reference's weights are the router's own (same tensors), so router grads flow too.
    out2 = layer(x)
    ref2 = reference(layer, x_TD, out2.routing.expert_ids, out2.routing.weights).reshape_as(x)
    want = torch.autograd.grad((ref2 * g).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_lora_base_is_shared_and_frozen_and_b_zero_is_the_base():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=8, ffn_dim=6, num_experts=3, top_k=2, expert_kind="lora", lora_rank=2))
    ex = layer.experts
    assert not ex.w_in.requires_grad and not ex.w_out.requires_grad
    assert tuple(ex.w_in.shape) == (12, 8) and tuple(ex.lora_in_A.shape) == (3, 2, 2, 8)
    assert layer.supports_fast_decode is False  # no stacked weights for the decode fast path
    x = torch.randn(5, 8)
    base = F.linear(F.silu(F.linear(x, ex.w_in[:6])) * F.linear(x, ex.w_in[6:]), ex.w_out)
    for e in range(3):
        torch.testing.assert_close(ex.expert_forward(e, x), base)
    layer(x).hidden.sum().backward()
    assert ex.w_in.grad is None and ex.w_out.grad is None
    assert ex.lora_in_B.grad is not None and ex.lora_in_B.grad.abs().sum() > 0


def test_merge_lora_experts_gives_the_same_layer():
    layer = lora_layer("gelu", bias=True)
    full = MoELayer(layer.config.replace(expert_kind="ffn", lora_rank=8, lora_alpha=16.0)).double()
    full.router.load_state_dict(layer.router.state_dict())
    full.experts = merge_lora_experts(layer.experts)
    x = torch.randn(9, 12, dtype=torch.float64)
    torch.testing.assert_close(full(x).hidden, layer(x).hidden, rtol=0, atol=1e-12)


def dense_lm() -> MoEForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=16, num_layers=3, num_heads=2, num_kv_heads=1, ffn_dim=24)
    return MoEForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("layers", ["all", "every_other"])
def test_lora_upcycle_equals_dense_at_init_and_trains_only_adapters_and_router(layers, tmp_path):
    dense = dense_lm()
    moe = upcycle(dense, UpcycleConfig.lora(4, rank=2, alpha=4.0, top_k=2, layers=layers))
    assert moe.config.moe.expert_kind == "lora" and moe.config.moe.lora_rank == 2
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-12)
    groups = moe.parameter_groups()
    assert groups["lora_experts"] and all(".lora_" in n for n in groups["lora_experts"])
    from moekit.train.freeze import select_frozen

    names = [n for n, _ in moe.named_parameters()]
    assert select_frozen(names, ["lora_experts"]) == set(groups["lora_experts"])  # regex = module groups
    frozen_base = [n for n, p in moe.named_parameters() if not p.requires_grad]
    assert sorted(frozen_base) == sorted(
        f"layers.{i}.mlp.experts.{w}" for i in moe.config.moe_layer_ids for w in ("w_in", "w_out")
    )
    moe.save_pretrained(tmp_path / "m")
    back = MoEForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64)
    assert isinstance(back.layers[moe.config.moe_layer_ids[0]].mlp.experts, LoRAExpertWeights)
    torch.testing.assert_close(back(ids).logits, moe(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(lora_rank=4), "lora_rank"),
        (dict(expert_kind="lora", lora_rank=0), "lora_rank"),
        (dict(expert_kind="lora", lora_alpha=0.0), "lora_alpha"),
        (dict(expert_kind="adapter"), "expert_kind"),
    ],
)
def test_lora_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(dim=8, ffn_dim=8, num_experts=2, top_k=1, **kw)
    with pytest.raises(ValueError, match="expert_init"):
        UpcycleConfig(expert_init="noise", moe_overrides={"expert_kind": "lora"})


def test_a_fresh_lora_moe_lm_starts_with_b_zero():
    torch.manual_seed(0)
    moe = MoEConfig(dim=16, ffn_dim=24, num_experts=3, top_k=1, expert_kind="lora", lora_rank=2)
    lm = MoEForCausalLM(ModelConfig(vocab_size=61, dim=16, num_layers=2, num_heads=2, ffn_dim=24, moe=moe))
    for layer in lm.layers:
        ex = layer.mlp.experts
        assert ex.lora_in_B.abs().sum() == 0 and ex.lora_out_B.abs().sum() == 0
        assert ex.lora_in_A.abs().sum() > 0 and not ex.w_in.requires_grad


def test_tools_that_need_plain_experts_refuse_lora_experts(tmp_path):
    moe = upcycle(dense_lm(), UpcycleConfig.lora(2, rank=2, top_k=1))
    with pytest.raises(ValueError, match="LoRA experts"):
        moe.save_pretrained(tmp_path / "hf", format="hf")
    from moekit.layers import require_plain_expert_math

    with pytest.raises(ValueError, match="merge_lora_experts"):
        require_plain_expert_math([layer.mlp for layer in moe.layers], "quantization")


def test_active_parameters_count_the_shared_base_fully_and_adapters_by_k_over_e():
    dense = dense_lm()
    moe = upcycle(dense, UpcycleConfig.lora(4, rank=2, alpha=4.0, top_k=2))
    adapters = 4 * 3 * 2 * (16 + 24)  # E experts x 3 projections x r (D + F)
    per_layer_router = 4 * 16
    assert moe.num_parameters() == dense.num_parameters() + 3 * (adapters + per_layer_router)
    assert moe.num_parameters(active_only=True) == dense.num_parameters() + 3 * (
        adapters // 2 + per_layer_router
    )
