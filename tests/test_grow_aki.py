"""Scale-up by AKI / AKI-Pro and GQA head growth (issue 20 item 5): the equations on hand-built
matrices, exactness of the FPI variants in float64, and the CLI."""

from __future__ import annotations

import pytest
import torch

from moekit.models import ModelConfig, MoEForCausalLM
from moekit.surgery import GrowConfig, grow
from moekit.surgery.scale import grow_ffn_units, grow_heads

torch.set_num_threads(1)
VOCAB = 53


def make(seed: int = 0, **kw) -> MoEForCausalLM:
    base = dict(vocab_size=VOCAB, dim=16, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=12)
    base.update(kw)
    torch.manual_seed(seed)
    model = MoEForCausalLM(ModelConfig(**base)).double().eval()
    with torch.no_grad():  # non-trivial norms, so a copied norm weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p))
    return model


def tokens(b: int = 3, s: int = 13) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(1))


def test_aki_ffn_units_equal_hand_built_matrices():
    # F = 2 -> 3 units, D = 2, SwiGLU: rows are [gate0, gate1, up0, up1]; g = [0, 1, 1].
    w_in = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=torch.float64)
    w_next = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [70.0, 80.0]], dtype=torch.float64)
    w_out = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    g = torch.tensor([0, 1, 1])
    w_in2, w_out2 = grow_ffn_units(w_in, w_out, w_next, g, "swiglu")
    expected_in = torch.tensor(
        [[1.0, 2.0], [3.0, 4.0], [30.0, 40.0], [5.0, 6.0], [7.0, 8.0], [70.0, 80.0]], dtype=torch.float64
    )
    expected_out = torch.tensor([[1.0, 1.0, 1.0], [3.0, 2.0, 2.0]], dtype=torch.float64)
    assert torch.equal(w_in2, expected_in) and torch.equal(w_out2, expected_out)
    # GELU (one row block): new unit 2 copies next-layer row 1
    w_in2, _ = grow_ffn_units(w_in[:2], w_out, w_next[:2], g, "gelu")
    assert torch.equal(w_in2, torch.tensor([[1.0, 2.0], [3.0, 4.0], [30.0, 40.0]], dtype=torch.float64))


def test_aki_heads_equal_hand_built_matrices():
    # 2 query heads in 1 GQA group (R = 2), Dh = 1, D = 2 -> 2 groups; the new group copies group 0.
    attn = {
        "q_proj.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "q_proj.bias": torch.tensor([0.5, 0.25]),
        "k_proj.weight": torch.tensor([[2.0, 3.0]]),
        "v_proj.weight": torch.tensor([[4.0, 5.0]]),
        "o_proj.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
    }
    nxt = {k: v * 10 for k, v in attn.items()}
    out = grow_heads(attn, nxt, head_dim=1, group_size=2, h_G=torch.tensor([0, 0]))
    assert torch.equal(out["q_proj.weight"], torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 0.0], [0.0, 10.0]]))
    assert torch.equal(out["q_proj.bias"], torch.tensor([0.5, 0.25, 5.0, 2.5]))
    assert torch.equal(out["k_proj.weight"], torch.tensor([[2.0, 3.0], [20.0, 30.0]]))
    assert torch.equal(out["v_proj.weight"], torch.tensor([[4.0, 5.0], [40.0, 50.0]]))
    # o_proj is FPI-expanded from layer l (never from l+1): every head of group 0 and its copy halved
    assert torch.equal(out["o_proj.weight"], torch.tensor([[0.5, 1.0, 0.5, 1.0], [1.5, 2.0, 1.5, 2.0]]))
    # Dh = 2, two groups of R = 1, the new group copies group 1: rows 2..3 of q, k, v
    attn2 = {
        "q_proj.weight": torch.arange(8.0).view(4, 2),
        "k_proj.weight": torch.arange(8.0).view(4, 2) + 100,
        "v_proj.weight": torch.arange(8.0).view(4, 2) + 200,
        "o_proj.weight": torch.arange(8.0).view(2, 4),
    }
    out = grow_heads(attn2, attn2, head_dim=2, group_size=1, h_G=torch.tensor([0, 1, 1]))
    assert torch.equal(out["k_proj.weight"][4:], attn2["k_proj.weight"][2:4])
    o = attn2["o_proj.weight"]
    assert torch.equal(out["o_proj.weight"], torch.cat([o[:, :2], o[:, 2:] / 2, o[:, 2:] / 2], 1))


@pytest.mark.parametrize(
    "kw, config",
    [
        (
            dict(qk_norm="per_head", attention_bias=True),
            GrowConfig(num_heads=8, ffn_dim=20, ffn_scheme="fpi"),
        ),
        (dict(num_kv_heads=None), GrowConfig(num_heads=7, attn_scheme="fpi")),
        (dict(num_kv_heads=1, partial_rotary_factor=0.5), GrowConfig(num_heads=12)),
        (dict(sliding_window=5), GrowConfig(num_heads=6, ffn_dim=13, ffn_scheme="fpi", num_new_layers=2)),
    ],
    ids=["gqa-bias-qknorm", "mha", "mqa-partial-rope", "sliding-depth"],
)
def test_fpi_head_growth_is_exact_float64(kw, config):
    dense = make(**kw)
    x = tokens()
    grown = grow(dense, config)
    cfg = grown.config
    assert cfg.num_heads == config.num_heads
    assert cfg.num_heads // cfg.attn_num_kv_heads == dense.config.num_heads // dense.config.attn_num_kv_heads
    assert grown.layers[0].self_attn.q_proj.weight.shape[0] == config.num_heads * dense.config.attn_head_dim
    torch.testing.assert_close(grown(x).logits, dense(x).logits, rtol=0, atol=1e-12)


