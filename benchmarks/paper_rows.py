"""Rows of docs/papers.md: each paper's claim measured on a model trained here (CPU, about a minute).

    python benchmarks/paper_rows.py smoe     # SMoE-Dropout: loss against k at inference
    python benchmarks/paper_rows.py topp     # top-p: experts per token against token difficulty
    python benchmarks/paper_rows.py aki      # AquilaMoE: FPI vs AKI vs AKI-Pro scale-up (paper_rows_growth.py)
    python benchmarks/paper_rows.py scmoe    # SCMoE vs greedy, exact match on addition (paper_rows_trained.py)
    python benchmarks/paper_rows.py moepp    # MoE++ vs vanilla MoE: loss, MoE-layer time (paper_rows_trained.py)
    python benchmarks/paper_rows.py moetuner # MoETuner ILP placement vs round-robin (paper_rows_trained.py)
    python benchmarks/paper_rows.py prune    # multitask paper: prune 8 -> 4 by usage vs random (paper_rows_compress.py)
    python benchmarks/paper_rows.py prmoe    # PR-MoE pyramid vs standard MoE (paper_rows_compress.py)
    python benchmarks/paper_rows.py mcmoe    # MC-MoE: MILP vs uniform vs random bits, ODP (paper_rows_compress.py)
    python benchmarks/paper_rows.py edgemoe  # EdgeMoE: eviction hit rates, predictor accuracy (paper_rows_compress.py)
    python benchmarks/paper_rows.py edgemoe-tolerance  # EdgeMoE: bit-width search, size vs loss (same file)
    python benchmarks/paper_rows.py moextend # MoExtend: layer choice by router tuning vs data shift vs all (paper_rows_compress.py)

``smoe``: two byte-level MoE LMs (dim 64, 2 layers, 8 experts of width 32) on the Python stdlib
source, trained for the same steps and tokens through the one engine (``moekit.train.fit``):
(i) SMoE-Dropout: the frozen random router (``router_type="random_fixed"``) with k growing
linearly from 2 to 8 (``KSchedule``); (ii) a learned top-2 router. Both are then evaluated on
held-out windows at k = 1, 2, 4, 8 (``moe_k``). The paper's claim: SMoE-Dropout's loss falls
monotonically as k grows, while a learned top-k router does not gain beyond its training k.

``topp``: a top-p MoE (p = 0.4, 8 experts, entropy loss 1e-4, balance loss 0.01) and a dense model
of the same width are trained on the same bytes; held-out tokens are split into quartiles of the
*dense* model's loss on them (difficulty measured independently of the MoE), and the mean number
of experts the top-p routers gave each quartile is reported (mean over MoE layers). The paper's
claim: harder tokens get more experts.
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


def _data(steps: int, seed: int):
    docs = resolve_corpus(None, max_bytes=1_500_000)
    train_docs, val_docs = split_documents(docs, 0.05)
    sampler = WindowSampler(_stream(train_docs), SEQ, BATCH, seed)
    return [sampler.next_batch() for _ in range(steps)], eval_batches(_stream(val_docs), SEQ, BATCH, 8)


def _train(model: MoEForCausalLM, train: list, steps: int) -> None:
    loop = LoopConfig(
        max_steps=steps,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=steps // 10,
        expert_bias_update=False,
        deterministic=False,
    )
    objective = CausalLMObjective(LossWeights.from_model_config(model.config))
    fit(model, objective, BatchListDataModule(train), loop, None, progress=False, dist_context=None)
    model.eval()


def topp(steps: int, seed: int) -> None:
    train, val = _data(steps, seed)
    torch.manual_seed(seed)
    moe = MoEConfig(dim=64, ffn_dim=32, num_experts=8, top_k=2, router_type="top_p", top_p=0.4)
    base = dict(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64)
    topp_model = MoEForCausalLM(ModelConfig(**base, moe=moe, aux_loss_coef=0.01, entropy_loss_coef=1e-4))
    torch.manual_seed(seed)
    dense = MoEForCausalLM(ModelConfig(**base, moe=None, moe_placement="none", aux_loss_coef=0.0))
    t0 = time.perf_counter()
    _train(topp_model, train, steps)
    _train(dense, train, steps)
    difficulty, experts = [], []
    with torch.no_grad():
        for b in val:
            logits = dense(b[:, :-1]).logits
            difficulty.append(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="none")
            )
            routing = topp_model(b[:, :-1]).routing
            experts.append(torch.stack([(r.expert_ids >= 0).sum(-1).float() for r in routing]).mean(0))
    difficulty_T, experts_T = torch.cat(difficulty), torch.cat(experts)
    edges = torch.quantile(difficulty_T, torch.tensor([0.25, 0.5, 0.75]))
    bucket_T = torch.bucketize(difficulty_T, edges)
    print(
        f"steps {steps} x {BATCH} x {SEQ} bytes each, {difficulty_T.numel()} held-out tokens, seed {seed}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print("| dense-loss quartile | mean dense loss (nats) | mean experts per token (top-p) |")
    print("|---|---|---|")
    for q in range(4):
        sel = bucket_T == q
        print(f"| Q{q + 1} | {float(difficulty_T[sel].mean()):.3f} | {float(experts_T[sel].mean()):.3f} |")
    corr = torch.corrcoef(torch.stack([difficulty_T, experts_T]))[0, 1]
    print(
        f"overall mean experts per token {float(experts_T.mean()):.3f}; Pearson r(dense loss, experts) {float(corr):.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "what",
        choices=[
            "smoe",
            "topp",
            "aki",
            "scmoe",
            "moepp",
            "moetuner",
            "prune",
            "prmoe",
            "mcmoe",
            "edgemoe",
            "edgemoe-tolerance",
            "moextend",
        ],
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pre-steps", type=int, default=300, help="aki: steps of the small dense model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", type=int, default=2, help="scmoe: digits of each operand")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.what == "smoe":
        smoe(args.steps, args.seed)
    elif args.what == "topp":
        topp(args.steps, args.seed)
    elif args.what == "aki":
        from paper_rows_growth import aki

        aki(args.pre_steps, args.steps, args.seed)
    elif args.what == "scmoe":
        from paper_rows_trained import scmoe

        scmoe(args.steps, args.seed, args.digits)
    elif args.what in ("prune", "prmoe", "mcmoe", "edgemoe", "edgemoe-tolerance", "moextend"):
        import paper_rows_compress

        getattr(paper_rows_compress, args.what.replace("-", "_"))(args.steps, args.seed)
    else:
        import paper_rows_trained

        getattr(paper_rows_trained, args.what)(args.steps, args.seed)


if __name__ == "__main__":
    main()
