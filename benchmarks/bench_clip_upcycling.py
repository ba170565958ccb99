"""CLIP-MoE on generated scenes: the dense parent vs copy upcycling vs diversified multiplet
upcycling (DMU), on retrieval R@1 both ways, zero-shot scene classification (the 27 distinct
captions as class prompts), expert diversity (mean pairwise cosine distance of expert weights)
and expert CKA (mean off-diagonal linear CKA of the experts' outputs on held-out tokens: 1 for
experts that compute the same function up to rotation and scale).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_clip_upcycling.py [--steps 300] [--seed 0]`` (a few minutes
on one core). Writes JSON to stdout. Copy upcycling gets the same router-only steps as DMU; a
dense model fine-tuned for as many steps as DMU's stages is the compute control. ``--seed``
seeds the generated scenes (train and validation), the initialisation, batch orders and clustering.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from moekit.analysis import expert_cka_matrix, mean_off_diagonal
from moekit.data.images import ShapesCaptionDataModule
from moekit.models.objectives import LossWeights
from moekit.models.vision import CLIPMoE, ContrastiveObjective, retrieval_r1
from moekit.models.vision.presets import vision_preset
from moekit.surgery.multiplet import MultipletConfig, fine_tune_pairs, multiplet_upcycle, upcycle_vision
from moekit.surgery.upcycle import UpcycleConfig
from moekit.train import LoopConfig, fit, seed_everything


@torch.no_grad()
def zero_shot(model: CLIPMoE, batches, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Zero-shot attribute accuracy: each validation image is matched against the distinct captions
    (class prompts); its predicted shape / colour / count is the best caption's. (Exact-caption
    accuracy this way equals image-to-text R@1, so it is not repeated.)"""
    model.eval()
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    classes, inverse = torch.unique(ids, dim=0, return_inverse=True)
    cmask = torch.zeros(len(classes), ids.shape[1], dtype=mask.dtype)
    cmask[inverse] = mask
    txt = model(input_ids=classes, attention_mask=cmask).text_embeds
    img = torch.cat([model(pixel_values=b["pixel_values"]).image_embeds for b in batches])
    best = (img @ txt.t()).argmax(-1)
    out = {}
    for name, lab in labels.items():
        class_lab = torch.zeros(len(classes), dtype=lab.dtype)
        class_lab[inverse] = lab
        out[f"zero_shot_{name}"] = float((class_lab[best] == lab).float().mean())
    return out


def diversity(model: CLIPMoE) -> float:
    """Mean over MoE layers and expert pairs of 1 - cos(w_in[i], w_in[j])."""
    vals = []
    for moe in model.moe_layers:
        w = moe.experts.w_in.detach().flatten(1)
        w = w / w.norm(dim=-1, keepdim=True)
        cos = w @ w.t()
        n = len(w)
        vals.append(float((1 - cos).sum() / (n * (n - 1))))
    return sum(vals) / max(len(vals), 1)


@torch.no_grad()
def expert_cka(model: CLIPMoE, batches) -> float:
    """Mean over MoE layers of the mean off-diagonal linear CKA between the layer's experts, each
    run on every real (unpadded) token that reaches the layer on the validation batches."""
    model.eval()
    layers = model.moe_layers
    inputs = {id(m): [] for m in layers}

    def grab(module, args, kwargs):
        x = args[0]
        mask = kwargs.get("token_mask")
        rows = x.reshape(-1, x.shape[-1])
        if mask is not None:
            rows = rows[mask.reshape(-1).to(torch.bool)]
        inputs[id(module)].append(rows)

    hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in layers]
    try:
        for b in batches:
            model(
                pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"]
            )
    finally:
        for h in hooks:
            h.remove()
    vals = [mean_off_diagonal(expert_cka_matrix(m, torch.cat(inputs[id(m)]))) for m in layers]
    return sum(vals) / max(len(vals), 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--stage-steps", type=int, default=60)
    p.add_argument("--router-steps", type=int, default=60)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.time()
    seed_everything(args.seed)
    data = ShapesCaptionDataModule(batch_size=32, num_train=1500, seed=args.seed)
    dense = CLIPMoE(vision_preset("clip-shapes-dense"))
    loop = LoopConfig(max_steps=args.steps, lr=3e-3, min_lr=3e-4, warmup_steps=15, eval_interval=args.steps)
    fit(dense, ContrastiveObjective(LossWeights()), data, loop, None, progress=False, dist_context=None)
    val = data.val_batches()
    rows = {}

    def report(name, model, extra=None):
        rows[name] = {**retrieval_r1(model, val), **zero_shot(model, val, data.val_labels), **(extra or {})}
        if model.moe_layers:
            rows[name]["expert_diversity"] = diversity(model)
            rows[name]["expert_cka"] = expert_cka(model, val)

    report("dense_parent", dense)
    up = UpcycleConfig(num_experts=args.experts, top_k=2, layers="every_other")
    # Copy upcycling with the same router-only budget DMU gets after assembly.
    copy_moe = upcycle_vision(dense, up)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(data.train["input_ids"])
    batches = []
    for _ in range(args.router_steps):
        idx = torch.randperm(n, generator=gen)[:32]
        batches.append({k: data.train[k][idx] for k in ("pixel_values", "input_ids", "attention_mask")})
    fine_tune_pairs(copy_moe, batches, args.router_steps, 1e-2, ["all_but_router"], 0.01, 0)
    report("copy_upcycled", copy_moe)
    # Dense fine-tuned with as many extra steps as DMU's stages, all parameters (compute control).
    extra = copy.deepcopy(dense)
    ft = LoopConfig(max_steps=(args.experts - 1) * args.stage_steps, lr=1e-3, min_lr=1e-4, warmup_steps=5)
    fit(extra, ContrastiveObjective(LossWeights()), data, ft, None, progress=False, dist_context=None)
    report("dense_more_steps", extra)
    for recipe in ("multiplet", "per_cluster_only"):
        cfg = MultipletConfig(
            upcycle=up, towers=("vision", "text"), recipe=recipe, stage_steps=args.stage_steps,
            router_steps=args.router_steps, stage_lr=1e-3, router_lr=1e-2, batch_size=32, seed=args.seed,
        )  # fmt: skip
        res = multiplet_upcycle(dense, cfg, dict(data.train))
        report(f"dmu_{recipe}", res.model, {"num_clusters_last": int(len(torch.unique(res.labels[-1])))})
    rows["seed"] = args.seed
    rows["elapsed_s"] = time.time() - t0
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
