"""moekit's native quantized kernels (``csrc/quant_gemv.cpp``) against the other CPU kernels, and
quantized decode against fp32 (issue 19's 8-bit and 4-bit rows).

Usage (behind the heavy-job lock; ``--threads`` sets torch's threads)::

    python benchmarks/bench_quant_kernels.py kernels --threads 1   # GB/s per op at N = 1
    python benchmarks/bench_quant_kernels.py decode --threads 2    # tok/s of generate, fp32 / 8 / 4 bits
    python benchmarks/bench_quant_kernels.py logits --run /tmp/q/run  # logit error + ppl vs llama.cpp

``kernels``: the Mixtral-shaped ~100 MB model's matrices (expert ``w_in [4096, 512]``, ``w_out
[512, 2048]``, ``lm_head [32000, 512]``), each cycled over enough copies (> 160 MB) that the
weights come from DRAM; GB/s = the bytes each kernel's own weight form holds / time per call.

``decode``: greedy ``model.generate`` tok/s (16-token prompt, best of 3 runs of ``--new-tokens``)
of that model (random weights) in fp32 and quantized with every linear (``--include-non-experts``)
at 8 and 4 bits, group 32 (q8_0/q4_0's block) and 128.

``logits``: on a trained model (``--run``: a ``moekit train`` folder), the last-position logits of
held-out windows in fp32, through moekit's 8/4-bit native kernels (all linears, group 32), and
through llama.cpp (llama-cpp-python) on ``moekit export-gguf`` files of the same fp32 weights (f32,
q8_0, q4_0): max abs error and KL(fp32 || quantized) against each engine's own fp32, and
perplexity over the windows (moekit's, all positions).

Results are printed as JSON lines and appended to ``benchmarks/results/quant_kernels.jsonl``.
"""

# ruff: noqa: B023  (the timed lambdas run inside the loop that defines them)
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quant_kernels.jsonl"


