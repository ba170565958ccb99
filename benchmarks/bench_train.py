"""Training throughput: moekit against transformers' MixtralForCausalLM of the same sizes, side by side.

    python benchmarks/bench_train.py              # moe-small sizes, batch 16 x 256, fp32
    python benchmarks/bench_train.py --quick      # smoke test
    python benchmarks/bench_train.py --onednn-ab  # moekit's step with oneDNN products vs MOEKIT_ONEDNN=0

One training step = forward with labels (LM loss + load-balance aux loss) + backward + AdamW
step + zero_grad. Candidates run in interleaved rounds; the median step time is reported as
tokens/s. moekit runs the same architecture as Mixtral (no q/k norm, untied embeddings) and,
as a second row, its default preset (with per-head q/k RMSNorm). moekit's rows run the step as
its training engine does (``CausalLMObjective``: the LM head and its cross-entropy fused chunk by
chunk, ``moekit.kernels.linear_ce``); one more row runs ``model(ids, labels=...)``, which
materializes the logits as transformers does.

The profile times each part of a moekit step in isolation, forward + backward with the step's
shapes: embeddings, attention (with its norms and rope), router, experts (the MoE layer minus
its router), the dense FFN of the dense layers (moe-small's layer 0), lm_head + loss, and the
optimizer. Their sum is printed beside the measured step,
so the breakdown is checked, not guessed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.kernels.linear_ce import linear_cross_entropy
from moekit.models import MoEForCausalLM, get_preset
from moekit.models.objectives import CausalLMObjective, LossWeights


def timed_rounds(candidates: dict, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call, interleaved rounds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for k, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def hf_mixtral(cfg, impl: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = cfg.moe
    hcfg = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=moe.ffn_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.attn_num_kv_heads,
        head_dim=cfg.attn_head_dim,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        router_aux_loss_coef=cfg.aux_loss_coef,
        output_router_logits=True,
        tie_word_embeddings=False,
    )
    hcfg._experts_implementation = impl
    hcfg._attn_implementation = "sdpa"
    return MixtralForCausalLM(hcfg)


def step_fn(model, batch, is_hf: bool, engine: bool = True):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    objective = (
        None if is_hf or not engine else CausalLMObjective(LossWeights.from_model_config(model.config))
    )

    def step():
        if is_hf:
            out = model(input_ids=inputs, labels=batch[:, :-1], output_router_logits=True)
        elif objective is not None:
            out = objective.loss(objective.forward(model, batch), batch)
        else:
            out = model(inputs, labels=batch[:, :-1])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    del labels
    return step


def profile_parts(model: MoEForCausalLM, batch: torch.Tensor, rounds: int) -> dict[str, float]:
    """Seconds of forward+backward of each part with the step's shapes (see module docstring)."""
    cfg = model.config
    num_b, seq = batch.shape[0], batch.shape[1] - 1
    inputs = batch[:, :-1]
    hidden = torch.randn(num_b, seq, cfg.dim, requires_grad=True)
    g = torch.randn(num_b, seq, cfg.dim)
    moe_layers = [layer for layer in model.layers if layer.is_moe]
    dense_layers = [layer for layer in model.layers if not layer.is_moe]
    layer = moe_layers[0]  # attention is timed on it too: every layer's attention is alike
    pos = torch.arange(seq).expand(num_b, seq)
    cos, sin = model.rotary(pos, seq)
    moe = layer.mlp
    dense_ffn = dense_layers[0].mlp if dense_layers else None

    def emb():
        model.embed_tokens(inputs).backward(g)

    def attn():
        out = layer.self_attn(layer.input_layernorm(hidden), cos, sin, None, None)
        out.backward(g)

    def router():
        r = moe.router(hidden.reshape(-1, cfg.dim))
        (r.weights_TK.sum() + r.probs_TE.sum()).backward()

    def moe_full():
        out = moe(layer.post_attention_layernorm(hidden))
        (out.hidden * g).sum().backward()

    def dense_full():
        if dense_ffn is not None:
            (dense_ffn(layer.post_attention_layernorm(hidden)) * g).sum().backward()

    def head():  # as the engine's objective runs it: fused, chunk by chunk
        h_ND = model.norm(hidden).reshape(-1, cfg.dim)
        linear_cross_entropy(
            h_ND, model.lm_head.weight, model.lm_head.bias, batch[:, 1:].reshape(-1)
        ).backward()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def optim():
        opt.step()

    res = timed_rounds(
        {
            "embeddings": emb,
            "attention": attn,
            "router": router,
            "moe": moe_full,
            "dense_ffn": dense_full,
            "lm_head+loss": head,
            "optimizer": optim,
        },
        rounds,
    )
    model.zero_grad(set_to_none=True)
    n, n_moe, n_dense = cfg.num_layers, len(moe_layers), len(dense_layers)
    return {
        "embeddings": res["embeddings"],
        "attention (all layers)": n * res["attention"],
        f"router ({n_moe} MoE layers)": n_moe * res["router"],
        f"experts ({n_moe} MoE layers)": n_moe * (res["moe"] - res["router"]),
        f"dense FFN ({n_dense} layers)": n_dense * res["dense_ffn"],
        "lm_head + loss": res["lm_head+loss"],
        "optimizer": res["optimizer"],
    }


