"""moekit.surgery: function preservation, freezing, pruning/merging round-trips, clear errors, CLI."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.layers import MoEConfig
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.surgery import (
    EXTENSION_FREEZE,
    DMUConfig,
    ExtendConfig,
    GrowConfig,
    MergeConfig,
    MixtureConfig,
    PruneConfig,
    UpcycleConfig,
    changed_tensors,
    consolidate_extension,
    dmu_upcycle,
    extend_experts,
    grow,
    kmeans,
    merge_dense_models,
    merge_experts,
    prune_experts,
    recipe_freeze,
    snapshot,
    train_steps,
    upcycle,
)
from moekit.surgery.extend import extension_freeze_check, load_shift

torch.set_num_threads(1)
VOCAB = 97


def dense_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64, qk_norm="per_head"
    )
    base.update(kw)
    return ModelConfig(**base)


def moe_config(num_experts: int = 6, **kw) -> ModelConfig:
    return dense_config(moe=MoEConfig(dim=32, ffn_dim=32, num_experts=num_experts, top_k=2), **kw)


def make(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> MoEForCausalLM:
    torch.manual_seed(seed)
    return MoEForCausalLM(cfg).to(dtype).eval()


def tokens(b: int = 4, s: int = 17, lo: int = 0, hi: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(lo, hi, (b, s), generator=torch.Generator().manual_seed(seed))


def params_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# Upcycling


@pytest.mark.parametrize(
    "config",
    [
        UpcycleConfig(num_experts=4, top_k=2, router_init="random"),
        UpcycleConfig(num_experts=4, top_k=1, router_init="zeros", layers="every_other"),
        UpcycleConfig(num_experts=3, top_k=2, router_init="kmeans", layers="explicit", layer_indices=(0,)),
        UpcycleConfig.exact_split(4),
    ],
    ids=["copy-random", "copy-top1-every-other", "copy-kmeans", "exact-split"],
)
def test_upcycle_equals_dense_at_init_float64(config):
    dense = make(dense_config(), dtype=torch.float64)
    before = copy.deepcopy(dense)
    x = tokens()
    moe = upcycle(dense, config, calibration=x)
    assert moe.config.num_moe_layers == len(
        {"all": [0, 1], "every_other": [1], "explicit": [0]}[config.layers]
    )
    assert next(moe.parameters()).dtype == torch.float64
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-10)
    assert params_equal(dense, before), "upcycle modified its input"


def test_upcycle_noise_and_nonexact_split_change_outputs():
    dense = make(dense_config(), dtype=torch.float64)
    x = tokens()
    noisy = upcycle(dense, UpcycleConfig(num_experts=2, expert_init="noise", noise_std=0.1))
    split = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, expert_init="split"))
    assert (noisy(x).logits - dense(x).logits).abs().max() > 1e-8
    assert split.layers[0].mlp.experts.w_out.shape == (4, 32, 16)
    assert (split(x).logits - dense(x).logits).abs().max() > 1e-6


def test_upcycle_kmeans_router_rows_follow_centroids():
    dense = make(dense_config(), dtype=torch.float64)
    moe = upcycle(
        dense, UpcycleConfig(num_experts=4, router_init="kmeans", router_logit_std=2.0), calibration=tokens()
    )
    from moekit.surgery import collect_ffn_inputs

    x = collect_ffn_inputs(dense, tokens(), [0])[0]
    logits = x @ moe.layers[0].mlp.router.weight.t()
    assert abs(float(logits.detach().std()) - 2.0) < 1e-6
    assert len(set(logits.argmax(-1).tolist())) > 1  # centroids split the tokens


def test_upcycle_errors():
    with pytest.raises(ValueError, match="top_k"):
        UpcycleConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="divide"):
        upcycle(make(dense_config(ffn_dim=60)), UpcycleConfig(num_experts=8, expert_init="split"))
    with pytest.raises(ValueError, match="already has MoE"):
        upcycle(make(moe_config()), UpcycleConfig())
    with pytest.raises(ValueError, match="calibration"):
        upcycle(make(dense_config()), UpcycleConfig(router_init="kmeans"))
    with pytest.raises(ValueError, match="unknown MoEConfig"):
        UpcycleConfig(moe_overrides={"nope": 1})


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.eye(3) * 10
    x = torch.cat([c + torch.randn(30, 3, generator=gen) * 0.1 for c in centers])
    _, assign = kmeans(x, 3, spherical=False)
    assert all(len(set(assign[i * 30 : (i + 1) * 30].tolist())) == 1 for i in range(3))
    assert len(set(assign.tolist())) == 3


# Scale-up


@pytest.mark.parametrize(
    "config",
    [
        GrowConfig(ffn_dim=96),
        GrowConfig(ffn_dim=100, ffn_scheme="fpi"),
        GrowConfig(num_new_layers=2),
        GrowConfig(num_new_layers=1, depth_position="stack"),
    ],
    ids=["ffn-zero", "ffn-fpi", "depth-interleave", "depth-stack"],
)
def test_grow_exact_schemes_float64(config):
    dense = make(dense_config(), dtype=torch.float64)
    x = tokens()
    grown = grow(dense, config)
    torch.testing.assert_close(grown(x).logits, dense(x).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["per_head", "none", "full", "mla"])
def test_grow_width_is_exact_up_to_float32_norms(variant):
    if variant == "mla":
        mla = dict(
            attention_type="mla", kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8
        )
        cfg = dense_config(qk_norm="none", num_kv_heads=None, q_lora_rank=16, **mla)
    else:
        cfg = dense_config(qk_norm=variant)
    dense = make(cfg, dtype=torch.float64)
    x = tokens()
    grown = grow(dense, GrowConfig(dim=48, ffn_dim=96, num_new_layers=1))
    assert grown.config.dim == 48 and grown.config.num_layers == 3
    torch.testing.assert_close(grown(x).logits, dense(x).logits, rtol=0, atol=1e-6)


def test_grow_then_upcycle_and_copy_depth_is_not_exact():
    dense = make(dense_config(), dtype=torch.float64)
    x = tokens()
    moe = upcycle(grow(dense, GrowConfig(ffn_dim=128, num_new_layers=2)), UpcycleConfig(num_experts=4))
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-10)
    copied = grow(dense, GrowConfig(num_new_layers=2, depth_init="copy"))
    assert (copied(x).logits - dense(x).logits).abs().max() > 1e-4
    with pytest.raises(ValueError, match="smaller"):
        grow(dense, GrowConfig(ffn_dim=32))


# Extension


def test_extension_isolated_keeps_old_task_bit_identical_and_frozen_params():
    model = make(moe_config(num_experts=4))
    old, new = tokens(4, 17, 0, 50), tokens(4, 17, 50, VOCAB, seed=2)
    ref = model(old).logits
    ext = extend_experts(model, ExtendConfig(layers="all", router_init="isolated"), new_data=new)
    assert ext.config.experts_per_layer == (5, 5)
    assert torch.equal(ext(old).logits, ref)
    assert all(
        n.split(".")[-1] in ("new_w_in", "new_w_out", "new_weight", "new_bias")
        for n in extension_freeze_check(ext)
    )
    # MoExtend init (copy of the most-used expert and its row), trained with weight decay: old params frozen.
    ext2 = extend_experts(model, ExtendConfig(layers="all"), new_data=new)
    trainable = set(extension_freeze_check(ext2))
    before = snapshot(ext2)
    train_steps(
        ext2, [torch.cat([new, new[:, :1]], 1)], 4, lr=1e-2, freeze=EXTENSION_FREEZE, weight_decay=0.1
    )
    changed = set(changed_tensors(ext2, before))
    assert changed and changed <= trainable
    # Consolidation gives a plain, savable model with the same function.
    plain = consolidate_extension(ext2)
    torch.testing.assert_close(plain(old).logits, ext2(old).logits, rtol=0, atol=1e-5)


def test_extension_chooses_layers_by_shift_and_round_trips(tmp_path):
    model = make(moe_config(num_experts=4, num_layers=4))
    old, new = tokens(4, 17, 0, 50), tokens(4, 17, 50, VOCAB, seed=2)
    # Hand-built routing: old tokens (< 50) carry +10 along channel 0 of the residual stream and
    # new tokens -10. Layers 1 and 3 route on that channel (old -> experts 0/1, new -> 3/2); layers
    # 0 and 2 have zero routers, so both data sets give them the same load (shift 0).
    with torch.no_grad():
        emb = model.embed_tokens.weight
        emb[:50, 0], emb[50:, 0] = 10.0, -10.0
        for i, layer in enumerate(model.layers):
            w = layer.mlp.router.weight
            w.zero_()
            if i in (1, 3):
                w[0, 0], w[1, 0], w[2, 0], w[3, 0] = 2.0, 1.0, -1.0, -2.0
    data_variant = ExtendConfig(shift_fraction=0.5, shift_source="data", shift_metric="js")
    ext = extend_experts(model, data_variant, new_data=new, old_data=old)
    from moekit.surgery import routing_shift
    from moekit.surgery.extend import extended_layers

    shifts = routing_shift(model, old, new)
    assert shifts[0] == pytest.approx(0.0, abs=1e-9) and shifts[2] == pytest.approx(0.0, abs=1e-9)
    assert min(shifts[1], shifts[3]) > 0.5  # disjoint expert sets: JS divergence near ln 2
    assert extended_layers(ext) == [1, 3]
    plain = consolidate_extension(ext)
    plain.save_pretrained(tmp_path / "m")
    back = MoEForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(back(old).logits, plain(old).logits)
    assert load_shift(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == pytest.approx(0.0, abs=1e-12)


# Pruning


def test_prune_keeps_exactly_the_most_used_experts(tmp_path):
    cfg = moe_config(num_experts=6)
    crafted = make(cfg.replace(moe=cfg.moe.replace(router_bias=True)))
    x = tokens()
    # Crafted routing in layer 0: expert 4 takes every token, experts 1 and 2 split the second slot by
    # the sign of one direction, experts 0, 3, 5 are never chosen.
    with torch.no_grad():
        router = crafted.layers[0].mlp.router
        direction = torch.randn(32, generator=torch.Generator().manual_seed(5))
        router.weight.zero_()
        router.weight[1], router.weight[2] = direction, -direction
        router.bias.copy_(torch.tensor([-10.0, 2.0, 2.0, -10.0, 10.0, -10.0]))
    from moekit.surgery import expert_usage

    usage = expert_usage(crafted, x)[0]
    assert usage[[0, 3, 5]].sum() == 0 and usage[4] == x.numel() and usage[1] > 0 and usage[2] > 0
    pruned = prune_experts(crafted, PruneConfig(num_keep=3), calibration=x)
    assert pruned.pruned_experts[0] == [1, 2, 4]
    assert pruned.config.experts_per_layer == (3, 3)
    assert pruned.layers[0].mlp.router.weight.shape == (3, 32)
    torch.testing.assert_close(
        pruned.layers[0].mlp.router.weight, crafted.layers[0].mlp.router.weight[[1, 2, 4]]
    )
    two = prune_experts(crafted, PruneConfig(num_keep=2), calibration=x)
    assert two.pruned_experts[0] == sorted([4, 1 if usage[1] >= usage[2] else 2])
    gm = prune_experts(crafted, PruneConfig(num_keep=3, metric="gate_mass"), calibration=x)
    assert gm.pruned_experts[0] == [1, 2, 4]
    # Experts 1, 2, 4 were the only ones used in layer 0, so its output there is unchanged (top-2 of 3).
    pruned.save_pretrained(tmp_path / "p")
    back = MoEForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert torch.equal(back(x).logits, pruned(x).logits)
    rnd = prune_experts(crafted, PruneConfig(num_keep=2, metric="random", seed=3))
    assert rnd.config.experts_per_layer == (2, 2)


def test_prune_errors():
    model = make(moe_config(num_experts=4))
    with pytest.raises(ValueError, match="fewer experts than top_k=2"):
        prune_experts(model, PruneConfig(num_keep=1, metric="random"))
    with pytest.raises(ValueError, match="exceeds the 4 experts"):
        prune_experts(model, PruneConfig(num_keep=5, metric="random"))
    with pytest.raises(ValueError, match="calibration"):
        prune_experts(model, PruneConfig(num_keep=2))
    with pytest.raises(ValueError, match="metric"):
        PruneConfig(num_keep=2, metric="nope")


# Merging


@pytest.mark.parametrize(
    "config",
    [
        MergeConfig(num_experts=3),
        MergeConfig(num_experts=2, similarity="output", usage_weighted=True, router_merge="mean_logn_bias"),
    ],
    ids=["weight", "output-usage-logn"],
)
def test_merge_shapes_and_round_trip(config, tmp_path):
    model = make(moe_config(num_experts=6))
    x = tokens()
    merged = merge_experts(model, config, calibration=x)
    m = config.num_experts
    assert merged.config.experts_per_layer == (m, m)
    assert merged.layers[1].mlp.experts.w_in.shape == (m, 64, 32)
    assert sorted(e for g in merged.merged_groups[0] for e in g) == list(range(6))
    merged.save_pretrained(tmp_path / "m")
    back = MoEForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(back(x).logits, merged(x).logits)


def test_merging_identical_experts_is_exact():
    model = make(moe_config(num_experts=4), dtype=torch.float64)
    with torch.no_grad():
        for mlp in model.moe_layers:  # experts 0, 1, 2 identical (weights and router rows), 3 differs
            for t in (mlp.experts.w_in, mlp.experts.w_out, mlp.router.weight):
                t[1] = t[0]
                t[2] = t[0]
    x = tokens()
    merged = merge_experts(model, MergeConfig(num_experts=2, router_merge="mean_logn_bias"))
    assert merged.merged_groups[0] == [[0, 1, 2], [3]]
    # Row + log(group size) bias gives each group exactly its summed softmax mass, so using every
    # expert (k = E) the merged layer computes the same mixture. (With top-k < E the original picks
    # could be two copies of one group, so only k = E is exact.)
    full_old = model(x, moe_k=4).logits
    full_new = merged(x, moe_k=2).logits
    torch.testing.assert_close(full_new, full_old, rtol=0, atol=1e-10)


# Mixture of dense models


def test_moe_merge_builds_experts_from_fine_tunes_and_rejects_mismatches():
    cfg = dense_config()
    base = make(cfg, 0)
    fts = [make(cfg, s) for s in (1, 2, 3)]
    x = tokens()
    mix = merge_dense_models(base, fts, MixtureConfig(shared="base"), prompts=[x[:2], x[2:3], x[3:]])
    for e, ft in enumerate(fts):
        assert torch.equal(mix.layers[1].mlp.experts.w_in[e], ft.layers[1].mlp.w_in.weight)
    assert torch.equal(mix.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
    rows = mix.layers[0].mlp.router.weight
    assert rows.shape == (3, 32)
    avg = merge_dense_models(base, fts, MixtureConfig(router_init="zeros", top_k=3))
    expected = torch.stack([m.embed_tokens.weight for m in fts]).mean(0)
    torch.testing.assert_close(avg.embed_tokens.weight, expected)
    # All experts identical to the base -> the MoE equals the base (copies, weights sum to 1).
    same = merge_dense_models(base, [base, base], MixtureConfig(router_init="random"))
    torch.testing.assert_close(same(x).logits, base(x).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.w_in\.weight' has shape"):
        merge_dense_models(base, [fts[0], make(cfg.replace(ffn_dim=32))], MixtureConfig(router_init="zeros"))
    with pytest.raises(ValueError, match="prompt batches"):
        merge_dense_models(base, fts, MixtureConfig())


# DMU and recipes


def test_dmu_assembles_cluster_experts():
    dense = make(dense_config())
    seqs = tokens(12, 17)
    moe = dmu_upcycle(
        dense,
        DMUConfig(upcycle=UpcycleConfig(num_experts=3, top_k=2), ffn_steps=2, router_steps=2, batch_size=4),
        seqs,
    )
    assert moe.config.moe_layer_ids == [0, 1]
    assert len(set(moe.dmu_clusters.tolist())) == 3
    w = moe.layers[0].mlp.experts.w_in
    assert not torch.equal(w[0], w[1])  # experts were fine-tuned on different clusters
    assert moe(seqs[:, :-1]).logits.shape == (12, 16, VOCAB)
    assert DMUConfig.from_dict(DMUConfig().to_dict()) == DMUConfig()


def test_recipes_are_valid_freeze_specs():
    from moekit.train import TrainConfig, select_frozen

    moe = upcycle(make(dense_config(num_layers=2)), UpcycleConfig(layers="every_other", num_experts=2))
    names = [n for n, _ in moe.named_parameters()]
    frozen = select_frozen(names, recipe_freeze("moe_llava_stage3"))
    trainable = set(names) - frozen
    assert trainable and all(".mlp.router." in n or ".mlp.experts." in n for n in trainable)
    assert "layers.0.mlp.w_in.weight" in frozen
    code = set(names) - select_frozen(names, recipe_freeze("moe_llava_stage3_code"))
    assert "layers.0.mlp.w_in.weight" in code
    TrainConfig(freeze=recipe_freeze("extension"))  # validates the regexes
    with pytest.raises(ValueError, match="unknown surgery recipe"):
        recipe_freeze("nope")


def test_configs_round_trip():
    for cfg in (
        UpcycleConfig.exact_split(4),
        GrowConfig(dim=48),
        ExtendConfig(layers="explicit", layer_indices=(1,)),
        PruneConfig(num_keep=2),
        MergeConfig(num_experts=2),
        MixtureConfig(layers="every_other"),
    ):
        assert type(cfg).from_json(cfg.to_json()) == cfg


# CLI


def test_cli_upcycle_prune_merge_extend(tmp_path, capsys):
    from moekit.cli import extend_experts as extend_verb
    from moekit.cli import grow as grow_verb
    from moekit.cli import merge_experts as merge_verb
    from moekit.cli import moe_merge as mix_verb
    from moekit.cli import prune_experts as prune_verb
    from moekit.cli import upcycle as upcycle_verb

    def call(mod, argv):
        import argparse

        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        return mod.run(p.parse_args(argv))

    dense = make(dense_config())
    dense.save_pretrained(tmp_path / "dense")
    assert (
        call(grow_verb, ["--model", str(tmp_path / "dense"), "--out", str(tmp_path / "g"), "--ffn-dim", "96"])
        == 0
    )
    assert (
        call(
            upcycle_verb, ["--model", str(tmp_path / "g"), "--out", str(tmp_path / "u"), "--num-experts", "4"]
        )
        == 0
    )
    up = MoEForCausalLM.from_pretrained(tmp_path / "u")
    assert up.config.moe.num_experts == 4 and up.config.moe.ffn_dim == 96
    assert (
        call(
            prune_verb,
            [
                "--model",
                str(tmp_path / "u"),
                "--out",
                str(tmp_path / "p"),
                "--keep",
                "2",
                "--metric",
                "random",
            ],
        )
        == 0
    )
    assert MoEForCausalLM.from_pretrained(tmp_path / "p").config.experts_per_layer == (2, 2)
    assert (
        call(merge_verb, ["--model", str(tmp_path / "u"), "--out", str(tmp_path / "m"), "--num-experts", "3"])
        == 0
    )
    assert (
        call(
            mix_verb,
            [
                "--base",
                str(tmp_path / "dense"),
                "--experts",
                str(tmp_path / "dense"),
                str(tmp_path / "dense"),
                "--out",
                str(tmp_path / "x"),
                "--router-init",
                "random",
            ],
        )
        == 0
    )
    assert MoEForCausalLM.from_pretrained(tmp_path / "x").config.moe.num_experts == 2
    assert "upcycled" in capsys.readouterr().out
    # extension reads new-task text with the model's tokenizer
    with pytest.raises(ValueError, match="tokenizer"):
        call(
            extend_verb,
            ["--model", str(tmp_path / "u"), "--out", str(tmp_path / "e"), "--new-data", str(tmp_path)],
        )
    from moekit.data import save_tokenizer, train_tokenizer

    make(moe_config(num_experts=4, vocab_size=300)).save_pretrained(tmp_path / "v")
    save_tokenizer(train_tokenizer(["def f(x):\n    return x + 1\n" * 40], 300), tmp_path / "v")
    (tmp_path / "old.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    (tmp_path / "new.txt").write_text("12+34=46;\n" * 60)
    argv = [
        "--model",
        str(tmp_path / "v"),
        "--out",
        str(tmp_path / "e"),
        "--new-data",
        str(tmp_path / "new.txt"),
    ]
    argv += [
        "--calib",
        str(tmp_path / "old.txt"),
        "--router-init",
        "contrast",
        "--seq-len",
        "16",
        "--calib-batches",
        "2",
    ]
    assert call(extend_verb, argv) == 0
    ext = MoEForCausalLM.from_pretrained(tmp_path / "e")
    assert sorted(ext.config.experts_per_layer) == [4, 5] and (tmp_path / "e" / "tokenizer.json").is_file()


def test_contrast_extension_and_bias_calibration_keep_old_outputs():
    from moekit.surgery import calibrate_new_bias

    model = make(moe_config(num_experts=4))
    old, new = tokens(4, 17, 0, 50), tokens(4, 17, 50, VOCAB, seed=2)
    ref = model(old).logits
    ext = extend_experts(
        model, ExtendConfig(layers="all", router_init="contrast", contrast_leak=0.0), new, old
    )
    assert ext.layers[0].mlp.router.new_bias is not None
    train_steps(ext, [torch.cat([new, new[:, :1]], 1)], 5, lr=5e-2, freeze=EXTENSION_FREEZE)
    cal = calibrate_new_bias(ext, old, leak=0.0)
    used_new = [(r.expert_ids >= 4).any().item() for r in cal(old).routing]
    assert not any(used_new)  # no old token picks a new expert after calibration
    torch.testing.assert_close(cal(old).logits, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no new_bias"):
        calibrate_new_bias(extend_experts(model, ExtendConfig(layers="all"), new), old)
