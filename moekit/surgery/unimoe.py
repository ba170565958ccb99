"""Uni-MoE's progressive recipe on moekit's one layer and one engine (:func:`moekit.train.fit`).

1. **Connectors** (cross-modality alignment): only the image and signal connectors train;
   encoders and the dense LM are frozen.
2. **Modality-specific experts**: the LM's FFNs become MoE layers of LoRA experts over the frozen
   dense FFN (:meth:`UpcycleConfig.lora`, equal to the dense LM at init); for each modality m,
   expert m's adapters train on modality m's data alone, routing forced to expert m
   (:class:`ForcedExpert`). Uni-MoE's paper fine-tunes a full FFN copy per modality here and puts
   LoRA on those copies in stage 3; moekit keeps one frozen base, so each modality's expert is
   its adapter set and the trainable budget stays low-rank throughout.
3. **Joint LoRA-expert tuning**: the adapters, the routers and the connectors train on both
   modalities (the paper's stage 3 also trains the router and the connectors fully).

``expert_kind="ffn"`` is the control: full experts of width ``f`` (chosen so that they have as
many trainable parameters as the LoRA experts) beside the frozen dense FFN as a shared expert,
their down projection zero so the model also starts equal to the dense LM.

Shape legend: T = tokens, D = model width, E = experts.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moekit.config import JsonConfig, check_choice
from moekit.layers import MoEConfig, RouterOutput
from moekit.models.vision.unimoe import UNIMOE_STAGE_FREEZE, UniMoE, UniMoEConfig
from moekit.surgery.llava import fit_vqa_stage
from moekit.surgery.upcycle import UpcycleConfig, upcycle

EXPERT_KINDS = ("lora", "ffn")


class ForcedExpert:
    """A routing override sending every token to one expert with weight 1 (stage 2)."""

    def __init__(self, expert: int) -> None:
        self.expert = expert

    def __call__(self, router, x_TD: Tensor, token_mask_T, prev_logits_TE, k) -> RouterOutput:
        """Every token -> ``expert``; logits are the router's (for statistics only)."""
        with torch.no_grad():
            logits_TE = router.project(x_TD)
        ids_T1 = torch.full((x_TD.shape[0], 1), self.expert, dtype=torch.long, device=x_TD.device)
        if token_mask_T is not None:
            ids_T1 = torch.where(token_mask_T[:, None], ids_T1, -1)
        weights_T1 = (ids_T1 >= 0).to(logits_TE.dtype)
        return RouterOutput(ids_T1, weights_T1, logits_TE, torch.softmax(logits_TE.float(), -1), ids_T1)


@contextlib.contextmanager
def forced_expert(model: UniMoE, expert: int):
    """Within the block every MoE layer of the LM routes all tokens to ``expert``."""
    with contextlib.ExitStack() as stack:
        for mlp in model.language_model.moe_layers:
            stack.enter_context(mlp.override_routing(ForcedExpert(expert)))
        yield


def unimoe_preset(vocab_size: int, image_token_id: int, signal_token_id: int) -> UniMoEConfig:
    """The tiny Uni-MoE of the evidence: a 2-layer ViT (16x16, 4x4 patches), a 1-layer signal
    encoder (32 samples, patches of 4) and a 2-layer dense LM (D=32, F=64, SwiGLU)."""
    from moekit.models import ModelConfig
    from moekit.models.vision.config import ViTConfig
    from moekit.models.vision.unimoe import SignalEncoderConfig

    vision = ViTConfig(
        dim=32, num_layers=2, num_heads=4, ffn_dim=64, image_size=16, patch_size=4, num_channels=3
    )
    signal = SignalEncoderConfig(dim=32, num_layers=1, num_heads=4, ffn_dim=64, length=32, patch_len=4)
    text = ModelConfig(vocab_size=vocab_size, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64)
    return UniMoEConfig(
        vision=vision,
        signal=signal,
        text=text,
        image_token_id=image_token_id,
        signal_token_id=signal_token_id,
    )


def lora_params_per_expert(dim: int, ffn_dim: int, rank: int, activation: str = "swiglu") -> int:
    """Adapter parameters of one LoRA expert: ``r (D + F)`` per projection."""
    num_proj = 3 if activation in ("swiglu", "swiglu_clamped") else 2
    return num_proj * rank * (dim + ffn_dim)


