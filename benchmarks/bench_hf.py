"""moekit vs transformers on the same weights: prefill forward and greedy generation, per family.

For each family a tiny-width, many-layer random model is built with transformers' own config
class, saved, and loaded into moekit (so the weights are identical). Rounds alternate between the
two libraries; the table reports medians and ``ratio = transformers_time / moekit_time`` (> 1 means
moekit is faster). Runs single-threaded by default so the numbers are stable on a shared CPU.

    .venv/bin/python benchmarks/bench_hf.py                      # hidden 64, 16 layers, 512 + 64 tokens
    .venv/bin/python benchmarks/bench_hf.py --prefill 32 --new-tokens 8 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import transformers as tr

from moekit.convert import from_pretrained


def configs(hidden: int, layers: int, vocab: int) -> dict:
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=4096,
    )
    moe = dict(num_experts_per_tok=2)
    return {
        "mixtral": tr.MixtralConfig(
            **common, **moe, intermediate_size=2 * hidden, num_key_value_heads=2, num_local_experts=4
        ),
        "qwen2_moe": tr.Qwen2MoeConfig(
            **common,
            **moe,
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden,
            shared_expert_intermediate_size=2 * hidden,
            num_key_value_heads=2,
            num_experts=4,
        ),
        "qwen3_moe": tr.Qwen3MoeConfig(
            **common,
            **moe,
            moe_intermediate_size=hidden,
            num_key_value_heads=2,
            num_experts=4,
            head_dim=hidden // 4,
            norm_topk_prob=True,
        ),
        "olmoe": tr.OlmoeConfig(
            **common, **moe, intermediate_size=hidden, num_key_value_heads=2, num_experts=4
        ),
        "deepseek_v3": tr.DeepseekV3Config(
            **common,
            **moe,
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden,
            n_routed_experts=4,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
        ),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_family(name: str, cfg, args) -> dict[str, float]:
    torch.manual_seed(0)
    hf = tr.AutoModelForCausalLM.from_config(cfg).eval()
    hf.generation_config.eos_token_id = None
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        mk = from_pretrained(d).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prefill))
    short = prompt[:, :16]

    def hf_prefill():
        hf(prompt, use_cache=False)

    def mk_prefill():
        mk(prompt)

    def hf_gen():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hf.generate(short, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def mk_gen():
        return mk.generate(short, max_new_tokens=args.new_tokens)

    times: dict[str, list[float]] = {k: [] for k in ("hf_prefill", "mk_prefill", "hf_gen", "mk_gen")}
    with torch.no_grad():
        same = torch.equal(hf_gen(), mk_gen())  # also a warm-up
        hf_prefill(), mk_prefill()
        for _ in range(args.rounds):
            times["hf_prefill"].append(timed(hf_prefill))
            times["mk_prefill"].append(timed(mk_prefill))
            times["hf_gen"].append(timed(hf_gen))
            times["mk_gen"].append(timed(mk_gen))
    med = {k: statistics.median(v) for k, v in times.items()}
    med["same_tokens"] = same
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = configs(args.hidden, args.layers, args.vocab)
    names = args.families or list(cfgs)
    print(
        f"hidden {args.hidden}, {args.layers} layers, 4 experts top-2, prefill {args.prefill} tokens, "
        f"greedy {args.new_tokens} tokens, {args.rounds} interleaved rounds, {args.threads} thread(s), "
        f"torch {torch.__version__}, transformers {tr.__version__}\n"
    )
    print(
        "| family | prefill HF (ms) | prefill moekit (ms) | ratio | generate HF (ms) | generate moekit (ms) | ratio | same ids |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in names:
        m = bench_family(name, cfgs[name], args)
        print(
            f"| {name} | {m['hf_prefill'] * 1e3:.1f} | {m['mk_prefill'] * 1e3:.1f} | "
            f"{m['hf_prefill'] / m['mk_prefill']:.2f} | {m['hf_gen'] * 1e3:.1f} | {m['mk_gen'] * 1e3:.1f} | "
            f"{m['hf_gen'] / m['mk_gen']:.2f} | {m['same_tokens']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
