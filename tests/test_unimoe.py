"""Uni-MoE: modality splicing, the upcycled model equal to its dense parent (LoRA experts and the
full-expert control), exactly which parameters each stage trains through ``fit`` (stage 2 only
the modality's own expert), the generated VQA data, and the ``vision-train --recipe unimoe`` CLI."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.data.multimodal import (
    IMAGE_ID,
    QUESTIONS,
    SIGNAL_ID,
    VQA_VOCAB,
    VQA_VOCAB_SIZE,
    MultiModalVQADataModule,
    make_signals,
)
from moekit.models.vision.unimoe import UNIMOE_STAGE_FREEZE, UniMoE, unimoe_stage_trainable
from moekit.surgery import UpcycleConfig, changed_tensors, snapshot
from moekit.surgery.llava import fit_vqa_stage
from moekit.surgery.unimoe import (
    equal_budget_ffn_dim,
    forced_expert,
    lora_params_per_expert,
    unimoe_preset,
    upcycle_unimoe,
)

torch.set_num_threads(1)


def dense_model(dtype=torch.float32) -> UniMoE:
    torch.manual_seed(0)
    return UniMoE(unimoe_preset(VQA_VOCAB_SIZE, IMAGE_ID, SIGNAL_ID)).to(dtype)


def data(model: UniMoE, mods=("image", "signal"), batch_size: int = 4) -> MultiModalVQADataModule:
    return MultiModalVQADataModule(batch_size, model.config.num_placeholders, mods, num_train=12, num_val=6)


def mixed_batch(model: UniMoE) -> dict[str, torch.Tensor]:
    d = data(model)
    img, sig = d.next_train_batch(), d.next_train_batch()
    width = img["input_ids"].shape[1]
    pad = width - sig["input_ids"].shape[1]
    sig_ids = torch.cat([torch.zeros(4, pad, dtype=torch.long), sig["input_ids"]], 1)  # left padding
    mask = torch.cat([torch.ones(4, width, dtype=torch.long), (sig_ids != 0).long()])
    return {
        "input_ids": torch.cat([img["input_ids"], sig_ids]),
        "attention_mask": mask,
        "pixel_values": img["pixel_values"],
        "signal_values": sig["signal_values"],
        "img": img,
        "sig": sig,
    }


def test_mixed_batch_rows_equal_each_modality_alone():
    model = dense_model(torch.float64).eval()
    b = mixed_batch(model)
    both = model(b["input_ids"], b["pixel_values"].double(), b["signal_values"].double(), b["attention_mask"])
    img = model(b["img"]["input_ids"], pixel_values=b["pixel_values"].double()).logits
    sig = model(b["sig"]["input_ids"], signal_values=b["signal_values"].double()).logits
    torch.testing.assert_close(both.logits[:4], img, rtol=0, atol=1e-10)
    width = b["sig"]["input_ids"].shape[1]
    torch.testing.assert_close(both.logits[4:, -width:], sig, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="signal_values has shape"):
        model(b["sig"]["input_ids"], signal_values=torch.zeros(4, 31, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["lora", "ffn"])
def test_upcycled_unimoe_equals_its_dense_parent_at_init(kind):
    dense = dense_model(torch.float64).eval()
    text = dense.config.text
    if kind == "lora":
        moe = upcycle_unimoe(dense, UpcycleConfig.lora(4, rank=4, alpha=8.0))
    else:
        moe = upcycle_unimoe(
            dense, UpcycleConfig(num_experts=4), full_ffn_dim=equal_budget_ffn_dim(32, 64, 4)
        )
    assert moe.config.text.num_moe_layers == text.num_layers
    b = mixed_batch(dense)
    args = (b["input_ids"], b["pixel_values"].double(), b["signal_values"].double(), b["attention_mask"])
    real = b["attention_mask"].bool()  # padding rows skip an MoE layer's routed experts
    torch.testing.assert_close(moe(*args).logits[real], dense(*args).logits[real], rtol=0, atol=1e-12)
    trainable = sum(p.numel() for n, p in moe.named_parameters() if ".mlp.experts." in n and p.requires_grad)
    assert trainable == 4 * 2 * lora_params_per_expert(32, 64, 4)  # the same budget for both kinds


def expected(model: UniMoE, stage: int) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    conn = {n for n in names if n.startswith("connectors.")}
    lora = {n for n in names if ".mlp.experts.lora_" in n}
    router = {n for n in names if ".mlp.router." in n}
    return {1: conn, 2: lora, 3: lora | router | conn}[stage]


def test_each_stage_trains_exactly_its_parameters_through_fit():
    model = dense_model()
    assert set(unimoe_stage_trainable(model, 1)) == expected(model, 1)
    before = snapshot(model)
    fit_vqa_stage(model, data(model), 2, 1e-2, UNIMOE_STAGE_FREEZE[1], None, 0.0)
    assert set(changed_tensors(model, before)) == expected(model, 1)

    model = upcycle_unimoe(model, UpcycleConfig.lora(3, rank=2, alpha=4.0)).train()
    for stage in (2, 3):
        assert set(unimoe_stage_trainable(model, stage)) == expected(model, stage)
    # Stage 2, modality "signal" -> expert 1: only expert 1's adapters move (B and A, every layer).
    before = snapshot(model)
    with forced_expert(model, 1):
        out = model(
            **{k: v for k, v in data(model, ("signal",)).next_train_batch().items() if k != "modality"}
        )
        assert all(bool((r.expert_ids == 1).all()) for r in out.routing)
        fit_vqa_stage(model, data(model, ("signal",)), 2, 1e-2, UNIMOE_STAGE_FREEZE[2], None, 0.0)
    assert set(changed_tensors(model, before)) == expected(model, 2)
    for layer in model.language_model.layers:
        ex = layer.mlp.experts
        for name in ("lora_in_A", "lora_in_B", "lora_out_A", "lora_out_B"):
            now, was = (
                getattr(ex, name),
                before[f"language_model.{_layer_prefix(model, layer)}experts.{name}"],
            )
            assert torch.equal(now[[0, 2]], was[[0, 2]]) and not torch.equal(now[1], was[1])
    before = snapshot(model)
    fit_vqa_stage(model, data(model), 2, 1e-2, UNIMOE_STAGE_FREEZE[3], None, 0.01)
    assert set(changed_tensors(model, before)) == expected(model, 3)
    assert not any(
        p.requires_grad for n, p in model.named_parameters() if n.endswith(("experts.w_in", "experts.w_out"))
    )


def _layer_prefix(model: UniMoE, layer) -> str:
    index = list(model.language_model.layers).index(layer)
    return f"layers.{index}.mlp."


def test_vqa_data_answers_are_the_labels():
    sig = make_signals(30, 32, seed=3)
    assert sig["signals"].shape == (30, 32)
    # a square wave takes only two values up to noise and amplitude
    sq = sig["signals"][sig["wave"] == 1]
    assert (abs(abs(sq) - abs(sq).mean(1, keepdims=True)) < 0.5).mean() > 0.9
    d = MultiModalVQADataModule(5, {"image": 16, "signal": 8}, ("signal",), num_train=10, num_val=4)
    b = d.next_train_batch()
    q_pos, a_pos = 9, 10
    inv = {v: k for k, v in VQA_VOCAB.items()}
    for row in range(5):
        question = inv[int(b["input_ids"][row, q_pos])]
        assert QUESTIONS[question][0] == "signal"
        assert int(b["labels"][row, a_pos]) == int(b["input_ids"][row, a_pos])
    assert (b["labels"] != -100).sum() == 5
    with pytest.raises(ValueError, match="modalities"):
        MultiModalVQADataModule(4, {"image": 16}, ("audio",))


def test_cli_recipe_unimoe_help_and_tiny_run(tmp_path, capsys):
    from moekit.cli.main import main

    with pytest.raises(SystemExit):
        main(["vision-train", "--help"])
    assert "--recipe" in capsys.readouterr().out
    out = tmp_path / "u"
    rc = main(["vision-train", "--recipe", "unimoe", "--stage-steps", "1,1,1", "--batch-size", "4", "--num-train", "20",
               "--num-experts", "2", "--top-k", "1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"1", "2", "3"} and "signal_accuracy" in metrics["stages"]["3"]
    assert (out / "stage2-signal" / "train_log.jsonl").exists()
    import moekit

    assert isinstance(moekit.from_pretrained(out / "stage3" / "checkpoints" / "last"), UniMoE)
    assert main(["vision-train", "--recipe", "unimoe", "--stage-steps", "1,x", "--out", str(out)]) != 0
    skip = tmp_path / "skip"  # stage 2 skipped: its freezes apply, nothing trains, no folder
    assert main(["vision-train", "--recipe", "unimoe", "--stage-steps", "1,0,1", "--batch-size", "4", "--num-train", "20",
                 "--num-experts", "2", "--top-k", "1", "--out", str(skip)]) == 0  # fmt: skip
    stages = json.loads((skip / "metrics.json").read_text())["stages"]
    assert stages["2"]["elapsed_s"] == 0 and stages["2"]["trainable"] == 2 * 2 * lora_params_per_expert(
        32, 64, 4
    )
    assert stages["2"]["image_accuracy"] == stages["1"]["image_accuracy"]  # upcycled = dense
    assert not (skip / "stage2-signal").exists()


@pytest.mark.parametrize("dense", [False, True])
def test_cli_recipe_moe_llava_stage3_trains_the_moe_layers_or_the_dense_control(dense, tmp_path):
    from moekit.cli.main import main

    out = tmp_path / "l"
    argv = ["vision-train", "--recipe", "moe-llava", "--stage-steps", "1,1,1", "--batch-size", "4", "--num-train", "20",
            "--out", str(out)] + (["--dense-control"] if dense else [])  # fmt: skip
    assert main(argv) == 0
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    # stage 1: the projector (2 linears 32->32 with biases); stage 3: layer 0's FFN or its MoE
    assert stages["1"]["trainable"] == 2 * (32 * 32 + 32)
    ffn = 3 * 32 * 64
    assert stages["3"]["trainable"] == (ffn if dense else 4 * ffn + 4 * 32)
    assert ("expert_share" in stages["3"]) is not dense


def test_unimoe_with_lora_experts_saves_and_loads_as_a_moekit_folder(tmp_path):
    import moekit

    model = upcycle_unimoe(dense_model(torch.float64), UpcycleConfig.lora(2, rank=2, top_k=1)).eval()
    model.save_pretrained(tmp_path / "u")
    back = moekit.from_pretrained(tmp_path / "u", dtype=torch.float64)
    assert isinstance(back, UniMoE) and back.config == model.config
    b = mixed_batch(model)
    args = (b["input_ids"], b["pixel_values"].double(), b["signal_values"].double(), b["attention_mask"])
    torch.testing.assert_close(back(*args).logits, model(*args).logits, rtol=0, atol=0)
    assert not back.language_model.layers[0].mlp.experts.w_in.requires_grad