def equal_budget_ffn_dim(dim: int, ffn_dim: int, rank: int, activation: str = "swiglu") -> int:
    """f such that a full expert of width f has a LoRA expert's trainable parameters (rounded down)."""
    num_proj = 3 if activation in ("swiglu", "swiglu_clamped") else 2
    return max(1, lora_params_per_expert(dim, ffn_dim, rank, activation) // (num_proj * dim))


@torch.no_grad()
def upcycle_unimoe(model: UniMoE, config: UpcycleConfig, full_ffn_dim: int = 0) -> UniMoE:
    """A new :class:`UniMoE` with the LM upcycled; encoders and connectors copied.

    ``config.moe_overrides["expert_kind"] == "lora"``: LoRA experts (:meth:`UpcycleConfig.lora`).
    ``full_ffn_dim > 0``: the ``"ffn"`` control instead: the dense FFN becomes a frozen shared
    expert and ``config.num_experts`` full experts of width ``full_ffn_dim`` are added with
    ``w_out = 0``. Both equal ``model`` at init.
    """
    if full_ffn_dim:
        lm = _upcycle_beside_shared(model.language_model, config, full_ffn_dim)
    else:
        lm = upcycle(model.language_model, config)
    with torch.random.fork_rng(devices=[]):
        new = UniMoE(model.config.replace(text=lm.config)).to(next(model.parameters()).dtype)
    for name in ("vision_tower", "signal_encoder", "connectors"):
        getattr(new, name).load_state_dict(getattr(model, name).state_dict())
    new.language_model.load_state_dict(lm.state_dict())
    return new.train(model.training)


def _upcycle_beside_shared(dense, config: UpcycleConfig, width: int):
    from moekit.surgery.common import build_model, clone_state, dense_ffn, model_dtype
    from moekit.surgery.upcycle import upcycle_layer_ids

    src = dense.config
    layer_ids = upcycle_layer_ids(src, config)
    moe = MoEConfig(
        dim=src.dim, ffn_dim=width, num_experts=config.num_experts, top_k=config.top_k,
        activation=src.dense_ffn_activation, shared_ffn_dim=src.ffn_dim,
    )  # fmt: skip
    all_layers = layer_ids == list(range(src.num_layers))
    new_cfg = src.replace(
        moe=moe, moe_placement="all" if all_layers else "explicit",
        moe_layer_indices=None if all_layers else tuple(layer_ids), aux_loss_coef=config.aux_loss_coef,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(config.seed)
    state = clone_state(dense)
    h = moe.ffn_dim * (2 if moe.activation == "swiglu" else 1)
    for i in layer_ids:
        ffn, prefix = dense_ffn(dense, i), f"layers.{i}.mlp."
        for k in [k for k in state if k.startswith(prefix)]:
            del state[k]
        state[prefix + "shared.w_in.weight"] = ffn.w_in.weight.clone()
        state[prefix + "shared.w_out.weight"] = ffn.w_out.weight.clone()
        std = src.initializer_range
        state[prefix + "experts.w_in"] = torch.randn(config.num_experts, h, src.dim, generator=gen) * std
        state[prefix + "experts.w_out"] = torch.zeros(config.num_experts, src.dim, width)
        state[prefix + "router.weight"] = (
            torch.randn(config.num_experts, src.dim, generator=gen) * config.router_std
        )
    model = build_model(new_cfg, state, model_dtype(dense))
    return model


@dataclass(kw_only=True)
class UniMoERunConfig(JsonConfig):
    """One run of the progressive recipe.

    Attributes:
        out_dir: the run folder (``stage{1,2,3}/`` engine folders and ``metrics.json``).
        expert_kind: ``"lora"`` (Uni-MoE) or ``"ffn"`` (full experts at the same trainable budget).
        num_experts, top_k: the MoE layers (``num_experts`` >= 2: one per modality, then general ones).
        lora_rank, lora_alpha: the adapters.
        stage_steps: optimizer steps of stages 1, 2 (per modality) and 3.
        batch_size, lr: per-stage batches and peak learning rate.
        num_train: generated items per modality.
        seed: seeds the model, the data and the batch order.
    """

    out_dir: str = "runs/unimoe"
    expert_kind: str = "lora"
    num_experts: int = 4
    top_k: int = 2
    lora_rank: int = 4
    lora_alpha: float = 8.0
    stage_steps: tuple[int, int, int] = (150, 100, 200)
    batch_size: int = 32
    lr: float = 3e-3
    num_train: int = 600
    seed: int = 0

    def __post_init__(self) -> None:
        name = "UniMoERunConfig"
        check_choice(name, "expert_kind", self.expert_kind, EXPERT_KINDS)
        self.stage_steps = tuple(self.stage_steps)
        if len(self.stage_steps) != 3 or min(self.stage_steps) < 0:
            raise ValueError(f"{name}.stage_steps must be three step counts >= 0, got {self.stage_steps}")
        if not self.num_experts >= 2 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"{name}: need num_experts >= 2 (one per modality) and 1 <= top_k <= num_experts"
            )
        for f in ("batch_size", "num_train", "lora_rank"):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")


def evaluate_unimoe(model: UniMoE, data) -> dict[str, Any]:
    """VQA accuracy per modality and, for MoE, each modality's share of routed slots per expert."""
    from moekit.data.multimodal import VQA_VOCAB
    from moekit.models.vision.objectives import vqa_accuracy, vqa_accuracy_by_question

    words = {i: w for w, i in VQA_VOCAB.items()}

    out: dict[str, Any] = {}
    for m in data.modalities:
        batches = data.modality_val_batches(m)
        acc, usage = vqa_accuracy(model, batches)
        out[f"{m}_accuracy"] = acc
        if usage is not None:
            out[f"{m}_expert_share"] = [round(u, 3) for u in usage]
        out.update({f"{words[q]}_accuracy": a for q, a in vqa_accuracy_by_question(model, batches).items()})
    return out


def train_unimoe(config: UniMoERunConfig) -> dict[str, Any]:
    """Runs stages 1-3 through ``fit`` and writes ``out_dir/metrics.json``; returns the metrics
    (per-stage accuracies, trainable parameter counts, elapsed seconds)."""
    from moekit.data.multimodal import (
        IMAGE_ID,
        MODALITIES,
        SIGNAL_ID,
        VQA_VOCAB_SIZE,
        MultiModalVQADataModule,
    )  # fmt: skip
    from moekit.train import seed_everything

    out = Path(config.out_dir)
    seed_everything(config.seed)
    model = UniMoE(unimoe_preset(VQA_VOCAB_SIZE, IMAGE_ID, SIGNAL_ID))
    places = model.config.num_placeholders

    def data(mods=MODALITIES):
        return MultiModalVQADataModule(
            config.batch_size, places, mods, num_train=config.num_train, seed=config.seed
        )

    metrics: dict[str, Any] = {"config": config.to_dict(), "stages": {}}
    both = data()
    s1, s2, s3 = config.stage_steps
    r1 = fit_vqa_stage(model, both, s1, config.lr, UNIMOE_STAGE_FREEZE[1], out / "stage1", 0.0)
    metrics["stages"]["1"] = {
        "trainable": _count(model),
        **evaluate_unimoe(model, both),
        "elapsed_s": r1.elapsed_s,
    }

    text = model.config.text
    if config.expert_kind == "lora":
        up = UpcycleConfig.lora(
            config.num_experts, config.lora_rank, config.lora_alpha, top_k=config.top_k, seed=config.seed
        )
        model, width = upcycle_unimoe(model, up), 0
    else:
        width = equal_budget_ffn_dim(text.dim, text.ffn_dim, config.lora_rank)
        up = UpcycleConfig(num_experts=config.num_experts, top_k=config.top_k, seed=config.seed)
        model = upcycle_unimoe(model, up, full_ffn_dim=width)
    model.train()
    elapsed = 0.0
    for e, m in enumerate(MODALITIES):
        with forced_expert(model, e):
            r2 = fit_vqa_stage(
                model, data((m,)), s2, config.lr, UNIMOE_STAGE_FREEZE[2], out / f"stage2-{m}", 0.0
            )
        elapsed += r2.elapsed_s
    metrics["stages"]["2"] = {
        "trainable": _count(model),
        **evaluate_unimoe(model, both),
        "elapsed_s": elapsed,
    }
    r3 = fit_vqa_stage(model, both, s3, config.lr, UNIMOE_STAGE_FREEZE[3], out / "stage3", 0.01)
    metrics["stages"]["3"] = {
        "trainable": _count(model),
        **evaluate_unimoe(model, both),
        "elapsed_s": r3.elapsed_s,
    }
    metrics["full_expert_ffn_dim"] = width
    metrics["trainable_expert_params"] = sum(
        p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n and p.requires_grad
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
