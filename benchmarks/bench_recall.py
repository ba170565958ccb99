"""Multi-query associative recall: attention vs Mamba vs a hybrid, tiny models, trained briefly.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_recall.py --steps 3000 --lr 1e-3
    python benchmarks/bench_recall.py --quick       # smoke test

The task (:func:`moekit.data.recall.associative_recall_batch`): P key-value pairs, then Q
queries whose answers must be looked up in the context; accuracy is over the answers of 512
fresh held-out sequences (chance = 1 / num_values). The three models share everything but
the mixers: width 64, 2 layers, dense FFNs (width 128), MHA of 4 heads of 16 or a Mamba mixer
with ``expand=1, state_dim=16`` (equal parameters within 1 %); layouts ``aa``, ``ma``
(hybrid) and ``mm``. Same seed, data stream, optimizer (AdamW, lr 1e-3 by default, with warmup and cosine
decay) and steps for all three.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from moekit.blocks.ssm import MambaConfig
from moekit.data.recall import associative_recall_batch, recall_accuracy
from moekit.models import MoEForCausalLM, get_preset
from moekit.models.layer_layouts import layout_from_pattern


def build(pattern: str, vocab: int, seq_len: int) -> MoEForCausalLM:
    """A tiny decoder with the layer string ``pattern`` (lower case: dense FFNs)."""
    lay = layout_from_pattern(pattern)
    cfg = get_preset("moe-tiny").replace(
        vocab_size=vocab,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        ffn_dim=128,
        max_position_embeddings=max(256, seq_len),
        mamba=MambaConfig(dim=64, expand=1, state_dim=16) if "m" in pattern.lower() else None,
        **lay,
    )
    return MoEForCausalLM(cfg)


def run(pattern: str, args) -> dict:
    vocab = args.num_keys + args.num_values
    shape = (args.num_pairs, args.num_queries, args.num_keys, args.num_values)
    torch.manual_seed(args.seed)
    model = build(pattern, vocab, 2 * (args.num_pairs + args.num_queries))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, labels = associative_recall_batch(args.batch_size, *shape, generator=g)
        out = model(ids, labels=labels)
        out.lm_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()
    gv = torch.Generator().manual_seed(10_000 + args.seed)
    with torch.no_grad():
        ids, labels = associative_recall_batch(512, *shape, generator=gv)
        out = model(ids, labels=labels)
    return {
        "model": pattern,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "val_loss": round(out.lm_loss.item(), 4),
        "accuracy": round(recall_accuracy(out.logits, labels), 4),
        "chance": round(1 / args.num_values, 4),
        "train_s": round(train_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["aa", "ma", "mm"], help="layer strings")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-pairs", type=int, default=8)
    ap.add_argument("--num-queries", type=int, default=8)
    ap.add_argument("--num-keys", type=int, default=32)
    ap.add_argument("--num-values", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.steps = 3
    rows = []
    for pattern in args.models:
        row = run(pattern, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | params | answer accuracy | answer loss | train s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['accuracy']:.3f} | {r['val_loss']} | {r['train_s']} |")


if __name__ == "__main__":
    main()
