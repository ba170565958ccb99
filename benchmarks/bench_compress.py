"""Expert compression evidence: kernels, perplexity, decode speed, MILP vs uniform, pruning, HOBBIT.

Usage (each section at most twice; 2 shared cores)::

    .venv/bin/python benchmarks/bench_compress.py kernels   # CPU kernel microbenchmark
    .venv/bin/python benchmarks/bench_compress.py quality   # small trained model: ppl, MILP, pruning, fallback
    .venv/bin/python benchmarks/bench_compress.py speed     # Mixtral-shaped random model: size, decode tok/s
    .venv/bin/python benchmarks/bench_compress.py offload   # quantized expert store: bytes per miss, tok/s

Results are printed as JSON lines and appended to ``benchmarks/results/compress.jsonl``; the
numbers and their reading are in docs/compression.md. The quality section uses
``runs/moe-small/checkpoints/last`` and otherwise trains ``runs/compress-small`` (< 4 min).
"""

# ruff: noqa: B023  (the timed lambdas run inside the loop that defines them)
from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compress.jsonl"


# The settings docs/compression.md's tables were measured with (before MC-MoE's defaults).
EARLIER = dict(objective="expert_mse", per_layer_budget=False, min_bits_each=False, beta=1.0)


def emit(record: dict) -> None:
    """Prints one JSON record and appends it to the results file."""
    print(json.dumps(record), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- kernels


def _time_cycled(fns, reps: int) -> float:
    """µs per call, cycling over distinct weights so they come from DRAM, not cache.

    The minimum over ``reps`` rounds (one call per weight each): other jobs share these cores,
    and the minimum is the least disturbed round.
    """
    for f in fns[:2]:
        f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in fns:
            f()
        best = min(best, (time.perf_counter() - t0) / len(fns))
    return best * 1e6


def bench_kernels(args) -> None:
    """Side by side on one expert-sized matrix, weights cycled over > LLC."""
    from moekit.compress.kernels import PackedLinear
    from moekit.compress.quant import quantize_rtn

    torch.manual_seed(0)
    g = 128
    for out_f, in_f in ((3584, 1024), (1024, 1792)):
        copies = max(2, int(160e6 // (out_f * in_f * 4)))
        ws = [torch.randn(out_f, in_f) * 0.02 for _ in range(copies)]
        for n in (1, 16):
            x = torch.randn(n, in_f)
            xb = x.bfloat16()
            row: dict = {"section": "kernels", "shape": [out_f, in_f], "tokens": n, "copies": copies}
            row["fp32_linear"] = _time_cycled([lambda w=w: F.linear(x, w) for w in ws], args.reps)
            wbs = [w.bfloat16() for w in ws]
            row["bf16_linear"] = _time_cycled([lambda w=w: F.linear(xb, w) for w in wbs], args.reps)
            packs = []
            for w in ws:
                s = w.abs().amax(1) / 127
                qw = torch.quantize_per_channel(
                    w, s.double(), torch.zeros(out_f, dtype=torch.long), 0, torch.qint8
                )
                packs.append(torch.ops.quantized.linear_prepack(qw, None))
            row["fbgemm_dynamic_int8_per_channel"] = _time_cycled(
                [lambda p=p: torch.ops.quantized.linear_dynamic(x, p) for p in packs], args.reps
            )
            i8 = [
                (
                    torch.round(w / (w.abs().amax(1, keepdim=True) / 127)).to(torch.int8),
                    w.abs().amax(1).bfloat16(),
                )
                for w in ws
            ]
            row["weight_int8pack_mm_per_channel_bf16"] = _time_cycled(
                [lambda q=q: torch.ops.aten._weight_int8pack_mm(xb, q[0], q[1]) for q in i8], args.reps
            )
            del packs, i8, wbs
            for bits, kernel in ((8, "int4x2"), (8, "int8group"), (4, "int4pack"), (2, "int4pack")):
                mods = [PackedLinear(quantize_rtn(w, bits, g), kernel=kernel) for w in ws]
                row[f"moekit_{kernel}_{bits}bit_g{g}"] = _time_cycled(
                    [lambda m=m: m(x) for m in mods], args.reps
                )
                del mods
            for bits in (4, 2):
                slow = [PackedLinear(quantize_rtn(w, bits, g), kernel="dequant") for w in ws[:4]]
                row[f"moekit_dequant_{bits}bit_g{g}"] = _time_cycled([lambda m=m: m(x) for m in slow], 2)
                del slow
            try:
                pk = torch.ops.aten._dyn_quant_pack_4bit_weight(
                    torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8),
                    torch.rand(out_f, in_f // g),
                    torch.zeros(out_f),
                    g,
                    in_f,
                    out_f,
                )
                row["dyn_quant_matmul_4bit"] = _time_cycled(
                    [lambda: torch.ops.aten._dyn_quant_matmul_4bit(x, pk, g, in_f, out_f)], 3
                )
            except (RuntimeError, NotImplementedError) as err:
                row["dyn_quant_matmul_4bit"] = f"error: {str(err)[:100]}"
            try:
                import torchao  # noqa: F401

                row["torchao"] = "installed (not measured)"
            except ImportError:
                row["torchao"] = "not installed"
            emit({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()})


# ----------------------------------------------------------------------------- quality


def small_trained_model() -> Path:
    """``runs/moe-small/checkpoints/last`` or a quick run in ``runs/compress-small``.

    The quick run is moe-small narrowed to dim 128 (experts F=256, 8 experts top-2, 4 layers) on
    128-token windows, so that under 4 minutes of shared CPU it trains enough steps for its
    experts to matter (a 40-step moe-small run stayed near init and no quantization changed it).
    """
    for cand in (ROOT / "runs/moe-small/checkpoints/last", ROOT / "runs/compress-small/checkpoints/last"):
        if (cand / "model.safetensors").is_file():
            return cand
    from moekit.train import TrainConfig, train

    cfg = TrainConfig(
        preset="moe-small",
        model_overrides={"dim": 128, "head_dim": 16, "moe": {"dim": 128, "ffn_dim": 256}},
        seq_len=128,
        batch_size=16,
        max_steps=700,
        time_limit_s=230.0,
        lr=3e-3,
        warmup_steps=20,
        eval_interval=250,
        save_interval=1000,
        out_dir=str(ROOT / "runs/compress-small"),
    )
    return train(cfg, progress=False).checkpoint_dir


def _ppl(model, batches) -> float:
    from moekit.models.decoder import causal_lm_loss

    total = n = 0.0
    with torch.no_grad():
        for b in batches:
            out = model(b)
            k = b[:, 1:].numel()
            total += float(causal_lm_loss(out.logits.float(), b)) * k
            n += k
    return math.exp(total / n)


def bench_quality(args) -> None:
    """Perplexity of the formats, MILP vs uniform, pruning curve and the offload fallback."""
    from moekit.cli.common import evaluation_tokens, load_model_and_tokenizer
    from moekit.compress import (
        MixedPrecisionConfig,
        PruneConfig,
        QuantConfig,
        allocate_bits,
        dynamic_prune,
        expert_calls_saved,
        expert_stats,
        model_bytes,
        quantize_model,
        uniform_allocation,
    )
    from moekit.compress.mixed import cost_table, evaluate_allocation
    from moekit.data import eval_batches

    folder = small_trained_model()
    model, tok, folder = load_model_and_tokenizer(folder)
    val = eval_batches(evaluation_tokens(tok, folder, None, "val"), 256, 4, args.eval_batches)
    calib = eval_batches(evaluation_tokens(tok, folder, None, "train"), 256, 4, args.calib_batches)
    base = _ppl(model, val)
    emit(
        {
            "section": "quality",
            "model": str(folder),
            "format": "fp32",
            "ppl": round(base, 3),
            "bytes": model_bytes(model)["stored"],
        }
    )
    bf = copy.deepcopy(model).to(torch.bfloat16)
    emit(
        {
            "section": "quality",
            "format": "bf16",
            "ppl": round(_ppl(bf, val), 3),
            "bytes": model_bytes(bf)["stored"],
        }
    )
    del bf
    for bits, method in ((8, "rtn"), (4, "rtn"), (4, "gptq"), (3, "rtn"), (3, "gptq"), (2, "gptq")):
        for non_experts in (False, True) if bits in (8, 4) else (False,):
            cfg = QuantConfig(bits=bits, method=method, include_non_experts=non_experts)
            t0 = time.perf_counter()
            q = quantize_model(copy.deepcopy(model), cfg, calib)
            ppl = _ppl(q, val)
            emit(
                {
                    "section": "quality",
                    "format": f"int{bits}-{method}" + ("-all-linears" if non_experts else "-experts"),
                    "ppl": round(ppl, 3),
                    "ppl_increase_pct": round(100 * (ppl / base - 1), 3),
                    "bytes": model_bytes(q)["stored"],
                    "quantize_s": round(time.perf_counter() - t0, 1),
                }
            )
            del q

    # MILP vs uniform at equal total bits
    cands = (2, 3, 4, 8)
    stats = expert_stats(model, calib, cands, 128)
    costs = cost_table(stats)
    for uniform_bits in (2, 3):
        uni = uniform_allocation(stats, uniform_bits, 128)
        for budget_name, budget in (("equal-to-uniform", uni.avg_bits), ("2.5", 2.5)):
            if budget_name == "2.5" and uniform_bits != 2:
                continue
            alloc = allocate_bits(
                stats, MixedPrecisionConfig(avg_bits=budget, candidate_bits=cands, **EARLIER)
            )
            rec = {
                "section": "milp",
                "uniform_bits": uniform_bits,
                "budget": budget_name,
                "budget_bits": round(budget, 4),
                "uniform_avg_bits": round(uni.avg_bits, 4),
                "milp_avg_bits": round(alloc.avg_bits, 4),
                "uniform_cost": uni.cost,
                "milp_cost": alloc.cost,
                "milp_bits": alloc.bits,
            }
            for name, bits in (("uniform", uni.bits), ("milp", alloc.bits)):
                for method in ("rtn", "gptq"):
                    q = quantize_model(
                        copy.deepcopy(model), QuantConfig(method=method, expert_bits=bits), calib
                    )
                    rec[f"{name}_{method}_ppl"] = round(_ppl(q, val), 3)
                    rec[f"{name}_bytes"] = model_bytes(q)["stored"]
                    del q
            assert evaluate_allocation(alloc.bits, costs, stats.params, list(cands), 128)[1] <= budget + 1e-9
            emit(rec)

    # Dynamic pruning savings curve
    pruned = copy.deepcopy(model)
    for thr in (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0):
        dynamic_prune(pruned, PruneConfig(threshold=thr, protect_top=0.0))  # the rule docs measured
        saved = []
        with torch.no_grad():
            for b in val:
                out = pruned(b)
                saved.append(expert_calls_saved(out.routing))
        ppl = _ppl(pruned, val)
        emit(
            {
                "section": "prune",
                "threshold": thr,
                "expert_calls_saved": round(sum(saved) / len(saved), 4),
                "ppl": round(ppl, 3),
                "loss_change": round(math.log(ppl) - math.log(base), 4),
            }
        )
    del pruned

    # HOBBIT: low-bit fallback on misses under a throttled store
    from moekit.offload import offload_model

    prompt = val[0][:1, :32]
    with torch.no_grad():
        ref_tokens = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
    expert_bytes = 3 * model.config.moe.dim * model.config.moe.ffn_dim * 4
    for fb_bits in (None, 4, 2):
        m = copy.deepcopy(model)
        fallback = None
        if fb_bits:
            low = quantize_model(copy.deepcopy(model), QuantConfig(bits=fb_bits))
            fallback = [layer.experts for layer in low.moe_layers]
        with tempfile.TemporaryDirectory() as tmp:
            cache = offload_model(
                m, tmp, cache_bytes=8 * expert_bytes, bandwidth=args.bandwidth, fallback=fallback
            )
            t0 = time.perf_counter()
            with torch.no_grad():
                toks = m.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
            dt = time.perf_counter() - t0
            ppl = _ppl(m, val[:2])
            cache.close()
        agree = float((toks[0, 32:] == ref_tokens[0, 32:]).float().mean())
        emit(
            {
                "section": "offload_fallback",
                "fallback_bits": fb_bits,
                "bandwidth_MBps": args.bandwidth / 1e6,
                "cache_experts": 8,
                "decode_tok_s": round(args.new_tokens / dt, 2),
                "ppl_2_batches": round(ppl, 3),
                "greedy_agreement": round(agree, 3),
                **cache.stats.as_dict(),
            }
        )


def bench_offload(args) -> None:
    """Offloading with the experts kept quantized in the store: bytes per miss and decode speed
    at a throttled store, next to the float store (same cache size in experts)."""
    from moekit.cli.common import evaluation_tokens, load_model_and_tokenizer
    from moekit.compress import QuantConfig, quantize_model
    from moekit.data import eval_batches
    from moekit.offload import offload_model
    from moekit.offload.quantized import offload_quantized_model

    model, tok, folder = load_model_and_tokenizer(small_trained_model())
    val = eval_batches(evaluation_tokens(tok, folder, None, "val"), 256, 4, 2)
    prompt = val[0][:1, :32]
    for bits in (None, 8, 4):
        m = copy.deepcopy(model)
        with tempfile.TemporaryDirectory() as tmp:
            if bits is None:
                one = 3 * model.config.moe.dim * model.config.moe.ffn_dim * 4
                cache = offload_model(m, tmp, cache_bytes=8 * one, bandwidth=args.bandwidth)
            else:
                m = quantize_model(m, QuantConfig(bits=bits))
                from moekit.offload.quantized import QuantizedExpertStore

                QuantizedExpertStore.write(m, tmp)
                one = QuantizedExpertStore(tmp).expert_bytes(0, 0)
                cache = offload_quantized_model(m, tmp, cache_bytes=8 * one, bandwidth=args.bandwidth)
            t0 = time.perf_counter()
            with torch.no_grad():
                m.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
            dt = time.perf_counter() - t0
            cache.close()
        emit(
            {
                "section": "offload_quantized_store",
                "expert_bits": bits or 32,
                "bytes_per_expert": one,
                "bandwidth_MBps": args.bandwidth / 1e6,
                "cache_experts": 8,
                "decode_tok_s": round(args.new_tokens / dt, 2),
                **cache.stats.as_dict(),
            }
        )


# ----------------------------------------------------------------------------- speed


def mixtral_shaped_config():
    """A Mixtral-shaped moekit model of ~0.5 GB fp32: dim 1024, 4 layers, 8 experts top-2 (F=1792),
    32/8 heads of 32 (GQA), vocab 32000, no q/k norm (Mixtral)."""
    from moekit.layers import MoEConfig
    from moekit.models import ModelConfig

    return ModelConfig(
        vocab_size=32000,
        dim=1024,
        num_layers=4,
        num_heads=32,
        num_kv_heads=8,
        head_dim=32,
        ffn_dim=3584,
        moe=MoEConfig(dim=1024, ffn_dim=1792, num_experts=8, top_k=2, norm_topk_prob=True),
        qk_norm="none",
        rope_theta=1e6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _decode_tok_s(model, prompt, new_tokens: int, rounds: int = 3) -> float:
    """Greedy decode tokens/s after a 16-token prompt: the best of ``rounds`` runs (other jobs
    share the cores; the best run is the least disturbed)."""
    best = float("inf")
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
        for _ in range(rounds):
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
            best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def bench_speed(args) -> None:
    """Size and greedy decode tokens/s of the formats on the Mixtral-shaped model (random weights)."""
    from moekit.compress import MixedPrecisionConfig, QuantConfig, allocate_bits, model_bytes, quantize_model
    from moekit.compress.calibrate import ExpertStats
    from moekit.models import MoEForCausalLM

    torch.manual_seed(0)
    base = MoEForCausalLM(mixtral_shaped_config()).eval()
    prompt = torch.randint(0, base.config.vocab_size, (1, 16))
    rows = []

    def run(name, m):
        b = model_bytes(m)
        tps = _decode_tok_s(m, prompt, args.new_tokens)
        rec = {
            "section": "speed",
            "format": name,
            "stored_MB": round(b["stored"] / 1e6, 1),
            "resident_MB": round(b["resident"] / 1e6, 1),
            "decode_tok_s": round(tps, 2),
        }
        rows.append(rec)
        emit(rec)

    run("fp32", base)
    run("bf16", copy.deepcopy(base).to(torch.bfloat16))
    for bits, kernel in ((8, "auto"), (8, "exact"), (4, "auto")):
        q = quantize_model(
            copy.deepcopy(base), QuantConfig(bits=bits, include_non_experts=True, kernel=kernel)
        )
        run(f"int{bits} all linears ({q.lm_head.kernel})", q)
        del q
    # mixed ~2.5 bits for experts (random weights: allocation from synthetic importance), int4 elsewhere
    layers = list(base.moe_layers)
    params = [[3 * 1024 * 1792] * 8 for _ in layers]
    g = torch.Generator().manual_seed(0)
    freq = [torch.rand(8, generator=g).softmax(0).tolist() for _ in layers]
    stats = ExpertStats(
        freq,
        freq,
        [[[4.0**-b for b in (2, 3, 4, 8)] for _ in range(8)] for _ in layers],
        params,
        [2, 3, 4, 8],
    )
    alloc = allocate_bits(stats, MixedPrecisionConfig(avg_bits=2.5, candidate_bits=(2, 3, 4, 8), **EARLIER))
    q = quantize_model(
        copy.deepcopy(base), QuantConfig(bits=4, expert_bits=alloc.bits, include_non_experts=True)
    )
    run(f"mixed experts {alloc.avg_bits:.2f} bits {alloc.bits[0]}... + int4 rest", q)
    del q
    q = quantize_model(copy.deepcopy(base), QuantConfig(bits=4, include_non_experts=True, kernel="dequant"))
    q_tps = _decode_tok_s(q, prompt, 2, rounds=1)
    emit(
        {"section": "speed", "format": "int4 all linears (dequant fallback)", "decode_tok_s": round(q_tps, 3)}
    )
    del q
    fp = rows[0]["decode_tok_s"]
    emit({"section": "speed_summary", **{r["format"]: round(r["decode_tok_s"] / fp, 2) for r in rows}})


def main() -> None:
    """Parses the section name and runs it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", choices=["kernels", "quality", "speed", "offload"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--bandwidth", type=float, default=200e6, help="store bytes/s for the fallback run")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: two-thread timings swing 10x on shared cores)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sections = {
        "kernels": bench_kernels,
        "quality": bench_quality,
        "speed": bench_speed,
        "offload": bench_offload,
    }
    sections[args.section](args)


if __name__ == "__main__":
    main()
