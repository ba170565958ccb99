"""Rows of docs/papers.md: each paper's claim measured on a model trained here (CPU, about a minute).

    python benchmarks/paper_rows.py smoe     # SMoE-Dropout: loss against k at inference

``smoe``: two byte-level MoE LMs (dim 64, 2 layers, 8 experts of width 32) on the Python stdlib
source, trained for the same steps and tokens through the one engine (``moekit.train.fit``):
(i) SMoE-Dropout: the frozen random router (``router_type="random_fixed"``) with k growing
linearly from 2 to 8 (``KSchedule``); (ii) a learned top-2 router. Both are then evaluated on
held-out windows at k = 1, 2, 4, 8 (``moe_k``). The paper's claim: SMoE-Dropout's loss falls
monotonically as k grows, while a learned top-k router does not gain beyond its training k.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moekit.data import (
    BatchListDataModule,
    WindowSampler,
    eval_batches,
    read_text,
    resolve_corpus,
    split_documents,
)
from moekit.layers import MoEConfig
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.models.objectives import CausalLMObjective, LossWeights
from moekit.train import KSchedule, LoopConfig, fit

SEQ, BATCH = 64, 16


def _stream(docs) -> np.ndarray:
    text = "\n".join(read_text(d) for d in docs).encode("utf-8", "replace")
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64)


def _model(router_type: str, seed: int) -> MoEForCausalLM:
    torch.manual_seed(seed)
    moe = MoEConfig(dim=64, ffn_dim=32, num_experts=8, top_k=2, router_type=router_type)
    cfg = ModelConfig(
        vocab_size=256,
        dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=64,
        moe=moe,
        aux_loss_coef=0.0 if router_type == "random_fixed" else 0.01,
    )
    return MoEForCausalLM(cfg)


def smoe(steps: int, seed: int) -> None:
    docs = resolve_corpus(None, max_bytes=1_500_000)
    train_docs, val_docs = split_documents(docs, 0.05)
    sampler = WindowSampler(_stream(train_docs), SEQ, BATCH, seed)
    train = [sampler.next_batch() for _ in range(steps)]
    val = eval_batches(_stream(val_docs), SEQ, BATCH, 8)
    rows = {}
    for name, router, sched in (
        (
            "SMoE-Dropout (frozen random router, k 2 -> 8)",
            "random_fixed",
            KSchedule(type="linear", k_min=2, k_max=8),
        ),
        ("learned top-2 router", "topk", None),
    ):
        model = _model(router, seed)
        loop = LoopConfig(
            max_steps=steps,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=steps // 10,
            k_schedule=sched,
            expert_bias_update=False,
            deterministic=False,
        )
        t0 = time.perf_counter()
        fit(
            model,
            CausalLMObjective(LossWeights.from_model_config(model.config)),
            BatchListDataModule(train),
            loop,
            None,
            progress=False,
            dist_context=None,
        )
        model.eval()
        losses = {}
        for k in (1, 2, 4, 8):
            with torch.no_grad():
                total = count = 0.0
                for b in val:
                    out = model(b[:, :-1], moe_k=k).logits
                    total += float(
                        torch.nn.functional.cross_entropy(
                            out.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"
                        )
                    )
                    count += b[:, 1:].numel()
            losses[k] = total / count
        rows[name] = (losses, time.perf_counter() - t0)
    print(f"steps {steps} x {BATCH} x {SEQ} bytes, validation 8 x {BATCH} windows, seed {seed}")
    print("| model | k=1 | k=2 | k=4 | k=8 | seconds |")
    print("|---|---|---|---|---|---|")
    for name, (losses, sec) in rows.items():
        print(f"| {name} | " + " | ".join(f"{losses[k]:.4f}" for k in (1, 2, 4, 8)) + f" | {sec:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["smoe"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.what == "smoe":
        smoe(args.steps, args.seed)


if __name__ == "__main__":
    main()
