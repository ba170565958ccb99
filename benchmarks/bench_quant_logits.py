"""The ``logits`` section of bench_quant_kernels.py: how far 8- and 4-bit logits move from fp32 in
moekit (native kernels) and in llama.cpp (q8_0 / q4_0) on the same trained weights, and the
perplexity each pays.

Windows: ``--windows`` held-out windows of 128 tokens from the run's validation split (what
``moekit eval`` reads). moekit: the run's fp32 model, and the same model quantized with every
linear (``include_non_experts``: attention, experts, lm_head; routers, norms, embedding stay
fp32) at group 32 (the q8_0/q4_0 block) and 128, run through the native kernels on every
position (block-32 int8 activations, as in decode), and through ``dequant`` (fp32 activations:
the weights' error alone). llama.cpp: ``export_gguf`` of the fp32 model
as f32, q8_0 and q4_0 (every 2-D matrix but the routers, embedding included), all logits of each
window from ``Llama.eval``. Errors are against each engine's own fp32 logits (and moekit fp32 vs
llama.cpp f32 as the check that both run the same model).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _windows(folder: Path, tok, num: int, seq: int = 128) -> list[torch.Tensor]:
    from moekit.cli.common import evaluation_tokens
    from moekit.data import eval_batches

    tokens = evaluation_tokens(tok, folder, None)
    batches = eval_batches(tokens, seq, 1, num)
    return [b[0] for b in batches]


def _moekit_logits(model, windows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(w[None]).logits[0].float() for w in windows]


def _llama_logits(path: Path, windows, threads: int) -> list[torch.Tensor]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=threads, verbose=False
    )
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        out.append(torch.from_numpy(np.array(llm.scores[: len(w)], dtype=np.float32)))
    del llm
    return out


def _compare(ref, test) -> dict:
    """Max abs logit error over all positions, its median over positions, mean and median KL, and
    the share of positions whose argmax changed (a routing flip moves a few positions a lot, so
    the medians show the typical position)."""
    abs_p, kl_p, flips = [], [], 0
    for a, b in zip(ref, test, strict=True):
        abs_p.append((a - b).abs().amax(-1))
        la, lb = a.double().log_softmax(-1), b.double().log_softmax(-1)
        kl_p.append((la.exp() * (la - lb)).sum(-1))
        flips += int((a.argmax(-1) != b.argmax(-1)).sum())
    abs_p, kl_p = torch.cat(abs_p), torch.cat(kl_p)
    return {
        "max_abs": float(abs_p.max()),
        "median_abs": float(abs_p.median()),
        "mean_kl": float(kl_p.mean()),
        "median_kl": float(kl_p.median()),
        "top1_changed": flips / len(abs_p),
    }


def _ppl(logits, windows) -> float:
    nll, n = 0.0, 0
    for lg, w in zip(logits, windows, strict=True):
        nll += float(torch.nn.functional.cross_entropy(lg[:-1].double(), w[1:], reduction="sum"))
        n += len(w) - 1
    return math.exp(nll / n)


def bench_logits(args) -> None:
    """Runs the comparison and emits one record per (engine, format)."""
    from bench_quant_kernels import emit

    from moekit.compress import QuantConfig, quantize_model
    from moekit.compress import kernels as qkernels
    from moekit.compress.gguf_export import export_gguf
    from moekit.loader import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(args.run)
    model, tok, folder = loaded.model.eval(), loaded.tokenizer, loaded.folder
    windows = _windows(folder, tok, args.windows)
    ref = _moekit_logits(model, windows)
    base = {
        "section": "logits",
        "model": str(folder),
        "windows": len(windows),
        "tokens": sum(map(len, windows)),
    }
    emit({**base, "engine": "moekit", "format": "fp32", "ppl": _ppl(ref, windows)})
    # The native kernels run every position (prefill too): the decode math.
    formats = [(b, g, "native") for b in (8, 4) for g in (32, 128)] + [(8, 32, "dequant"), (4, 32, "dequant")]
    for bits, group, kernel in formats:
        cfg = QuantConfig(bits=bits, group_size=group, include_non_experts=True, kernel=kernel)
        q = quantize_model(copy.deepcopy(model), cfg)
        assert all(m.kernel == kernel for m in q.modules() if isinstance(m, qkernels.PackedLinear))
        t0 = time.perf_counter()
        lg = _moekit_logits(q, windows)
        emit(
            {
                **base,
                "engine": "moekit",
                "format": f"int{bits} g{group} {kernel}",
                "bits_per_weight": bits + 24 / group,
                "ppl": _ppl(lg, windows),
                **_compare(ref, lg),
                "s": time.perf_counter() - t0,
            }
        )
        del q
    tokenizer_json = folder / "tokenizer.json"
    with tempfile.TemporaryDirectory() as tmp:
        llama_ref = None
        for fmt, bpw in (("f32", 32.0), ("q8_0", 8.5), ("q4_0", 4.5)):
            path = export_gguf(model, Path(tmp) / f"m-{fmt}.gguf", fmt, tokenizer_json)
            lg = _llama_logits(path, windows, args.threads)
            if llama_ref is None:
                llama_ref = lg
                emit(
                    {
                        **base,
                        "engine": "llama.cpp",
                        "format": fmt,
                        "ppl": _ppl(lg, windows),
                        "vs_moekit_fp32": _compare(ref, lg),
                    }
                )
                continue
            rec = {
                **base,
                "engine": "llama.cpp",
                "format": fmt,
                "bits_per_weight": bpw,
                "ppl": _ppl(lg, windows),
            }
            emit({**rec, **_compare(llama_ref, lg)})
