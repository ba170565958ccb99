"""MoE-LLaVA's stage 3: upcycle the VLM's language model (the paper's sparse layers: every other
layer starting at layer 0), keeping the vision tower and projector as they are; and the three
stages run end to end on generated image VQA (:func:`train_moe_llava`), with a dense control that
spends stage 3 on the same layers' dense FFNs instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.config import JsonConfig
from moekit.models.vision.llava import MoELLaVA
from moekit.surgery.upcycle import UpcycleConfig, upcycle


def moe_llava_layers(num_layers: int) -> UpcycleConfig:
    """MoE-LLaVA's default placement: layers 0, 2, 4, ... (4 experts, top-2, copied FFNs)."""
    return UpcycleConfig(
        layers="explicit", layer_indices=tuple(range(0, num_layers, 2)), num_experts=4, top_k=2
    )


@torch.no_grad()
def upcycle_vlm(vlm: MoELLaVA, config: UpcycleConfig) -> MoELLaVA:
    """A new :class:`MoELLaVA` whose LM is ``upcycle(vlm.language_model, config)``; ``vlm`` is unchanged.

    With ``expert_init="copy"`` (and the defaults) the result equals ``vlm`` at init.
    """
    lm = upcycle(vlm.language_model, config)
    new_cfg = vlm.config.replace(text=lm.config)
    with torch.random.fork_rng(devices=[]):
        model = MoELLaVA(new_cfg).to(next(vlm.parameters()).dtype)
    model.vision_tower.load_state_dict(vlm.vision_tower.state_dict())
    model.projector.load_state_dict(vlm.projector.state_dict())
    model.language_model.load_state_dict(lm.state_dict())
    return model.eval()


def fit_vqa_stage(model, data, steps: int, lr: float, freeze: list[str], out_dir: Path | None, aux: float):
    """One recipe stage through :func:`moekit.train.fit`: ``steps`` AdamW steps (no weight decay,
    so parameters without gradients stay bit-identical) on answer CE + ``aux`` x load balance,
    with exactly ``freeze`` frozen (every other parameter is made trainable first, except those
    frozen by design: the shared base of LoRA experts). ``out_dir`` None writes nothing. ``steps=0``
    skips the stage (an empty :class:`~moekit.train.FitResult`)."""
    from moekit.models.objectives import LossWeights
    from moekit.models.vision.objectives import VQAObjective
    from moekit.train import FitResult, LoopConfig, fit

    for p in model.parameters():  # each stage's freezes alone decide (the LoRA base stays frozen)
        p.requires_grad_(True)
    for m in model.modules():
        if hasattr(m, "freeze_base"):
            m.freeze_base()
    if steps == 0:  # a skipped stage: its freezes still apply, and it took no time
        from moekit.train.freeze import apply_freeze

        apply_freeze(model, freeze)
        nan = float("nan")
        return FitResult(
            0, 0, nan, nan, None, "skipped", 0, 0.0, nan, Path(out_dir or "."), Path(out_dir or "."), None
        )
    loop = LoopConfig(
        max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 20), weight_decay=0.0,
        eval_interval=max(steps, 1), log_interval=max(steps // 10, 1), save_interval=max(steps, 1),
        freeze=freeze, expert_bias_update=False,
    )  # fmt: skip
    return fit(
        model,
        VQAObjective(LossWeights(load_balance=aux)),
        data,
        loop,
        out_dir,
        progress=False,
        dist_context=None,
    )


