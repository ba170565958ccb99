"""Decode speed on CPU: moekit vs transformers' Mixtral vs the memory-bandwidth bound.

A Mixtral-shaped model (~410 MB in fp32: dim 1024, 16/4 heads, 4 layers, 8 experts top-2 with
expert width 768, vocab 8000) with random weights is built in moekit and copied into
``transformers.MixtralForCausalLM`` (the copy is checked: both give the same logits). Each engine
generates greedily at batch 1 from a 32-token prompt; decode time per token is
``(time(64 new tokens) - time(1 new token)) / 63``, so the prompt's prefill is excluded the same
way for every engine.

The bound: a decode step must read every non-expert weight except the embedding table (one row),
the experts the step routes to, and the KV cache, once. Bytes per token divided by the bandwidth
of a large matrix-vector product measured in the same run gives the fastest possible step.

Engines and references are timed in interleaved rounds (each round times every engine once and
measures the bandwidth once), and the table reports the median over rounds: this machine's memory
bandwidth drifts by 10-30% within a minute, and a best-case bandwidth against a typical decode
time (or the reverse) would misstate the ratio. Besides the bound, a *matmul floor* row times the
weight matmuls one decode step performs (same shapes, two random experts per layer) back to back
with nothing else: the fastest this BLAS can stream these shapes, so ``engine / floor`` is the
engine's own overhead.

Timing is process CPU time with one torch thread by default: on a shared machine (other jobs on
the same cores) wall time mostly measures how long the scheduler parks the process, and OpenMP
barriers across oversubscribed cores add waits that are not the engine's. With one thread, CPU time
is the single core's busy time, which is what the bound models. ``--threads N`` times with N threads
(then CPU time sums over threads, so compare engines only against each other).

Rows: the decode session driven directly (eager fast path, and ``compile=True``), and what users
call, ``model.generate`` with its defaults (``compile="auto"``: compiled once the model has run a
compiled step, which the benchmark does once before timing) and with ``compile=False``.

Run: ``.venv/bin/python benchmarks/bench_decode.py`` (``--profile`` prints where a decode step's
time goes instead; ``--layers 2 --rounds 3`` for a quick check). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.layers import MoEConfig
from moekit.models import MoEForCausalLM
from moekit.models.config import ModelConfig
from moekit.models.decode import DecodeSession
from moekit.models.generation import auto_compile, iter_tokens

PROMPT_LEN, NEW_TOKENS = 32, 64


def mixtral_shaped(num_layers: int = 4, dim: int = 1024, ffn: int = 768, vocab: int = 8000) -> ModelConfig:
    """Mixtral conventions (no qk norm, rope theta 1e6, renormalised softmax top-2) at a CPU-sized scale."""
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        num_layers=num_layers,
        num_heads=16,
        num_kv_heads=4,
        head_dim=dim // 16,
        ffn_dim=2 * ffn,
        moe=MoEConfig(dim=dim, ffn_dim=ffn, num_experts=8, top_k=2, norm_topk_prob=True),
        moe_placement="all",
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def to_hf_mixtral(model: MoEForCausalLM):
    """The same weights in ``transformers.MixtralForCausalLM`` (keys renamed, tensors shared)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = model.config
    hf_cfg = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.moe.ffn_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.attn_num_kv_heads,
        head_dim=cfg.attn_head_dim,
        num_local_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    with torch.device("meta"):
        hf = MixtralForCausalLM(hf_cfg)
    # moekit -> HF v5 names; expert layouts already match (w_in = gate_up_proj, gate rows first).
    renames = {
        "mlp.router.weight": "mlp.gate.weight",
        "mlp.experts.w_in": "mlp.experts.gate_up_proj",
        "mlp.experts.w_out": "mlp.experts.down_proj",
    }
    state = {}
    for key, value in model.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key if key.startswith("lm_head") else f"model.{key}"] = value
    missing = set(hf.state_dict()) - set(state)
    extra = set(state) - set(hf.state_dict())
    if missing or extra:
        raise RuntimeError(f"key mapping mismatch: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    hf.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers (rotary inv_freq) were created on meta; rebuild them on CPU.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)
    return hf.eval()


def decode_bytes_per_token(model: MoEForCausalLM, context: int) -> float:
    """Bytes one batch-1 decode step reads: non-expert weights (one embedding row), top-k experts, KV."""
    cfg = model.config
    expert_params = {id(p) for mlp in model.moe_layers for p in mlp.experts.parameters()}
    total = 0
    for name, p in model.named_parameters():
        if id(p) in expert_params:
            continue
        total += cfg.dim * p.element_size() if name == "embed_tokens.weight" else p.numel() * p.element_size()
    for mlp in model.moe_layers:
        w_in, w_out = mlp.experts.stacked()
        per_expert = (w_in[0].numel() + w_out[0].numel()) * w_in.element_size()
        total += mlp.config.top_k * per_expert
    kv = 2 * cfg.num_layers * cfg.attn_num_kv_heads * cfg.attn_head_dim * context * 4
    return total + kv


def gemv_seconds(num_bytes: int = 256 * 2**20, repeats: int = 5):
    """A large fp32 matrix-vector product as a closure; returns ``(fn, bytes it reads)``."""
    cols = 8192
    rows = num_bytes // (4 * cols)
    w = torch.randn(rows, cols)
    x = torch.randn(cols)

    def run() -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            torch.mv(w, x)
            best = min(best, time.process_time() - t0)
        return best

    return run, rows * cols * 4


def matmul_floor(model: MoEForCausalLM, steps: int = 16, seed: int = 0):
    """Seconds per step of the decode step's weight matmuls alone (random top-k experts per layer)."""
    import random

    import torch.nn.functional as F

    rng = random.Random(seed)
    cfg = model.config
    x_1D = torch.randn(1, cfg.dim)
    h_1F = torch.randn(1, cfg.moe.ffn_dim)

    def run() -> float:
        t0 = time.process_time()
        for _ in range(steps):
            for layer in model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    F.linear(x_1D, proj.weight)
                F.linear(torch.randn(1, attn.o_proj.weight.shape[1]), attn.o_proj.weight)
                F.linear(x_1D, layer.mlp.router.weight)
                for e in rng.sample(range(cfg.moe.num_experts), cfg.moe.top_k):
                    F.linear(x_1D, layer.mlp.experts.w_in[e])
                    F.linear(h_1F, layer.mlp.experts.w_out[e])
            F.linear(x_1D, model.lm_head.weight)
        return (time.process_time() - t0) / steps

    return run


def per_token_decode(fn) -> float:
    """Seconds per decoded token, prefill excluded: (t(64) - t(1)) / 63, one measurement."""
    t0 = time.process_time()
    fn(1)
    t1 = time.process_time()
    fn(NEW_TOKENS)
    t2 = time.process_time()
    return ((t2 - t1) - (t1 - t0)) / (NEW_TOKENS - 1)


def profile_step(model: MoEForCausalLM, ids: torch.Tensor) -> None:
    """Prints the operators a decode step spends its time in, and the Python-side share."""
    from torch.profiler import ProfilerActivity, profile

    session = DecodeSession(model, ids, max_new_tokens=40)
    nxt = session.prefill().argmax(-1)
    for _ in range(8):
        nxt = session.step(nxt).argmax(-1)
    steps = 16
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            nxt = session.step(nxt).argmax(-1)
    wall = (time.perf_counter() - t0) / steps
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    ops = sum(e.self_cpu_time_total for e in prof.key_averages()) / steps / 1e6
    print(f"per step: wall {wall * 1e3:.2f} ms (profiled), operator self time {ops * 1e3:.2f} ms")


def main() -> None:
    """Builds the model, checks the HF copy, times every engine and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    parser.add_argument("--profile", action="store_true", help="profile a decode step instead")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile engine")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = mixtral_shaped(args.layers)
    model = MoEForCausalLM(cfg).eval()
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    ids = torch.randint(2, cfg.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    if args.profile:
        profile_step(model, ids)
        return

    rows = []

    def session_eager(n):
        return list(iter_tokens(DecodeSession(model, ids, max_new_tokens=n), n))

    def session_compiled(n):
        return list(iter_tokens(DecodeSession(model, ids, max_new_tokens=n, compile=True), n))

    def model_generate(n):
        return model.generate(ids, max_new_tokens=n)

    def model_generate_eager(n):
        return model.generate(ids, max_new_tokens=n, compile=False)

    engines = [("moekit DecodeSession (eager fast path)", session_eager)]
    if not args.no_compile:
        engines.append(("moekit DecodeSession(compile=True)", session_compiled))
        # compile="auto" compiles once the model has run a compiled step (or decoded
        # AUTO_COMPILE_TOKENS eagerly); one compiled call stands in for that history here.
        model.generate(ids, max_new_tokens=2, compile=True)
        engines.append(("moekit model.generate() (defaults: compile='auto')", model_generate))
    engines.append(("moekit model.generate(compile=False)", model_generate_eager))
    hf = None
    if not args.no_hf:
        hf = to_hf_mixtral(model)
        with torch.no_grad():
            ref = model(ids).logits
            got = hf(ids).logits
        max_diff = (ref - got).abs().max().item()
        if max_diff > 1e-3:
            raise RuntimeError(f"HF copy differs from moekit: max |logit diff| = {max_diff}")
        print(f"HF Mixtral copy checked: max |logit diff| = {max_diff:.2e}")
        fast_ids = model.generate(ids, max_new_tokens=NEW_TOKENS)
        with torch.no_grad():
            hf_ids = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        print(f"same greedy tokens as transformers: {torch.equal(fast_ids, hf_ids)}")

        def hf_generate(n):
            with torch.no_grad():
                return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        engines.append(
            (
                f"transformers {__import__('transformers').__version__} MixtralForCausalLM.generate",
                hf_generate,
            )
        )

    for _, fn in engines:
        fn(4)  # warm up (allocator, lazy inits, the compiled step's compilation)
    if not args.no_compile:
        print(f"model.generate() compiles under compile='auto': {auto_compile(model, ids, NEW_TOKENS)}")
    gemv, gemv_bytes = gemv_seconds()
    floor = matmul_floor(model)
    per_token_bytes = decode_bytes_per_token(model, PROMPT_LEN + NEW_TOKENS // 2)
    samples: dict[str, list[float]] = {name: [] for name, _ in engines}
    samples["matmul floor"], bandwidths = [], []
    for _ in range(args.rounds):
        for name, fn in engines:
            samples[name].append(per_token_decode(fn))
        samples["matmul floor"].append(floor())
        bandwidths.append(gemv_bytes / gemv())
    bandwidth = statistics.median(bandwidths)
    bound_s = per_token_bytes / bandwidth
    rows = [(name, statistics.median(v), min(v)) for name, v in samples.items()]

    print(
        f"\nmodel: {size_mb:.0f} MB fp32, {cfg.num_layers} layers, dim {cfg.dim}, {cfg.moe.num_experts} experts "
        f"top-{cfg.moe.top_k} (F={cfg.moe.ffn_dim}), vocab {cfg.vocab_size}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; batch 1, {PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens, greedy"
    )
    print(
        f"bound: {per_token_bytes / 1e6:.1f} MB read per token / {bandwidth / 1e9:.1f} GB/s (256 MB GEMV, "
        f"median of {args.rounds} rounds; range {min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}) "
        f"= {bound_s * 1e3:.2f} ms/token\n"
    )
    print(
        "| engine | ms/token (median) | best round | tokens/s | x bound | x matmul floor | vs transformers |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    hf_s = next((med for name, med, _ in rows if name.startswith("transformers")), None)
    floor_s = next(med for name, med, _ in rows if name == "matmul floor")
    rows.append(("memory-bandwidth bound", bound_s, bound_s))
    for name, med, best in rows:
        vs = f"{hf_s / med:.2f}x" if hf_s else "-"
        print(
            f"| {name} | {med * 1e3:.2f} | {best * 1e3:.2f} | {1 / med:.1f} | {med / bound_s:.2f} | "
            f"{med / floor_s:.2f} | {vs} |"
        )


if __name__ == "__main__":
    main()