def onednn_ab(model, batch, tokens: int, args) -> None:
    """moekit's training step with ``moekit.kernels.gemm`` on oneDNN against ``MOEKIT_ONEDNN=0``
    (torch.mm, MKL), one model, interleaved rounds (the switch is read on every product)."""
    import os

    step = step_fn(model, batch, False)

    def with_onednn(flag: str):
        def run() -> None:
            os.environ["MOEKIT_ONEDNN"] = flag
            step()

        return run

    res = timed_rounds(
        {"oneDNN products": with_onednn("1"), "MOEKIT_ONEDNN=0 (MKL)": with_onednn("0")}, args.rounds
    )
    os.environ["MOEKIT_ONEDNN"] = "1"
    print(
        f"# moekit training step, {args.preset} sizes, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print("| products | step (s) | tokens/s |")
    print("|---|---|---|")
    for name, t in res.items():
        print(f"| {name} | {t:.3f} | {tokens / t:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="moe-small")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="moekit.train.cpu_memory.keep_freed_memory() first (process-wide: every candidate gets it)",
    )
    p.add_argument(
        "--onednn-ab",
        action="store_true",
        help="only moekit's step, with its products on oneDNN and with MOEKIT_ONEDNN=0, interleaved",
    )
    args = p.parse_args()
    if args.keep_freed_memory:
        from moekit.train.cpu_memory import keep_freed_memory

        print(f"# keep_freed_memory: {keep_freed_memory()}")
    if args.quick:
        args.batch_size, args.seq_len, args.rounds = 2, 32, 2
    torch.manual_seed(0)
    default_cfg = get_preset(args.preset)
    if args.quick:
        default_cfg = get_preset("moe-tiny")
    mixtral_like = default_cfg.replace(qk_norm="none")
    batch = torch.randint(0, default_cfg.vocab_size, (args.batch_size, args.seq_len + 1))
    tokens = args.batch_size * args.seq_len
    models = {
        "moekit (Mixtral architecture)": (MoEForCausalLM(mixtral_like).train(), False),
        "moekit (default preset, q/k norm)": (MoEForCausalLM(default_cfg).train(), False),
        "transformers Mixtral, experts=eager": (hf_mixtral(mixtral_like, "eager").train(), True),
        "transformers Mixtral, experts=grouped_mm": (hf_mixtral(mixtral_like, "grouped_mm").train(), True),
    }
    if args.onednn_ab:
        onednn_ab(models["moekit (Mixtral architecture)"][0], batch, tokens, args)
        return
    steps = {name: step_fn(m, batch, hf) for name, (m, hf) in models.items()}
    mixtral_moekit = models["moekit (Mixtral architecture)"][0]
    steps["moekit (Mixtral architecture), logits materialized"] = step_fn(
        mixtral_moekit, batch, False, engine=False
    )
    res = timed_rounds(steps, args.rounds)
    base = res["moekit (Mixtral architecture)"]
    print(
        f"# training step, {args.preset} sizes, batch {args.batch_size} x {args.seq_len}, fp32, {torch.get_num_threads()} threads"
    )
    print("| model | step (s) | tokens/s | moekit speed-up |")
    print("|---|---|---|---|")
    for name, t in res.items():
        print(f"| {name} | {t:.3f} | {tokens / t:,.0f} | {t / base:.2f}x |")
    parts = profile_parts(models["moekit (Mixtral architecture)"][0], batch, args.rounds)
    total = sum(parts.values())
    print(
        f"\n# where a moekit step goes (parts timed alone; sum {total:.3f} s vs measured step {base:.3f} s)"
    )
    print("| part | seconds | share |")
    print("|---|---|---|")
    for name, t in parts.items():
        print(f"| {name} | {t:.3f} | {t / total:.0%} |")


if __name__ == "__main__":
    main()
