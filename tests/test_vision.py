"""Vision family: ViT-MoE, task-level MoE, CLIP-MoE (HF parity), upcycling, image data, training."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.data.images import (
    CAPTION_LEN,
    VOCAB_SIZE,
    ImagePreprocess,
    MultiTaskShapesDataModule,
    make_shape_scenes,
    preprocess_images,
    tokenize_captions,
)
from moekit.layers import MoEConfig, MoELayer
from moekit.models.vision import (
    CLIPConfig,
    CLIPMoE,
    TextConfig,
    ViTConfig,
    ViTMoE,
    contrastive_loss,
)
from moekit.models.vision.task import extract_task_model
from moekit.surgery.multiplet import MultipletConfig, multiplet_upcycle, upcycle_vision
from moekit.surgery.upcycle import UpcycleConfig

torch.set_num_threads(1)


def tiny_clip(moe: bool = False) -> CLIPConfig:
    m = (
        MoEConfig(dim=16, ffn_dim=24, num_experts=3, top_k=2, activation="gelu", ffn_bias=True)
        if moe
        else None
    )
    vision = ViTConfig(
        dim=16, num_layers=2, num_heads=2, ffn_dim=24, image_size=16, patch_size=8, num_channels=3,
        patch_bias=False, pre_norm=True, moe=m, moe_placement="every_other",
    )  # fmt: skip
    text = TextConfig(
        dim=16, num_layers=2, num_heads=2, ffn_dim=24, vocab_size=VOCAB_SIZE,
        max_position_embeddings=CAPTION_LEN, moe=m, moe_placement="every_other",
    )  # fmt: skip
    return CLIPConfig(vision=vision, text=text, projection_dim=8)


def tiny_multitask(routing: str = "embed") -> ViTConfig:
    moe = MoEConfig(
        dim=16, ffn_dim=24, num_experts=6, top_k=2, activation="gelu", ffn_bias=True, num_tasks=3,
        task_routing=routing,
    )  # fmt: skip
    return ViTConfig(
        dim=16, num_layers=2, num_heads=2, ffn_dim=24, image_size=16, patch_size=8, num_channels=3,
        task_num_classes=(3, 3, 3), moe=moe, moe_placement="all",
    )  # fmt: skip


def scene_batch(n: int = 6, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    s = make_shape_scenes(n, 16, seed)
    ids, mask = tokenize_captions(s["captions"])
    px = preprocess_images(s["images"], ImagePreprocess(size=16, channels=3, value_range=1.0)).to(dtype)
    return {"pixel_values": px, "input_ids": ids, "attention_mask": mask}


# --- the contrastive loss ---------------------------------------------------------------------


def test_contrastive_loss_matches_hand_computed_3x3():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)

    def ce(rows):  # -log softmax(row)[i], by hand
        return sum(-rows[i][i] + math.log(sum(math.exp(v) for v in rows[i])) for i in range(3)) / 3

    rows = logits.tolist()
    cols = logits.t().tolist()
    want = (ce(rows) + ce(cols)) / 2
    assert contrastive_loss(logits).item() == pytest.approx(want, abs=1e-12)
    # Asymmetric on purpose: the two directions differ, so a one-sided loss would fail here.
    assert ce(rows) != pytest.approx(ce(cols), abs=1e-3)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3))


# --- HF CLIP parity -----------------------------------------------------------------------------


def _hf_clip(eos: int = 7):
    transformers = pytest.importorskip("transformers")
    tc = transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=12, eos_token_id=eos, pad_token_id=0, bos_token_id=1, hidden_act="quick_gelu",
        layer_norm_eps=1e-6,
    )  # fmt: skip
    vc = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=12,
        patch_size=4, num_channels=3, hidden_act="gelu",
    )  # fmt: skip
    cfg = transformers.CLIPConfig(
        text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=20, logit_scale_init_value=2.0
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms away from their 0/1 init
    return transformers, model


@pytest.mark.parametrize("eos", [7, 2])
def test_hf_clip_import_export_parity(tmp_path, eos):
    import moekit
    from moekit.convert.families.clip import save_clip_hf

    transformers, hf = _hf_clip(eos)
    hf.save_pretrained(tmp_path / "hf")
    ours = moekit.from_pretrained(tmp_path / "hf").double()
    assert isinstance(ours, CLIPMoE) and ours.config.text.pooling == ("argmax" if eos == 2 else "eos")
    torch.manual_seed(1)
    px = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    ids = torch.tensor([[1, 5, 9, eos, 0, 0], [1, eos, 0, 0, 0, 0], [1, 3, 4, 5, 6, eos]])
    if eos == 2:  # argmax pooling: the eos id must be the largest id of each row, as in old CLIP vocabularies
        ids = torch.tensor([[1, 0, 0, 49, 0, 0], [1, 48, 0, 0, 0, 0], [1, 3, 4, 5, 6, 47]])
    mask = (torch.arange(6)[None] < torch.tensor([4, 2, 6])[:, None]).long()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image
        got = ours(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image
        assert (want - got).abs().max().item() < 1e-5
        assert (want - got).abs().max().item() < 1e-12  # in float64 it is the same math
        save_clip_hf(ours, tmp_path / "back")
        again = transformers.CLIPModel.from_pretrained(tmp_path / "back").double().eval()
        back = again(input_ids=ids, pixel_values=px, attention_mask=mask).logits_per_image
    assert (want - back).abs().max().item() < 1e-12


def test_moekit_convert_round_trips_a_clip_folder(tmp_path):
    from moekit.cli.main import main

    _, hf = _hf_clip()
    hf.float().save_pretrained(tmp_path / "hf")
    assert (
        main(["convert", "--from", str(tmp_path / "hf"), "--to", str(tmp_path / "mk"), "--format", "moekit"])
        == 0
    )
    assert (
        main(["convert", "--from", str(tmp_path / "mk"), "--to", str(tmp_path / "hf2"), "--format", "hf"])
        == 0
    )
    import moekit

    a, b = moekit.from_pretrained(tmp_path / "hf"), moekit.from_pretrained(tmp_path / "hf2")
    assert isinstance(b, CLIPMoE)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_clip_export_refuses_moe(tmp_path):
    from moekit.convert.families.clip import save_clip_hf

    with pytest.raises(ValueError, match="MoE layers"):
        save_clip_hf(
            CLIPMoE(tiny_clip(moe=True).replace(vision=tiny_clip().vision.replace(pre_norm=True))), tmp_path
        )


# --- upcycling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["all", "every_other"])
def test_upcycled_clip_equals_dense_parent_at_init(layers):
    torch.manual_seed(0)
    dense = CLIPMoE(tiny_clip()).double()
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "mlp.w_" in name and name.endswith("bias"):
                p.normal_()  # biased FFNs: the copies must carry the biases too
    up = UpcycleConfig(num_experts=4, top_k=2, layers=layers, router_init="random", router_std=1.0)
    moe = upcycle_vision(dense, up)
    assert len(moe.moe_layers) == (4 if layers == "all" else 2)
    batch = scene_batch()
    with torch.no_grad():
        a, b = dense(**batch), moe(**batch)
    assert (a.logits_per_image - b.logits_per_image).abs().max().item() < 1e-12
    # The random router really routes: tokens differ in their chosen experts.
    assert len({tuple(r) for r in b.routing[0].expert_ids.tolist()}) > 1


def _changed(before: dict, model) -> set[str]:
    now = dict(model.named_parameters())
    return {n for n, v in before.items() if not torch.equal(now[n].detach(), v)}


@pytest.mark.parametrize("recipe", ["multiplet", "per_cluster_only"])
def test_multiplet_stages_train_exactly_the_intended_parameters(recipe):
    torch.manual_seed(0)
    dense = CLIPMoE(tiny_clip())
    data = scene_batch(48, seed=3, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    cfg = MultipletConfig(
        upcycle=UpcycleConfig(num_experts=3, top_k=2, layers="every_other"), recipe=recipe,
        clusters_per_modality=2, stage_steps=2, router_steps=2, batch_size=8, stage_lr=1e-2,
    )  # fmt: skip
    res = multiplet_upcycle(dense, cfg, data)
    assert _changed(before, dense) == set()  # the dense model is not modified
    mlp = {n for n in before if ".layers.1.mlp." in n}
    assert mlp == {
        f"{t}.encoder.layers.1.mlp.{w}.{p}"
        for t in ("vision", "text")
        for w in ("w_in", "w_out")
        for p in ("weight", "bias")
    }
    stages = [k for k in res.trainable if k != "router"]
    assert len(stages) == (2 if recipe == "multiplet" else 3)
    for name in stages:
        assert set(res.trainable[name]) == mlp
    routers = {n for n, _ in res.model.named_parameters() if n.endswith("router.weight")}
    assert set(res.trainable["router"]) == routers and len(routers) == 2
    experts = res.model.vision.encoder.layers[1].mlp.experts
    dense_w = dense.vision.encoder.layers[1].mlp.w_in.weight
    # Stage 0 (the dense base) is expert 0 in the paper's recipe; per-cluster experts are all tuned.
    assert torch.equal(experts.w_in[0], dense_w) == (recipe == "multiplet")
    assert not torch.equal(experts.w_in[1], dense_w)
    if recipe == "multiplet":  # labels refine stage by stage (label * k^2 + new cluster)
        assert len(res.labels) == 2 and len(torch.unique(res.labels[1])) >= len(torch.unique(res.labels[0]))


# --- task-level MoE -----------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["embed", "multi_gate"])
def test_task_routing_uses_only_its_experts_and_extraction_is_exact(routing):
    torch.manual_seed(0)
    model = ViTMoE(tiny_multitask(routing)).double().eval()
    if routing == "embed":
        with torch.no_grad():  # task t strongly prefers experts 2t and 2t+1
            for moe in model.moe_layers:
                moe.router.task_logits.fill_(-20.0)
                for t in range(3):
                    moe.router.task_logits[t, 2 * t : 2 * t + 2] = 20.0
    batches = [{"pixel_values": scene_batch(8, seed=s)["pixel_values"]} for s in range(2)]
    for t in range(3):
        out = model(batches[0]["pixel_values"], task=t)
        ex = extract_task_model(model, t, batches)
        for info, kept in zip(out.routing, ex.kept_experts):
            assert set(info.expert_ids.flatten().tolist()) <= set(kept)
        if routing == "embed":
            assert ex.kept_experts == [[2 * t, 2 * t + 1]] * 2
            assert ex.expert_share == [2 / 6, 2 / 6]
        assert ex.bytes_saved > 0 and ex.num_params_task < ex.num_params_full
        assert ex.model.config.task_num_classes == () and not ex.model.config.moe.num_tasks
        for b in batches:
            full = model(b["pixel_values"], task=t).logits
            small = ex.model(b["pixel_values"]).logits
            assert (full - small).abs().max().item() < 1e-12
    # Tasks route differently: the same images reach different experts under different tasks.
    x = batches[0]["pixel_values"]
    assert not torch.equal(model(x, task=0).routing[0].expert_ids, model(x, task=1).routing[0].expert_ids)


def test_task_expert_budget_is_structural_and_extraction_exact_on_any_input():
    torch.manual_seed(0)
    cfg = tiny_multitask()
    model = ViTMoE(cfg.replace(moe=cfg.moe.replace(task_num_experts=3))).double().eval()
    calib = [{"pixel_values": scene_batch(4, seed=0)["pixel_values"]}]
    unseen = scene_batch(8, seed=9)["pixel_values"] * 3  # other images, other scale
    for t in range(3):
        ex = extract_task_model(model, t, calib)
        allowed = [m.router.task_experts_mask()[t] for m in model.moe_layers]
        assert [sorted(k) for k in ex.kept_experts] == [torch.nonzero(a).flatten().tolist() for a in allowed]
        out = model(unseen, task=t)
        for info, kept in zip(out.routing, ex.kept_experts):
            assert set(info.expert_ids.flatten().tolist()) <= set(kept)
        assert (out.logits - ex.model(unseen).logits).abs().max().item() < 1e-12
        assert ex.expert_share == [0.5, 0.5]
    with pytest.raises(ValueError, match="task_num_experts"):
        MoEConfig(dim=8, ffn_dim=8, num_experts=4, num_tasks=2, task_num_experts=1)


def test_task_ids_required_and_rejected():
    layer = MoELayer(MoEConfig(dim=8, ffn_dim=8, num_experts=4, num_tasks=2))
    with pytest.raises(ValueError, match="pass task_ids"):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="without tasks"):
        MoELayer(MoEConfig(dim=8, ffn_dim=8, num_experts=4))(torch.randn(3, 8), task_ids=torch.tensor(0))
    with pytest.raises(ValueError, match="needs num_tasks"):
        MoEConfig(dim=8, ffn_dim=8, task_routing="multi_gate")
    model = ViTMoE(tiny_multitask())
    with pytest.raises(ValueError, match="pass task="):
        model(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_vision_experts_sorted_path_matches_eager(activation, bias):
    torch.manual_seed(0)
    cfg = MoEConfig(dim=8, ffn_dim=12, num_experts=4, top_k=2, activation=activation, ffn_bias=bias)
    fast = MoELayer(cfg).double()
    slow = MoELayer(cfg.replace(backend="eager")).double()
    if bias:
        with torch.no_grad():
            fast.experts.b_in.normal_()
            fast.experts.b_out.normal_()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    a, b = fast(x), slow(x)
    assert a.backend == "sorted" and b.backend == "eager"
    ga = torch.autograd.grad(a.hidden.square().sum(), [x, fast.experts.w_in])
    gb = torch.autograd.grad(b.hidden.square().sum(), [x, slow.experts.w_in])
    assert (a.hidden - b.hidden).abs().max().item() < 1e-12
    assert max((u - v).abs().max().item() for u, v in zip(ga, gb)) < 1e-12


# --- image data ---------------------------------------------------------------------------------


def test_preprocessing_resizes_normalises_and_rejects_bad_images():
    grey = torch.rand(2, 8, 8).numpy() * 16
    out = preprocess_images(grey, ImagePreprocess(size=16, channels=1, value_range=16.0))
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32
    flat = preprocess_images(
        torch.full((1, 4, 4), 16.0).numpy(), ImagePreprocess(size=4, channels=1, value_range=16)
    )
    assert torch.allclose(flat, torch.ones_like(flat))  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match=r"3 channel\(s\), the model expects 1"):
        preprocess_images(torch.rand(2, 8, 8, 3).numpy(), ImagePreprocess(size=8, channels=1))
    with pytest.raises(ValueError, match="resize=False"):
        preprocess_images(torch.rand(2, 8, 8).numpy(), ImagePreprocess(size=16, channels=1, resize=False))
    with pytest.raises(ValueError, match="expected"):
        preprocess_images(torch.rand(8).numpy(), ImagePreprocess(size=8, channels=1))
    vit = ViTMoE(ViTConfig(dim=16, num_layers=1, num_heads=2, ffn_dim=16, num_classes=2))
    with pytest.raises(ValueError, match=r"expects \[B, 1, 8, 8\]"):
        vit(torch.zeros(2, 3, 8, 8))


def test_scenes_and_captions_are_exact():
    s = make_shape_scenes(20, 16, seed=5)
    for cap, shape, colour, count in zip(s["captions"], s["shape"], s["colour"], s["count"]):
        words = cap.split()
        assert words[0] == ("one", "two", "three")[count]
        assert words[1] == ("red", "green", "blue")[colour]
        assert words[2].startswith(("square", "circle", "triangle")[shape])
        assert s["images"][list(s["captions"]).index(cap)][..., colour].sum() > 0
    with pytest.raises(ValueError, match="vocabulary"):
        tokenize_captions(["two purple squares"])


# --- training, resume, save/load ----------------------------------------------------------------


class _StopAfter(MultiTaskShapesDataModule):
    """Raises KeyboardInterrupt (as Ctrl-C would) when batch ``stop_at`` is drawn."""

    stop_at: int | None = None

    def next_train_batch(self):
        if self.stop_at is not None and self.num_drawn == self.stop_at:
            raise KeyboardInterrupt
        return super().next_train_batch()


def _fit_multitask(out_dir, stop_at=None, resume=False):
    from moekit.models.objectives import LossWeights
    from moekit.models.vision import ClassificationObjective
    from moekit.train import LoopConfig, fit, seed_everything

    seed_everything(0)
    model = ViTMoE(tiny_multitask())
    data = _StopAfter(batch_size=8, num_train=40, num_val=8)
    data.stop_at = stop_at
    loop = LoopConfig(
        max_steps=6, lr=1e-2, warmup_steps=2, save_interval=100, eval_interval=2, log_interval=1
    )
    result = fit(
        model, ClassificationObjective(LossWeights(load_balance=0.01)), data, loop, out_dir, resume=resume,
        progress=False, dist_context=None,
    )  # fmt: skip
    return result, model


def test_resume_is_exact_through_fit(tmp_path):
    full, model_full = _fit_multitask(tmp_path / "a")
    cut, _ = _fit_multitask(tmp_path / "b", stop_at=3)
    assert cut.stop_reason == "interrupted" and cut.step == 3
    resumed, model_res = _fit_multitask(tmp_path / "b", resume=True)
    assert [loss for _, loss in full.losses][3:] == [loss for _, loss in resumed.losses]
    assert len(resumed.losses) == 3
    for (n, p), (_, q) in zip(model_full.named_parameters(), model_res.named_parameters()):
        assert torch.equal(p, q), n


def test_save_load_through_moekit_from_pretrained(tmp_path):
    import moekit

    torch.manual_seed(0)
    vit = ViTMoE(tiny_multitask()).eval()
    clip = CLIPMoE(tiny_clip(moe=True)).eval()
    batch = scene_batch(4, dtype=torch.float32)
    for name, model in (("vit", vit), ("clip", clip)):
        model.save_pretrained(tmp_path / name)
        loaded = moekit.from_pretrained(tmp_path / name)
        assert type(loaded) is type(model)
        with torch.no_grad():
            if name == "vit":
                assert torch.equal(
                    model(batch["pixel_values"], task=2).logits, loaded(batch["pixel_values"], task=2).logits
                )
            else:
                assert torch.equal(model(**batch).logits_per_image, loaded(**batch).logits_per_image)
    groups = clip.parameter_groups()
    assert set(groups["router"]) == {n for n, _ in clip.named_parameters() if "router" in n}
    assert "logit_scale" in groups["projections"]


def test_vision_train_writes_a_run_folder(tmp_path):
    from moekit.train.vision import VisionRunConfig, train_vision

    cfg = VisionRunConfig(task="clip", out_dir=str(tmp_path / "run"), steps=2, batch_size=8, num_train=40)
    metrics = train_vision(cfg, progress=False)
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last" / "config.json").is_file()
    assert 0.0 <= metrics["image_to_text_r1"] <= 1.0
    from moekit.cli.main import VERBS

    assert VERBS["vision-train"] == "vision_train"


def test_lm_dmu_multiplet_recipe_keeps_the_dense_ffn_as_expert_zero():
    from moekit.models import ModelConfig, MoEForCausalLM
    from moekit.surgery.dmu import DMUConfig, dmu_upcycle

    torch.manual_seed(0)
    dense = MoEForCausalLM(
        ModelConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2, num_kv_heads=2, ffn_dim=24, moe=None)
    )
    seqs = torch.randint(0, 32, (12, 9))
    base = dict(upcycle=UpcycleConfig(num_experts=3, top_k=2), ffn_steps=2, router_steps=1, batch_size=4)
    moe = dmu_upcycle(dense, DMUConfig(**base, recipe="multiplet"), seqs)
    w = moe.layers[0].mlp.experts.w_in
    assert torch.equal(w[0], dense.layers[0].mlp.w_in.weight)  # stage 0 = the dense model
    assert not torch.equal(w[1], w[0]) and not torch.equal(w[2], w[1])
    per = dmu_upcycle(dense, DMUConfig(**base), seqs)  # the default: per_cluster_only
    assert not torch.equal(per.layers[0].mlp.experts.w_in[0], dense.layers[0].mlp.w_in.weight)
    with pytest.raises(ValueError, match="recipe"):
        DMUConfig(recipe="paper")


def test_every_vision_preset_builds_and_the_multitask_preset_has_a_budget():
    from moekit.models.vision.presets import list_vision_presets, vision_preset

    for name in list_vision_presets():
        cfg = vision_preset(name)
        assert (getattr(cfg, "moe", None) is None) == name.endswith("-dense") or isinstance(cfg, CLIPConfig)
    assert vision_preset("multitask-shapes").moe.task_num_experts == 3
    with pytest.raises(ValueError, match="unknown vision preset"):
        vision_preset("vit-huge")


# --- MoE-LLaVA core -----------------------------------------------------------------------------


def tiny_vlm():
    from moekit.models import ModelConfig
    from moekit.models.vision.llava import MoELLaVA, VLMConfig

    vision = ViTConfig(
        dim=16, num_layers=2, num_heads=2, ffn_dim=24, image_size=8, patch_size=4, num_channels=3
    )
    text = ModelConfig(vocab_size=40, dim=16, num_layers=4, num_heads=2, num_kv_heads=1, ffn_dim=24, moe=None)
    return MoELLaVA(VLMConfig(vision=vision, text=text, image_token_id=39))


def test_image_token_splicing_with_0_1_2_images_and_left_padding():
    from moekit.models.vision.llava import splice_image_features

    torch.manual_seed(0)
    vlm = tiny_vlm().double().eval()
    p, img = vlm.config.image_seq_length, 39
    assert p == 4  # (8 / 4)^2 patches, CLS dropped ("default")
    rows = [
        [5, 6, 7, 8],  # no image
        [5] + [img] * p + [6, 7],  # one image
        [img] * p + [9] + [img] * p + [10],  # two images
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    px = torch.randn(3, 3, 8, 8, dtype=torch.float64)  # row 1's image, then row 2's two
    with torch.no_grad():
        feats = vlm.image_features(px)
        spliced = splice_image_features(vlm.language_model.embed_tokens(ids), ids, feats, img)
        assert torch.equal(spliced[1][ids[1] == img], feats[0])
        assert torch.equal(spliced[2][ids[2] == img], feats[1:].reshape(-1, 16))
        assert torch.equal(spliced[0], vlm.language_model.embed_tokens(ids[0]))
        batch = vlm(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        for r, images in ((0, None), (1, px[:1]), (2, px[1:])):
            alone = vlm(input_ids=torch.tensor([rows[r]]), pixel_values=images).logits[0]
            assert (batch[r, width - len(rows[r]) :] - alone).abs().max().item() < 1e-10
    with pytest.raises(ValueError, match="placeholder"):
        vlm(input_ids=ids, pixel_values=px[:2], attention_mask=mask)


def test_moe_llava_stages_train_the_intended_parameters_and_upcycling_is_exact():
    from moekit.models.vision.llava import stage_trainable
    from moekit.surgery.llava import moe_llava_layers, upcycle_vlm

    torch.manual_seed(0)
    vlm = tiny_vlm().double().eval()
    names = {n for n, _ in vlm.named_parameters()}
    assert set(stage_trainable(vlm, 1)) == {n for n in names if n.startswith("projector.")}
    assert set(stage_trainable(vlm, 2)) == {
        n for n in names if n.startswith(("projector.", "language_model."))
    }
    up = moe_llava_layers(4)
    assert up.layer_indices == (0, 2)
    moe = upcycle_vlm(vlm, up)
    assert moe.language_model.config.moe_layer_ids == [0, 2]
    stage3 = set(stage_trainable(moe, 3))
    assert (
        stage3 == {n for n, _ in moe.named_parameters() if ".mlp.router." in n or ".mlp.experts." in n}
        and stage3
    )
    ids = torch.tensor([[1] + [39] * 4 + [2, 3]])
    px = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert (
            vlm(input_ids=ids, pixel_values=px).logits - moe(input_ids=ids, pixel_values=px).logits
        ).abs().max() < 1e-12


def test_vlm_folder_round_trips_through_from_pretrained(tmp_path):
    import moekit
    from moekit.models.io import write_model_folder

    torch.manual_seed(0)
    vlm = tiny_vlm().eval()
    write_model_folder(vlm, tmp_path / "vlm")
    loaded = moekit.from_pretrained(tmp_path / "vlm")
    ids = torch.tensor([[1] + [39] * 4 + [2]])
    px = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(
            vlm(input_ids=ids, pixel_values=px).logits, loaded(input_ids=ids, pixel_values=px).logits
        )


def test_moe_llava_exports_to_hf_llava_with_a_moe_text_model_and_imports_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    import moekit
    from moekit.convert.families.llava import save_llava_hf
    from moekit.models import ModelConfig
    from moekit.models.vision.llava import MoELLaVA, VLMConfig
    from moekit.surgery.llava import moe_llava_layers, upcycle_vlm

    torch.manual_seed(0)
    vision = ViTConfig(
        dim=16, num_layers=3, num_heads=2, ffn_dim=24, image_size=8, patch_size=4, num_channels=3,
        patch_bias=False, pre_norm=True, activation="quick_gelu",
    )  # fmt: skip
    text = ModelConfig(vocab_size=40, dim=16, num_layers=4, num_heads=2, num_kv_heads=1, ffn_dim=24, moe=None)
    vlm = MoELLaVA(VLMConfig(vision=vision, text=text, image_token_id=39))
    with torch.no_grad():
        for p in vlm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    up = moe_llava_layers(4).replace(layers="all", layer_indices=None, router_init="random", router_std=0.5)
    moe = upcycle_vlm(vlm, up)  # every layer MoE: Mixtral can express it
    with torch.no_grad():
        for layer in moe.language_model.moe_layers:  # experts no longer copies
            layer.experts.w_in.add_(torch.randn_like(layer.experts.w_in) * 0.05)
    save_llava_hf(moe, tmp_path / "hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.text_config.model_type == "mixtral"
    ids = torch.tensor([[1, 39, 39, 39, 39, 5, 6], [0, 0, 39, 39, 39, 39, 7]])  # left padding in row 1
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    px = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits[mask.bool()]
        feats_hf = hf.model.get_image_features(pixel_values=px)
        feats_hf = feats_hf.pooler_output if hasattr(feats_hf, "pooler_output") else feats_hf
        feats_hf = torch.cat(list(feats_hf)) if isinstance(feats_hf, (list, tuple)) else feats_hf
        assert (feats_hf.reshape(-1, 16) - moe.image_features(px).reshape(-1, 16)).abs().max() < 1e-5
        assert (
            want - moe(input_ids=ids, pixel_values=px, attention_mask=mask).logits[mask.bool()]
        ).abs().max() < 1e-5
        back = moekit.from_pretrained(tmp_path / "hf")
        assert isinstance(back, MoELLaVA) and back.language_model.config.moe_layer_ids == [0, 1, 2, 3]
        got = back(input_ids=ids, pixel_values=px, attention_mask=mask).logits[mask.bool()]
    assert (want - got).abs().max() < 1e-5