def test_aki_takes_new_units_from_the_next_layer_and_is_not_function_preserving():
    dense = make()
    x = tokens()
    src = dense.state_dict()
    aki = grow(dense, GrowConfig(ffn_dim=20, ffn_scheme="aki", num_heads=8, attn_scheme="aki", seed=3))
    fpi = grow(dense, GrowConfig(ffn_dim=20, ffn_scheme="fpi", num_heads=8, attn_scheme="fpi", seed=3))
    sa, sf = aki.state_dict(), fpi.state_dict()
    f, dh = 12, dense.config.attn_head_dim
    for i in range(3):
        nxt = min(i + 1, 2)  # the top layer has no layer above: it takes its own units (= FPI)
        w_in = sa[f"layers.{i}.mlp.w_in.weight"]
        gate, up = w_in[:20], w_in[20:]
        assert torch.equal(gate[:f], src[f"layers.{i}.mlp.w_in.weight"][:f])
        assert torch.equal(up[:f], src[f"layers.{i}.mlp.w_in.weight"][f:])
        next_rows = src[f"layers.{nxt}.mlp.w_in.weight"]
        for j in range(f, 20):  # every new unit is a unit of the next layer, gate and up alike
            hits = [
                u
                for u in range(f)
                if torch.equal(gate[j], next_rows[u]) and torch.equal(up[j], next_rows[f + u])
            ]
            assert hits, (i, j)
        k_new = sa[f"layers.{i}.self_attn.k_proj.weight"][2 * dh :]
        k_next = src[f"layers.{nxt}.self_attn.k_proj.weight"]
        assert any(torch.equal(k_new[:dh], k_next[u * dh : (u + 1) * dh]) for u in range(2))
        # the o_proj / w_out columns are the FPI ones: same mapping (same seed), layer l's weights
        assert torch.equal(sa[f"layers.{i}.mlp.w_out.weight"], sf[f"layers.{i}.mlp.w_out.weight"])
        assert torch.equal(
            sa[f"layers.{i}.self_attn.o_proj.weight"], sf[f"layers.{i}.self_attn.o_proj.weight"]
        )
    top = "layers.2.mlp.w_in.weight"
    assert torch.equal(sa[top], sf[top])
    assert not torch.equal(sa["layers.0.mlp.w_in.weight"], sf["layers.0.mlp.w_in.weight"])
    assert (aki(x).logits - dense(x).logits).abs().max() > 1e-3  # AKI is not function preserving
    torch.testing.assert_close(fpi(x).logits, dense(x).logits, rtol=0, atol=1e-12)


def test_aki_pro_preset_and_errors():
    pro = GrowConfig.aki_pro(ffn_dim=20, num_heads=8, num_new_layers=2)
    assert (pro.ffn_scheme, pro.attn_scheme, pro.depth_position, pro.depth_init) == (
        "aki",
        "aki",
        "interleave",
        "copy",
    )
    assert GrowConfig.aki(num_new_layers=1).depth_position == "stack"
    assert GrowConfig.from_json(pro.to_json()) == pro
    grown = grow(make(), pro)
    assert grown.config.num_layers == 5 and grown.config.num_kv_heads == 4
    with pytest.raises(ValueError, match="whole GQA groups"):
        grow(make(), GrowConfig(num_heads=7))
    with pytest.raises(ValueError, match="attn_scheme"):
        GrowConfig(attn_scheme="copy")
    with pytest.raises(ValueError, match="qk_norm='full'"):
        grow(make(qk_norm="full"), GrowConfig(num_heads=8))
    mla = dict(attention_type="mla", kv_lora_rank=8, qk_rope_head_dim=4, v_head_dim=4, qk_nope_head_dim=4)
    with pytest.raises(ValueError, match="needs attention_type='mha'"):
        grow(make(num_kv_heads=None, **mla), GrowConfig(num_heads=8))


def test_cli_grow_aki_pro(tmp_path, capsys):
    from moekit.cli.main import main

    make().float().save_pretrained(tmp_path / "dense")
    argv = ["grow", "--model", str(tmp_path / "dense"), "--out", str(tmp_path / "g"), "--ffn-dim", "20"]
    argv += ["--ffn-scheme", "aki", "--num-heads", "8", "--attn-scheme", "aki", "--num-new-layers", "1"]
    assert main(argv + ["--depth-init", "copy"]) == 0
    grown = MoEForCausalLM.from_pretrained(tmp_path / "g")
    assert (grown.config.num_heads, grown.config.num_kv_heads, grown.config.ffn_dim) == (8, 4, 20)
    assert (
        main(["grow", "--model", str(tmp_path / "dense"), "--out", str(tmp_path / "h"), "--num-heads", "7"])
        == 2
    )
    assert "whole GQA groups" in capsys.readouterr().err
