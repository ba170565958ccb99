"""Attention-MoE vs hybrid Mamba-MoE (Jamba layout) vs pure Mamba-MoE, at equal active parameters.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_hybrid.py --steps 150
    python benchmarks/bench_hybrid.py --quick        # smoke test (a few steps, short contexts)

All three train through the one training engine (:func:`moekit.train.train`, the ``moekit train``
path) on the standard-library corpus with the same tokenizer, data, seed and budget. They share
everything but the token mixers: moe-tiny's width (64), 4 layers, every FFN MoE (4 experts top-2).
The attention is MHA (4 heads of 16, 16.4k parameters per layer with its q/k norms) and the Mamba
mixer has ``expand=1, state_dim=16`` (16.3k parameters), so the active parameters match within
0.2 %. Layouts: ``AAAA``; Jamba's ``periodic_layer_types(4, 4, 2)`` (``MMAM``: attention every
4th layer, offset 2); ``MMMM``.

Reported per model: validation loss (nats/token, the engine's fixed held-out batches), training
tokens/s (the engine's, wall time), and batch-1 greedy decode tokens/s (CPU time) after a prompt of each context length,
with the cache's size in bytes at that point (K/V grows with the context, a Mamba state does not).
Prints a markdown table and one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from moekit.blocks.ssm import MambaConfig
from moekit.models.layer_layouts import layout_from_pattern, periodic_layer_types
from moekit.train import TrainConfig, train


def layouts() -> dict[str, dict]:
    """ModelConfig overrides of the three contenders (JSON-able, for ``model_overrides``)."""
    jamba = periodic_layer_types(4, 4, 2)  # ('mamba', 'mamba', 'attention', 'mamba')
    pattern = "".join("A" if t == "attention" else "M" for t in jamba)
    out = {}
    for name, pat in (("attention-moe", "AAAA"), ("hybrid-moe", pattern), ("mamba-moe", "MMMM")):
        lay = layout_from_pattern(pat)
        over = {
            "num_layers": lay["num_layers"],
            "layer_types": list(lay["layer_types"]),
            "num_heads": 4,
            "num_kv_heads": 4,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "moe_placement": "all",
        }
        if "mamba" in lay["layer_types"]:
            over["mamba"] = MambaConfig(dim=64, expand=1, state_dim=16).to_dict()
        out[f"{name} ({pat})"] = over
    return out


def active_params(model: torch.nn.Module) -> int:
    """Parameters one token uses: all of them minus the unchosen experts (every FFN is top-k of E)."""
    total = sum(p.numel() for p in model.parameters())
    moe = model.config.moe
    for name, p in model.named_parameters():
        if ".experts." in name:
            total -= p.numel() * (moe.num_experts - moe.top_k) // moe.num_experts
    return total


def cache_bytes(cache) -> int:
    """Bytes the cache holds for the tokens so far (filled K/V rows plus the Mamba states)."""
    n = 0
    for i in range(cache.num_layers):
        for t in (cache.keys[i], cache.values[i]):
            if t is not None:
                n += t[:, :, : cache.lengths[i]].numel() * t.element_size()
        st = cache.mamba_states[i]
        if st is not None:
            n += (
                st.conv_BIK.numel() * st.conv_BIK.element_size()
                + st.ssm_BIN.numel() * st.ssm_BIN.element_size()
            )
    return n


@torch.no_grad()
def decode_rate(model, context: int, new_tokens: int, vocab: int) -> tuple[float, int]:
    """Greedy batch-1 decode tokens/s after a ``context``-token prompt, and the cache's bytes then.

    Timed in CPU time of this process (best of 3): the machine is shared, and wall time would
    mostly measure the other jobs (run with ``OMP_NUM_THREADS=1`` so CPU time = one core's time).
    """
    model.eval()
    g = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, vocab, (1, context), generator=g)
    best = float("inf")
    for _ in range(3):
        out = model(prompt, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        nbytes = cache_bytes(cache)
        t0 = time.process_time()
        for _ in range(new_tokens):
            out = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        best = min(best, time.process_time() - t0)
    return new_tokens / best, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-corpus-bytes", type=int, default=4_000_000)
    ap.add_argument("--quick", action="store_true", help="a few steps and short contexts (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.contexts, args.new_tokens = 4, [16, 64], 4
    rows = []
    for name, over in layouts().items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                preset="moe-tiny",
                model_overrides=over,
                max_corpus_bytes=args.max_corpus_bytes,
                tokenizer_sample_bytes=1_000_000,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                max_steps=args.steps,
                time_limit_s=None,
                warmup_steps=max(1, args.steps // 10),
                eval_interval=args.steps,
                eval_steps=8,
                save_interval=10**9,
                out_dir=tmp,
            )
            res = train(cfg, progress=False)
            from moekit.models import MoEForCausalLM

            model = MoEForCausalLM.from_pretrained(res.checkpoint_dir)
        row = {
            "model": name,
            "active_params": active_params(model),
            "total_params": sum(p.numel() for p in model.parameters()),
            "steps": res.step,
            "tokens": res.num_tokens,
            "val_loss": round(res.val_loss, 4),
            "unigram_loss": round(res.unigram_loss, 4),
            "train_tokens_per_s": round(res.tokens_per_s, 1),
        }
        for ctx in args.contexts:
            rate, nbytes = decode_rate(model, ctx, args.new_tokens, model.config.vocab_size)
            row[f"decode_tok_s@{ctx}"] = round(rate, 1)
            row[f"cache_kib@{ctx}"] = round(nbytes / 1024, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ctxs = args.contexts
    print()
    print(
        "| model | active params | val loss | train tok/s | "
        + " | ".join(f"decode tok/s @{c} (cache KiB)" for c in ctxs)
        + " |"
    )
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in ctxs) + " |")
    for r in rows:
        cells = " | ".join(f"{r[f'decode_tok_s@{c}']} ({r[f'cache_kib@{c}']})" for c in ctxs)
        print(
            f"| {r['model']} | {r['active_params']:,} | {r['val_loss']} | {r['train_tokens_per_s']} | {cells} |"
        )


if __name__ == "__main__":
    main()
