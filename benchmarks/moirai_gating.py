"""Moirai-MoE: token-cluster (centroid) gating against a learned router, same data, same steps.

Usage (CPU, one thread; about a minute at the defaults)::

    PYTHONPATH=. .venv/bin/python benchmarks/moirai_gating.py [--steps 300] [--seed 0]

Protocol (the paper's recipe, shrunk):
1. train the dense twin for ``--steps`` steps on the built-in pretraining data;
2. k-means its FFN inputs (``moekit.layers.fit_centroids``) into the centroid MoE's centroids;
3. train, from the same initial seed and for the same steps: the centroid MoE (no aux loss, as
   Moirai-MoE), a learned router with no aux loss, and a learned router with load balance 0.01.
Reported per model: validation NLL (held-out synthetic series, fixed windows), CRPS of 2-patch
forecasts of the held-out synthetic series and of the zero-shot real series (statsmodels'
co2, elec_equip, elnino, nile, sunspots) relative to SeasonalNaive's, expert load max/mean.
Results are printed as JSON lines and appended to ``benchmarks/results/moirai_gating.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from moekit.layers import MoEConfig, fit_centroids
from moekit.models.moirai import MoiraiMoEConfig, MoiraiMoEModel
from moekit.models.moirai_train import MoiraiDataModule, MoiraiForecaster, MoiraiObjective, builtin_series
from moekit.models.objectives import LossWeights
from moekit.timeseries import (
    SEASON_LENGTH,
    SyntheticConfig,
    crps_from_samples,
    generate_synthetic,
    load_builtin,
)
from moekit.train.engine import LoopConfig, fit, seed_everything

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "moirai_gating.jsonl"


def config(router_type: str | None, patch: int, context: int) -> MoiraiMoEConfig:
    """D=64, 2 layers, 4 heads of 16; 8 experts top-2 (F=64) or the dense twin (F=128)."""
    kw = dict(router_type=router_type)
    if router_type == "topk":
        kw["softmax_order"] = "after_topk"  # the same weight form as the centroid gate
    moe = MoEConfig(dim=64, ffn_dim=64, num_experts=8, top_k=2, **kw) if router_type else None
    cfg = MoiraiMoEConfig(
        patch_size=patch,
        dim=64,
        num_layers=2,
        num_heads=4,
        head_dim=16,
        ffn_dim=128,
        moe=moe,
        max_patches=context,
    )
    return cfg


def crps_ratio(model, series, seasons, horizon, num_samples, seed) -> float:
    """Geometric mean over series of CRPS(model) / CRPS(SeasonalNaive) on the last ``horizon`` values."""
    hist = [s.head(len(s) - horizon) for s in series]
    actual = np.stack([s.values[-horizon:] for s in series])
    samples = MoiraiForecaster(model, num_samples=num_samples, seed=seed).sample(hist, horizon)
    ours = crps_from_samples(actual, samples)
    snaive = np.stack([np.resize(h.values[-m:], horizon) for h, m in zip(hist, seasons)])
    base = crps_from_samples(actual, snaive[:, None, :])
    keep = base > 0
    return float(np.exp(np.mean(np.log(ours[keep] / base[keep]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-synthetic", type=int, default=128)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--context", type=int, default=16, help="context patches")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    P, C = args.patch, args.context

    train_series, held_out = builtin_series(args.num_synthetic, 0.1, args.seed)

    def data(seed: int) -> MoiraiDataModule:
        return MoiraiDataModule(
            train_series, held_out, patch_size=P, context_patches=C, batch_size=args.batch_size,
            num_val_batches=4, seed=seed,
        )  # fmt: skip

    loop = LoopConfig(
        max_steps=args.steps, lr=2e-3, min_lr=2e-4, warmup_steps=20, eval_interval=args.steps, log_interval=50,
        save_interval=args.steps,
    )  # fmt: skip
    synth = generate_synthetic(SyntheticConfig(num_series=args.num_synthetic, seed=args.seed))
    num_val = max(1, round(0.1 * args.num_synthetic))
    val_series = synth.series[-num_val:]
    val_seasons = [int(p) for p in synth.periods[-num_val:]]
    real = load_builtin("holdout")
    real_seasons = [max(SEASON_LENGTH[s.unique_id], 1) for s in real]
    horizon = 2 * P

    def run(name: str, cfg: MoiraiMoEConfig, weights: LossWeights, init=None) -> MoiraiMoEModel:
        seed_everything(args.seed)
        model = MoiraiMoEModel(cfg)
        if init is not None:
            model = init(model)
        t0 = time.perf_counter()
        result = fit(
            model, MoiraiObjective(weights), data(args.seed), loop, None, progress=False, device="cpu"
        )
        elapsed = time.perf_counter() - t0
        model.eval()
        loads = []
        with torch.no_grad():
            batch = data(args.seed).val_batches()[0]
            for info in model(batch["values"], batch["observed"]).routing:
                tpe = info.tokens_per_expert
                loads.append(round(float(tpe.max() / tpe.mean()), 2))
        record = {
            "model": name,
            "steps": result.step,
            "train_s": round(elapsed, 1),
            "val_nll": round(result.val_loss, 4),
            "crps_rel_snaive_val": round(crps_ratio(model, val_series, val_seasons, horizon, 50, 0), 4),
            "crps_rel_snaive_holdout": round(crps_ratio(model, real, real_seasons, horizon, 50, 0), 4),
            "max_over_mean_load": loads,
            "params": model.num_parameters(),
            "active_params": model.num_parameters(active_only=True),
            "seed": args.seed,
        }
        print(json.dumps(record), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return model

    dense = run("dense_twin", config(None, P, C), LossWeights())
    # k-means over the dense model's FFN inputs on fresh training windows (another data seed).
    source = data(args.seed + 1)
    batches = [source.next_train_batch() for _ in range(8)]

    def with_centroids(model: MoiraiMoEModel) -> MoiraiMoEModel:
        return fit_centroids(model, batches, source=dense, seed=args.seed)

    run("centroid", config("centroid", P, C), LossWeights(), init=with_centroids)
    run("learned", config("topk", P, C), LossWeights())
    run("learned_lb0.01", config("topk", P, C), LossWeights(load_balance=0.01))


if __name__ == "__main__":
    main()
