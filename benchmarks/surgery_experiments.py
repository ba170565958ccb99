"""Evidence for moekit.surgery on tiny byte-level models (CPU, each part well under 3 minutes).

Corpus: the running Python's standard-library ``*.py`` source (old task), as bytes (vocabulary 256),
split into train/validation by path hash (``moekit.train.split_documents``). New task for (b): a
generated arithmetic task (``"417+86=503;"`` lines), which routes very differently from code.

(a) upcycle a briefly trained dense model (4 experts, top-2, exact copies) and continue training,
    vs continuing the dense model for the same tokens;
(b) extend the trained MoE with one new expert in the layer whose routing shifts most (MoExtend),
    train only the new expert and router row on the new task; compare with full fine-tuning;
(c) prune an 8-expert MoE to 4 experts: by token count, by gate mass, at random (3 seeds).

Run: ``.venv/bin/python benchmarks/surgery_experiments.py [--part a|b|c|all] [--steps-scale 1.0]``.
Prints one markdown table per part.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import numpy as np
import torch

from moekit.data import WindowSampler, eval_batches, read_text, resolve_corpus, split_documents
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.surgery import (
    EXTENSION_FREEZE,
    ExtendConfig,
    PruneConfig,
    UpcycleConfig,
    calibrate_new_bias,
    changed_tensors,
    extend_experts,
    lm_loss,
    prune_experts,
    routing_shift,
    snapshot,
    train_steps,
    upcycle,
)

SEQ, BATCH = 64, 16


def byte_stream(docs) -> np.ndarray:
    return np.frombuffer(
        "\n".join(read_text(d) for d in docs).encode("utf-8", "replace"), dtype=np.uint8
    ).astype(np.int64)


def code_data(max_bytes: int = 1_500_000):
    docs = resolve_corpus(None, max_bytes=max_bytes)
    train_docs, val_docs = split_documents(docs, 0.05)
    return byte_stream(train_docs), byte_stream(val_docs)


def arithmetic_data(num_lines: int, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    text = "".join(
        f"{a}+{b}={a + b};\n"
        for a, b in ((rng.randint(0, 999), rng.randint(0, 999)) for _ in range(num_lines))
    )
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)


def draw(stream: np.ndarray, steps: int, seed: int) -> list[torch.Tensor]:
    sampler = WindowSampler(stream, SEQ, BATCH, seed)
    return [sampler.next_batch() for _ in range(steps)]


def dense_model() -> MoEForCausalLM:
    cfg = ModelConfig(
        vocab_size=256,
        dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=128,
        qk_norm="per_head",
        max_position_embeddings=256,
        aux_loss_coef=0.0,
    )
    torch.manual_seed(0)
    return MoEForCausalLM(cfg)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")


def part_a(train, val, scale: float, state: dict) -> None:
    t0 = time.perf_counter()
    pre, cont = int(150 * scale), int(150 * scale)
    val_b = eval_batches(val, SEQ, BATCH, 8)
    dense = dense_model()
    train_steps(dense, draw(train, pre, 1), pre, lr=3e-3)
    base_loss = lm_loss(dense, val_b)
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, router_init="random", aux_loss_coef=0.01))
    init_gap = abs(lm_loss(moe, val_b) - base_loss)
    cont_batches = draw(train, cont, 2)
    dense_cont = copy.deepcopy(dense)
    train_steps(dense_cont, cont_batches, cont, lr=1e-3)
    train_steps(moe, cont_batches, cont, lr=1e-3)
    rows = [
        ["dense, after pre-training", pre, base_loss],
        ["dense, continued", pre + cont, lm_loss(dense_cont, val_b)],
        ["upcycled 4x top-2 at init (|gap| to dense)", pre, init_gap],
        ["upcycled 4x top-2, continued", pre + cont, lm_loss(moe, val_b)],
    ]
    table(
        f"(a) upcycling vs continuing dense ({SEQ * BATCH} tokens/step, {time.perf_counter() - t0:.0f} s)",
        ["model", "steps", "val loss (nats/byte)"],
        rows,
    )
    state["dense"], state["moe"] = dense, moe


def part_b(train, val, scale: float, state: dict) -> None:
    t0 = time.perf_counter()
    if "moe" not in state:
        part_a(train, val, scale, state)
    moe = state["moe"]
    steps = int(120 * scale)
    old_val = eval_batches(val, SEQ, BATCH, 8)
    new_stream = arithmetic_data(40_000, 0)
    new_val = eval_batches(arithmetic_data(2_000, 99), SEQ, BATCH, 4)
    new_batches = draw(new_stream, steps, 3)
    shifts = routing_shift(moe, [b[:, :-1] for b in old_val[:4]], [b[:, :-1] for b in new_val[:4]])
    old_calib = [b[:, :-1] for b in draw(train, 8, 4)]  # old-task calibration from the train split
    new_calib = [b[:, :-1] for b in new_batches[:4]]
    rows = [["trained MoE (before)", lm_loss(moe, old_val), lm_loss(moe, new_val)]]
    isolated = extend_experts(
        moe, ExtendConfig(layers="all", router_init="isolated", shift_source="data"), new_data=new_calib
    )
    rows.append(
        [
            "isolated extension (new rows -1e4), untrained",
            lm_loss(isolated, old_val),
            lm_loss(isolated, new_val),
        ]
    )
    only_new, extended = True, []
    for label, router_init in (
        ("MoExtend (copy source row)", "copy_source"),
        ("contrast row + calibrated bias", "contrast"),
    ):
        ext = extend_experts(
            moe,
            ExtendConfig(
                layers="shift",
                shift_fraction=0.5,
                router_init=router_init,
                new_bias=0.0,
                shift_source="data",  # the variant docs/surgery.md measured
                shift_metric="js",
            ),
            new_data=new_calib,
            old_data=old_calib,
        )
        extended = [i for i, layer in enumerate(ext.layers) if hasattr(layer.mlp.router, "new_weight")]
        before = snapshot(ext)
        train_steps(ext, new_batches, steps, lr=3e-3, freeze=EXTENSION_FREEZE, weight_decay=0.1)
        changed = changed_tensors(ext, before)
        only_new &= all(
            n.split(".")[-1] in ("new_w_in", "new_w_out", "new_weight", "new_bias") for n in changed
        )
        rows.append(
            [
                f"{label}, new expert + row trained ({steps} steps)",
                lm_loss(ext, old_val),
                lm_loss(ext, new_val),
            ]
        )
        cal = calibrate_new_bias(ext, old_calib, leak=0.0)
        rows.append(["  then calibrate_new_bias (leak 0)", lm_loss(cal, old_val), lm_loss(cal, new_val)])
    full = copy.deepcopy(moe)
    train_steps(full, new_batches, steps, lr=1e-3)
    rows.append(
        [f"full fine-tuning on the new task ({steps} steps)", lm_loss(full, old_val), lm_loss(full, new_val)]
    )
    table(
        f"(b) extension with a new task (JS shift per MoE layer {[round(s, 3) for s in shifts]}; extended layers "
        f"{extended}; only new params "
        f"changed: {only_new}; {time.perf_counter() - t0:.0f} s)",
        ["model", "old-task val loss", "new-task val loss"],
        rows,
    )


def part_c(train, val, scale: float, state: dict) -> None:
    t0 = time.perf_counter()
    if "dense" not in state:
        dense = dense_model()
        train_steps(dense, draw(train, int(150 * scale), 1), int(150 * scale), lr=3e-3)
        state["dense"] = dense
    steps = int(150 * scale)
    val_b = eval_batches(val, SEQ, BATCH, 8)
    calib = [b[:, :-1] for b in draw(train, 8, 7)]
    moe = upcycle(state["dense"], UpcycleConfig(num_experts=8, top_k=2, expert_init="noise", noise_std=0.05))
    train_steps(moe, draw(train, steps, 5), steps, lr=2e-3)
    rows = [["8 experts (trained)", lm_loss(moe, val_b)]]
    for metric in ("tokens", "gate_mass"):
        pruned = prune_experts(moe, PruneConfig(num_keep=4, metric=metric), calibration=calib)
        rows.append([f"4 kept by {metric}: {pruned.pruned_experts}", lm_loss(pruned, val_b)])
    rand = [
        lm_loss(prune_experts(moe, PruneConfig(num_keep=4, metric="random", seed=s)), val_b) for s in range(3)
    ]
    rows.append([f"4 kept at random (mean of 3 seeds, {min(rand):.4f}..{max(rand):.4f})", sum(rand) / 3])
    table(
        f"(c) pruning 8 -> 4 experts, no retraining ({time.perf_counter() - t0:.0f} s)",
        ["model", "val loss"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "c", "all"], default="all")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, val = code_data()
    state: dict = {}
    parts = "abc" if args.part == "all" else args.part
    for p in parts:
        {"a": part_a, "b": part_b, "c": part_c}[p](train, val, args.steps_scale, state)


if __name__ == "__main__":
    main()