@dataclass(kw_only=True)
class LLaVARunConfig(JsonConfig):
    """The three MoE-LLaVA stages on generated image VQA (colour, shape and count questions).

    Attributes:
        out_dir: the run folder (``stage{1,2,3}/`` and ``metrics.json``).
        moe: stage 3 upcycles layers 0, 2, ... (``num_experts``, ``top_k``) and trains their routers
            and experts; False is the dense control: stage 3 trains the same layers' dense FFNs.
        num_experts, top_k: the upcycled layers (top-1 has the dense model's active parameters).
        stage_steps, batch_size, lr, num_train, seed: the budget, data and seeds.
    """

    out_dir: str = "runs/moe-llava"
    moe: bool = True
    num_experts: int = 4
    top_k: int = 2
    stage_steps: tuple[int, int, int] = (150, 300, 200)
    batch_size: int = 32
    lr: float = 3e-3
    num_train: int = 600
    seed: int = 0

    def __post_init__(self) -> None:
        self.stage_steps = tuple(self.stage_steps)
        if len(self.stage_steps) != 3 or min(self.stage_steps) < 0:
            raise ValueError(
                f"LLaVARunConfig.stage_steps must be three step counts >= 0, got {self.stage_steps}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"LLaVARunConfig.top_k must be in [1, num_experts={self.num_experts}]")


def llava_vqa_preset(vocab_size: int, image_token_id: int):
    """The tiny VLM of the evidence: a 2-layer ViT (16x16, 4x4 patches, D=32) and a 2-layer LM
    (D=32, F=64); features from the tower's last layer, CLS dropped."""
    from moekit.models import ModelConfig
    from moekit.models.vision.config import ViTConfig
    from moekit.models.vision.llava import VLMConfig

    vision = ViTConfig(
        dim=32, num_layers=2, num_heads=4, ffn_dim=64, image_size=16, patch_size=4, num_channels=3
    )
    text = ModelConfig(vocab_size=vocab_size, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64)
    return VLMConfig(vision=vision, text=text, image_token_id=image_token_id, vision_feature_layer=-1)


def train_moe_llava(config: LLaVARunConfig) -> dict[str, Any]:
    """Stages 1 (projector), 2 (projector + LM) and 3 (upcycled MoE layers, or the dense control)
    through ``fit``; VQA accuracy after each; writes ``out_dir/metrics.json`` and returns it."""
    from moekit.data.multimodal import IMAGE_ID, VQA_VOCAB, VQA_VOCAB_SIZE, MultiModalVQADataModule
    from moekit.models.vision.llava import LLAVA_STAGE_FREEZE
    from moekit.models.vision.objectives import vqa_accuracy, vqa_accuracy_by_question

    words = {i: w for w, i in VQA_VOCAB.items()}
    from moekit.train import seed_everything

    out = Path(config.out_dir)
    seed_everything(config.seed)
    model = MoELLaVA(llava_vqa_preset(VQA_VOCAB_SIZE, IMAGE_ID))
    data = MultiModalVQADataModule(
        config.batch_size, {"image": model.config.image_seq_length}, ("image",), num_train=config.num_train,
        seed=config.seed,
    )  # fmt: skip
    metrics: dict[str, Any] = {"config": config.to_dict(), "stages": {}}

    def record(stage: str, result) -> None:
        acc, usage = vqa_accuracy(model, data.val_batches())
        by_q = vqa_accuracy_by_question(model, data.val_batches())
        metrics["stages"][stage] = {
            "val_accuracy": acc,
            **{f"{words[q]}_accuracy": a for q, a in by_q.items()},
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "num_params": model.language_model.num_parameters(),
            "num_active_params": model.language_model.num_parameters(active_only=True),
            "elapsed_s": result.elapsed_s,
            **({"expert_share": [round(u, 3) for u in usage]} if usage else {}),
        }

    s1, s2, s3 = config.stage_steps
    record("1", fit_vqa_stage(model, data, s1, config.lr, LLAVA_STAGE_FREEZE[1], out / "stage1", 0.0))
    record("2", fit_vqa_stage(model, data, s2, config.lr, LLAVA_STAGE_FREEZE[2], out / "stage2", 0.0))
    layers = moe_llava_layers(model.config.text.num_layers)
    if config.moe:
        up = layers.replace(num_experts=config.num_experts, top_k=config.top_k, seed=config.seed)
        model = upcycle_vlm(model, up).train()
        freeze = LLAVA_STAGE_FREEZE[3]
    else:  # the same layers' dense FFNs train instead of their experts
        keep = "|".join(str(i) for i in layers.layer_indices or ())
        freeze = ["vision_tower", "projector", f"re:^language_model\\.(?!layers\\.({keep})\\.mlp\\.)"]
    record(
        "3", fit_vqa_stage(model, data, s3, config.lr, freeze, out / "stage3", 0.01 if config.moe else 0.0)
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
