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

Timing is process CPU time with one torch thread by default: on a shared machine (other jobs on
the same cores) wall time mostly measures how long the scheduler parks the process, and OpenMP
barriers across oversubscribed cores add waits that are not the engine's. With one thread, CPU time
is the single core's busy time, which is what the bound models. ``--threads N`` times with N threads
(then CPU time sums over threads, so compare engines only against each other).

Run: ``.venv/bin/python benchmarks/bench_decode.py`` (``--profile`` prints where a decode step's
time goes instead). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from moekit.infer.generate import DecodeSession, generate
from moekit.layers import MoEConfig
from moekit.models import MoEForCausalLM
from moekit.models.config import ModelConfig

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


def gemv_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 8) -> float:
    """Bytes/s a large fp32 matrix-vector product streams (best of ``repeats``)."""
    cols = 8192
    rows = num_bytes // (4 * cols)
    w = torch.randn(rows, cols)
    x = torch.randn(cols)
    torch.mv(w, x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        torch.mv(w, x)
        best = min(best, time.process_time() - t0)
    del w
    return rows * cols * 4 / best


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


def time_generation(fn, new_tokens: int, repeats: int = 3) -> float:
    """Best CPU time of ``fn(new_tokens)`` over ``repeats`` runs (see the module docstring)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn(new_tokens)
        best = min(best, time.process_time() - t0)
    return best


def per_token_decode(fn) -> float:
    """Seconds per decoded token, prefill excluded: (t(64) - t(1)) / 63."""
    fn(4)  # warm up (allocator, lazy inits)
    return (time_generation(fn, NEW_TOKENS) - time_generation(fn, 1)) / (NEW_TOKENS - 1)


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

    def moekit_fast(n):
        return generate(model, ids, max_new_tokens=n)

    def moekit_model_generate(n):
        return model.generate(ids, max_new_tokens=n)

    engines = [("moekit.infer.generate (DecodeSession)", moekit_fast)]
    engines.append(("moekit model.generate (models/generation.py)", moekit_model_generate))
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
        fast_ids = moekit_fast(NEW_TOKENS)
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

    for name, fn in engines:
        rows.append((name, per_token_decode(fn)))
    bandwidth = gemv_bandwidth()
    per_token_bytes = decode_bytes_per_token(model, PROMPT_LEN + NEW_TOKENS // 2)
    bound_s = per_token_bytes / bandwidth

    print(
        f"\nmodel: {size_mb:.0f} MB fp32, {cfg.num_layers} layers, dim {cfg.dim}, {cfg.moe.num_experts} experts "
        f"top-{cfg.moe.top_k} (F={cfg.moe.ffn_dim}), vocab {cfg.vocab_size}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; batch 1, {PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens, greedy"
    )
    print(
        f"bound: {per_token_bytes / 1e6:.1f} MB read per token / {bandwidth / 1e9:.1f} GB/s (large GEMV) "
        f"= {bound_s * 1e3:.2f} ms/token\n"
    )
    print("| engine | ms/token | tokens/s | x bound | speedup vs transformers |")
    print("|---|---:|---:|---:|---:|")
    hf_s = rows[-1][1] if hf is not None else None
    rows.append(("memory-bandwidth bound", bound_s))
    for name, s in rows:
        vs = f"{hf_s / s:.2f}x" if hf_s else "-"
        print(f"| {name} | {s * 1e3:.2f} | {1 / s:.1f} | {s / bound_s:.2f} | {vs} |")


if __name__ == "__main__":
    main()