def emit(record: dict) -> None:
    """Prints one JSON record and appends it to the results file."""
    record = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in record.items()}
    print(json.dumps(record), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _time_cycled(fns, reps: int) -> float:
    """Seconds per call, the minimum over ``reps`` rounds of one call per weight copy."""
    for f in fns[:2]:
        f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in fns:
            f()
        best = min(best, (time.perf_counter() - t0) / len(fns))
    return best


def _bytes(module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def bench_kernels(args) -> None:
    """GB/s of each kernel's weight form at one input row."""
    from moekit.compress.kernels import PackedLinear
    from moekit.compress.quant import quantize_rtn

    torch.manual_seed(0)
    x_cache = {}
    for rows, cols in ((4096, 512), (512, 2048), (32000, 512)):
        copies = max(2, int(160e6 // (rows * cols * 4)))
        ws = [torch.randn(rows, cols) * 0.02 for _ in range(copies)]
        x = x_cache.setdefault(cols, torch.randn(1, cols))
        rec: dict = {"section": "kernels", "shape": [rows, cols], "threads": args.threads, "copies": copies}
        t = _time_cycled([lambda w=w: F.linear(x, w) for w in ws], args.reps)
        rec["fp32_linear_GBs"] = rows * cols * 4 / t / 1e9
        for bits, group, kernel in (
            (8, 32, "native"),
            (8, 128, "native"),
            (8, 128, "fbgemm"),
            (8, 128, "int4x2"),
            (4, 32, "native"),
            (4, 128, "native"),
            (4, 128, "int4pack"),
        ):
            mods = [PackedLinear(quantize_rtn(w, bits, group), kernel=kernel) for w in ws]
            t = _time_cycled([lambda m=m: m(x) for m in mods], args.reps)
            nbytes = _bytes(mods[0]) if kernel != "fbgemm" else rows * cols + rows * 8
            if kernel == "native" and bits == 8:
                nbytes = _bytes(mods[0])  # qweight is the kernel form: counted once
            rec[f"{kernel}_{bits}bit_g{group}_GBs"] = nbytes / t / 1e9
            rec[f"{kernel}_{bits}bit_g{group}_us"] = t * 1e6
            del mods
        emit(rec)
    # The fused one-token experts op (K = 2 of 8 experts, D = 512, F = 2048) against the same
    # experts run one PackedLinear pair at a time.
    from moekit.compress.experts import QuantizedExperts

    for bits, group in ((8, 32), (8, 128), (4, 32), (4, 128)):
        layers = []
        for _ in range(6):  # 6 layers x 8 experts x 3 MB (8 bit): beyond the LLC
            w_in = [PackedLinear(quantize_rtn(torch.randn(4096, 512) * 0.02, bits, group)) for _ in range(8)]
            w_out = [PackedLinear(quantize_rtn(torch.randn(512, 2048) * 0.02, bits, group)) for _ in range(8)]
            layers.append(QuantizedExperts(w_in, w_out, "swiglu"))
        x, wts = torch.randn(1, 512), torch.rand(1, 2)
        ids = [[(3 * i) % 8, (3 * i + 5) % 8] for i in range(len(layers))]
        nbytes = 2 * (_bytes(layers[0].w_in[0]) + _bytes(layers[0].w_out[0]))
        fused = _time_cycled(
            [lambda e=e, i=i: e.decode_token(x, i, wts) for e, i in zip(layers, ids)], args.reps
        )
        generic = _time_cycled(
            [
                lambda e=e, i=i: super(QuantizedExperts, e).decode_token(x, i, wts)
                for e, i in zip(layers, ids)
            ],
            args.reps,
        )
        emit(
            {
                "section": "experts_token",
                "bits": bits,
                "group": group,
                "threads": args.threads,
                "fused_us": fused * 1e6,
                "fused_GBs": nbytes / fused / 1e9,
                "per_expert_us": generic * 1e6,
                "per_expert_GBs": nbytes / generic / 1e9,
            }
        )
        del layers


def mixtral_100m(seed: int = 0):
    """The issue's ~100 MB-active Mixtral-shaped model (``bench_vs_llamacpp.py``'s ``100m``:
    D=512, F=2048, 4 layers, 8 experts top-2, vocab 32000, 8/2 heads), random weights."""
    from bench_vs_llamacpp import SIZES, build_model

    return build_model(SIZES["100m"], seed)


def bench_decode(args) -> None:
    """Greedy generate tok/s: fp32 against 8/4-bit (all linears), native and the previous auto kernels."""
    from bench_compress import _decode_tok_s  # the same best-of-rounds greedy timer

    from moekit.compress import QuantConfig, model_bytes, quantize_model
    from moekit.compress.kernels import PackedLinear

    base = mixtral_100m()
    prompt = torch.randint(0, 32000, (1, 16))
    fp = _decode_tok_s(base, prompt, args.new_tokens)
    emit({"section": "decode", "format": "fp32", "threads": args.threads, "tok_s": fp})
    natives = ((8, 32, "native"), (8, 128, "native"), (4, 32, "native"), (4, 128, "native"))[: args.formats]
    for bits, group, kernel in (natives if args.formats else ()) + ((8, 128, "fbgemm"), (4, 128, "exact")):
        # fbgemm is not a QuantConfig choice (it was 8-bit "auto" before the native kernel):
        # quantize with "exact", then rebuild each matrix's kernel form as fbgemm.
        cfg = QuantConfig(
            bits=bits,
            group_size=group,
            include_non_experts=True,
            kernel="exact" if kernel == "fbgemm" else kernel,
        )
        q = quantize_model(copy.deepcopy(base), cfg)
        if kernel == "fbgemm":
            for m in q.modules():
                if isinstance(m, PackedLinear):
                    m.kernel = "fbgemm"
                    m._build_kernel_form(m.quantized())
        tps = _decode_tok_s(q, prompt, args.new_tokens)
        emit(
            {
                "section": "decode",
                "format": f"int{bits} g{group} {kernel}",
                "threads": args.threads,
                "stored_MB": model_bytes(q)["stored"] / 1e6,
                "tok_s": tps,
                "vs_fp32": tps / fp,
            }
        )
        del q


def main() -> None:
    """Parses the section and runs it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", choices=["kernels", "decode", "logits"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--formats", type=int, default=4, help="decode: how many native formats to run")
    p.add_argument("--run", default="/tmp/q/run", help="logits: a moekit train run folder")
    p.add_argument("--windows", type=int, default=16, help="logits: held-out windows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.section == "logits":
        from bench_quant_logits import bench_logits

        bench_logits(args)
    else:
        {"kernels": bench_kernels, "decode": bench_decode}[args.section](args)


if __name__ == "__main__":
    main()
