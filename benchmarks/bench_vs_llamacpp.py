"""moekit against llama.cpp on the same weights: greedy decode, prefill, 8-bit and 4-bit (issue 19).

A Mixtral-shaped model with random weights is built in moekit and saved as a moekit folder. The
same weights go to llama.cpp through moekit's own ``moekit export-gguf`` (f32, q8_0, q4_0), and,
as a check of that exporter, through llama.cpp's ``convert_hf_to_gguf.py`` run on the HF export
(``save_pretrained(format="hf")``). The check prints the largest logit difference between
llama.cpp on moekit's GGUF, llama.cpp on its own converter's GGUF and moekit in fp32.

Sizes (vocab 32000, 8 experts top-2, GQA, untied lm_head):
    ``100m``  D=512,  F=2048, 4 layers, 8/2 heads: 177 MB of fp32 weights read per token, 545 MB total.
    ``1g``    D=1024, F=4096, 8 layers, 16/4 heads: 1.02 GB read per token, 3.57 GB total.

Timing. Both engines decode greedily at batch 1 from the same prompt ids with the same thread
count, in interleaved rounds (the order alternates each round), after a warm-up that also pages
in every mmapped weight. moekit runs ``model.generate(ids, max_new_tokens=N)``, the call a user
makes (``compile="auto"``: whatever main's default is). llama.cpp runs ``llama_cpp.Llama`` with
``logits_all=False``: ``eval(prompt)`` then ``eval([argmax])`` per token (greedy). Decode seconds
per token are ``(t(N new) - t(1 new)) / (N - 1)``, so the prefill is excluded the same way for
both. Prefill is the wall time of a 512-token prompt to its first token. Bandwidth is the bytes
of weights one decode step reads (non-expert matrices, one embedding row, the top-k experts, in
each engine's own storage) times tokens/s. Tables report medians; ratio = moekit / llama.cpp
(> 1 means moekit is faster).

Install (llama-cpp-python builds from source, 3-10 minutes on 2 cores)::

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e '.[bench]'

llama.cpp's converter is not part of the wheel. Unpack it from the sdist and point at it with
``--convert-script`` or ``LLAMA_CPP_CONVERT``::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    export LLAMA_CPP_CONVERT=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py

The synthetic byte-level BPE tokenizer has no entry in the converter's pre-tokenizer table, so it
is run with that lookup answering "gpt-2" (what moekit's exporter writes); nothing else changes.

Run (each row is a flag value; run big sizes one row per process to keep RAM low)::

    python benchmarks/bench_vs_llamacpp.py --quick                        # 100m, check + decode, 2 threads
    python benchmarks/bench_vs_llamacpp.py --size 100m --rows check,decode,prefill,q8,q4 --threads 1,2
    python benchmarks/bench_vs_llamacpp.py --size 1g --rows decode --threads 2
    python benchmarks/bench_vs_llamacpp.py --rows q8,q4 --group-size 128   # moekit quantize's default group

Artifacts (model folders, GGUF files) are cached under ``--workdir``
(default ``~/.cache/moekit/bench_vs_llamacpp``) and reused while the config is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moekit.layers import MoEConfig
from moekit.models import MoEForCausalLM
from moekit.models.config import ModelConfig


@dataclass(frozen=True)
class Shape:
    """A Mixtral-shaped model's dimensions."""

    dim: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    experts: int = 8
    top_k: int = 2


SIZES = {
    "100m": Shape(dim=512, ffn=2048, layers=4, heads=8, kv_heads=2),
    "1g": Shape(dim=1024, ffn=4096, layers=8, heads=16, kv_heads=4),
    "tiny": Shape(dim=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=512, experts=4),  # tests only
}
ROWS = ("check", "decode", "prefill", "q8", "q4", "q8-prefill", "q4-prefill")
# moekit quantize --bits B against the GGUF type with the same width; group 32 = q8_0/q4_0's block.
QUANT_ROWS = {"q8": (8, "q8_0"), "q4": (4, "q4_0"), "q8-prefill": (8, "q8_0"), "q4-prefill": (4, "q4_0")}
LOGIT_STD = 3.0  # the lm_head is scaled so that random logits have this spread (not all ties)


def model_config(shape: Shape) -> ModelConfig:
    """Mixtral conventions: no qk norm, rope theta 1e6, softmax top-k renormalised, untied head."""
    return ModelConfig(
        vocab_size=shape.vocab,
        dim=shape.dim,
        num_layers=shape.layers,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        head_dim=shape.dim // shape.heads,
        ffn_dim=shape.ffn,
        moe=MoEConfig(
            dim=shape.dim,
            ffn_dim=shape.ffn,
            num_experts=shape.experts,
            top_k=shape.top_k,
            norm_topk_prob=True,
        ),
        moe_placement="all",
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


@torch.no_grad()
def build_model(shape: Shape, seed: int = 0) -> MoEForCausalLM:
    """Random weights at 1/sqrt(fan_in) (each layer keeps its input's scale, so the residual stream and
    the routers are not dominated by one layer), norms at 1, and the lm_head set to give logits of
    spread :data:`LOGIT_STD` after the final RMSNorm."""
    torch.manual_seed(seed)
    model = MoEForCausalLM(model_config(shape)).eval()
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        elif name == "embed_tokens.weight":
            p.normal_(0.0, 1.0)
        elif name == "lm_head.weight":
            p.normal_(0.0, LOGIT_STD / shape.dim**0.5)
        else:
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return model


def synthetic_tokenizer(vocab_size: int, path: Path) -> Path:
    """A byte-level BPE ``tokenizer.json`` with exactly ``vocab_size`` ids: the 256 byte symbols, two-byte
    merges, and ``<|endoftext|>`` last (llama.cpp needs one token per embedding row)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = list(pre_tokenizers.ByteLevel.alphabet())
    symbols.sort()
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = []
    for a in symbols:
        for b in symbols:
            if len(vocab) >= vocab_size - 1:
                break
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def _cli(*argv: str) -> None:
    from moekit.cli.main import main

    code = main(list(argv))
    if code:
        raise RuntimeError(f"moekit {' '.join(argv)} exited with {code}")


def prepare(
    shape: Shape, workdir: Path, gguf_types=("f32",), quant_bits=(), seed: int = 0, group_size: int = 32
) -> dict:
    """Builds (or reuses) the moekit folder, its quantized folders and GGUF exports under ``workdir``.

    Returns ``{"moekit": folder, "moekit-int8": folder, "f32": gguf, "q8_0": gguf, ...}``.
    """
    key = json.dumps({**shape.__dict__, "seed": seed, "logit_std": LOGIT_STD}, sort_keys=True)
    folder = workdir / "moekit"
    stamp = workdir / "stamp.json"
    if not stamp.is_file() or stamp.read_text() != key:
        model = build_model(shape, seed)
        model.save_pretrained(folder)
        del model
        synthetic_tokenizer(shape.vocab, folder / "tokenizer.json")
        for old in workdir.glob("*.gguf"):
            old.unlink()
        for old in workdir.glob("moekit-int*"):
            subprocess.run(["rm", "-rf", str(old)], check=True)
        stamp.write_text(key)
    paths: dict = {"moekit": folder}
    for bits in quant_bits:
        out = workdir / (f"moekit-int{bits}" + ("" if group_size == 32 else f"-g{group_size}"))
        if not (out / "config.json").is_file():
            _cli(
                "quantize", "--model", str(folder), "--out", str(out), "--bits", str(bits),
                "--group-size", str(group_size), "--include-non-experts",
            )  # fmt: skip
        paths[f"moekit-int{bits}"] = out
    for gtype in gguf_types:
        out = workdir / f"moekit-{gtype}.gguf"
        if not out.is_file():
            _cli("export-gguf", "--model", str(folder), "--out", str(out), "--type", gtype)
        paths[gtype] = out
    return paths


# The converter, run with only its pre-tokenizer lookup wrapped (see the module docstring).
_CONVERT = """
import runpy, sys
script = sys.argv[1]
sys.path.insert(0, script.rsplit('/', 1)[0])
from conversion import base
for cls in vars(base).values():
    if isinstance(cls, type) and 'get_vocab_base_pre' in vars(cls):
        original = cls.get_vocab_base_pre
        def lookup(self, tokenizer, original=original):
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                return 'gpt-2'
        cls.get_vocab_base_pre = lookup
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
"""


def convert_with_llama_cpp(folder: Path, workdir: Path, script: Path) -> Path:
    """llama.cpp's own HF-to-GGUF conversion (f32) of moekit's HF export of ``folder``."""
    out = workdir / "llamacpp-convert-f32.gguf"
    if out.is_file():
        return out
    import shutil

    import moekit

    hf = workdir / "hf"
    moekit.from_pretrained(folder).save_pretrained(hf, format="hf")
    shutil.copy(folder / "tokenizer.json", hf / "tokenizer.json")
    cmd = [sys.executable, "-c", _CONVERT, str(script), str(hf), "--outtype", "f32", "--outfile", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    shutil.rmtree(hf)
    return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def active_bytes(items, shape: Shape) -> int:
    """Bytes of weights one decode step reads, from ``(name, nbytes)`` pairs: expert tensors count
    ``top_k / experts`` of their size, the embedding table one row, everything else whole."""
    total = 0.0
    for name, size in items:
        if "exps" in name or ".experts." in name:
            total += size * shape.top_k / shape.experts
        elif "embed" in name or "token_embd" in name:
            total += size / shape.vocab
        else:
            total += size
    return int(total)


def moekit_active_bytes(model, shape: Shape) -> int:
    return active_bytes(((n, _nbytes(t)) for n, t in model.state_dict().items()), shape)


def gguf_active_bytes(path: Path, shape: Shape) -> int:
    from gguf import GGUFReader

    return active_bytes(((t.name, int(t.n_bytes)) for t in GGUFReader(str(path)).tensors), shape)


def open_llama(
    path: Path, threads: int, n_ctx: int = 1024, logits_all: bool = False, f32_cache: bool = False
):
    """``llama_cpp.Llama`` on ``path``; ``f32_cache`` keeps the KV cache in f32 (default f16) for the check."""
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
        **cache,
    )


def llama_greedy(llm, prompt: list[int], new: int) -> list[int]:
    """Greedy decode: the prompt, then one eval per new token but the last (as moekit's generate). With
    ``logits_all=False`` llama.cpp keeps only the last position's logits, read from the context."""
    llm.reset()
    llm.eval(prompt)
    out = []
    vocab = llm.n_vocab()
    for i in range(new):
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
        out.append(tok)
        if i + 1 < new:
            llm.eval([tok])
    return out


@torch.no_grad()
def moekit_greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    return model.generate(ids, max_new_tokens=new, do_sample=False)[0, len(prompt) :].tolist()


def logits_check(model, gguf_paths: dict, prompt: list[int]) -> dict:
    """Max |logit difference| over the prompt's positions: each GGUF in llama.cpp against moekit fp32."""
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].float().numpy()
    out = {"logit_std": float(ref.std())}
    for label, path in gguf_paths.items():
        llm = open_llama(
            path, threads=torch.get_num_threads(), n_ctx=len(prompt) + 8, logits_all=True, f32_cache=True
        )
        llm.reset()
        llm.eval(prompt)
        got = np.asarray(llm.scores[: len(prompt)])
        out[label] = float(np.abs(got - ref).max())
        out[label + " argmax agree"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
        del llm
    return out


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def time_decode(engines: dict, prompt: list[int], new: int, rounds: int) -> dict:
    """Seconds per decoded token per engine, prefill excluded, interleaved rounds; ``{name: [s, ...]}``."""
    names = list(engines)
    per_token = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = engines[name]
            t1 = _timed(fn, prompt, 1)
            tn = _timed(fn, prompt, new)
            per_token[name].append(max(tn - t1, 1e-9) / (new - 1))
    return per_token


def time_prefill(engines: dict, prompt: list[int], rounds: int) -> dict:
    """Seconds from a long prompt to its first token per engine, interleaved rounds."""
    names = list(engines)
    secs = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            secs[name].append(_timed(engines[name], prompt, 1))
    return secs


def _engines(model, llm) -> dict:
    return {
        "moekit": lambda p, n: moekit_greedy(model, p, n),
        "llama.cpp": lambda p, n: llama_greedy(llm, p, n),
    }


def _warm(engines: dict, prompt: list[int], new: int) -> dict:
    """Runs each engine twice (pages in mmapped weights, builds kernels and graphs); returns its tokens."""
    toks = {}
    for name, fn in engines.items():
        fn(prompt, new)
        toks[name] = fn(prompt, new)
    return toks


def run_row(row: str, shape: Shape, size: str, paths: dict, threads: int, args) -> list[dict]:
    """Times one row at one thread count; returns table records."""
    import moekit

    torch.set_num_threads(threads)
    rng = np.random.default_rng(args.seed)
    if row in QUANT_ROWS:
        bits, gtype = QUANT_ROWS[row]
        folder, gguf_path, label = paths[f"moekit-int{bits}"], paths[gtype], f"int{bits} vs {gtype}"
        if args.group_size != 32:
            label = f"int{bits} g{args.group_size} vs {gtype}"
    else:
        folder, gguf_path, label = paths["moekit"], paths["f32"], "fp32 vs f32"
    model = moekit.from_pretrained(folder).eval()
    llm = open_llama(gguf_path, threads, n_ctx=args.prefill + args.new_tokens + 64)
    engines = _engines(model, llm)
    bytes_per_tok = {
        "moekit": moekit_active_bytes(model, shape),
        "llama.cpp": gguf_active_bytes(gguf_path, shape),
    }
    if row == "prefill" or row.endswith("-prefill"):
        prompt = rng.integers(0, shape.vocab - 1, args.prefill).tolist()
        _warm(engines, prompt, 1)
        secs = time_prefill(engines, prompt, args.rounds)
        med = {n: statistics.median(s) for n, s in secs.items()}
        rate = {n: args.prefill / med[n] for n in med}
        kind, note = f"prefill {args.prefill}", {}
    else:
        prompt = rng.integers(0, shape.vocab - 1, args.prompt_len).tolist()
        toks = _warm(engines, prompt, args.new_tokens)
        secs = time_decode(engines, prompt, args.new_tokens, args.rounds)
        med = {n: statistics.median(s) for n, s in secs.items()}
        rate = {n: 1.0 / med[n] for n in med}
        agree = sum(a == b for a, b in zip(toks["moekit"], toks["llama.cpp"])) / len(toks["moekit"])
        kind, note = "decode", {"same tokens": f"{agree:.0%}"}
    compiled = bool(getattr(model, "decode_compiled", False))
    rec = {
        "size": size,
        "row": f"{kind}, {label}",
        "threads": threads,
        "moekit tok/s": rate["moekit"],
        "llama.cpp tok/s": rate["llama.cpp"],
        "ratio": rate["moekit"] / rate["llama.cpp"],
        "moekit GB/s": bytes_per_tok["moekit"] * rate["moekit"] / 1e9 if kind == "decode" else None,
        "llama.cpp GB/s": bytes_per_tok["llama.cpp"] * rate["llama.cpp"] / 1e9 if kind == "decode" else None,
        "MB/token (moekit, llama.cpp)": ", ".join(f"{b / 1e6:.1f}" for b in bytes_per_tok.values()),
        "rounds": len(secs["moekit"]),
        "spread": " / ".join(f"{min(s):.4g}-{max(s):.4g}s" for s in secs.values()),
        "compiled step": compiled,
        **note,
    }
    print(json.dumps(rec), flush=True)
    del llm
    return [rec]


def markdown(records: list[dict]) -> str:
    cols = [
        "size", "row", "threads", "moekit tok/s", "llama.cpp tok/s", "ratio", "moekit GB/s", "llama.cpp GB/s",
        "MB/token (moekit, llama.cpp)", "same tokens", "compiled step", "rounds",
    ]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for rec in records:
        cells = []
        for c in cols:
            v = rec.get(c)
            cells.append("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="100m", choices=sorted(SIZES))
    p.add_argument("--rows", default="check,decode", help=f"comma-separated, from {','.join(ROWS)}")
    p.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64, help="N in (t(N new) - t(1 new)) / (N - 1)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--group-size",
        type=int,
        default=32,
        help="moekit quantize --group-size for q8/q4 (32 = q8_0/q4_0's block, about the same bytes)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="artifact cache (default ~/.cache/moekit/...)")
    p.add_argument(
        "--convert-script",
        type=Path,
        default=os.environ.get("LLAMA_CPP_CONVERT"),
        help="llama.cpp's convert_hf_to_gguf.py for the check row (default: $LLAMA_CPP_CONVERT)",
    )
    p.add_argument("--quick", action="store_true", help="3 rounds of 16 new tokens, 128-token prefill")
    p.add_argument(
        "--prepare-only", action="store_true", help="build the artifacts the rows need, time nothing"
    )
    p.add_argument("--json", type=Path, default=None, help="also append the records to this JSONL file")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = sorted(set(args.rows) - set(ROWS))
    if bad:
        p.error(f"--rows: unknown {bad}; choose from {list(ROWS)}")
    args.threads = [int(t) for t in str(args.threads).split(",")]
    if args.quick:
        args.rounds, args.new_tokens, args.prefill = 3, 16, 128
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is t(N) - t(1))")
    if args.workdir is None:
        args.workdir = Path.home() / ".cache" / "moekit" / "bench_vs_llamacpp" / args.size
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = SIZES[args.size]
    quant_bits = [QUANT_ROWS[r][0] for r in args.rows if r in QUANT_ROWS]
    types = ["f32"] + sorted({QUANT_ROWS[r][1] for r in args.rows if r in QUANT_ROWS})
    t0 = time.perf_counter()
    paths = prepare(shape, args.workdir, types, quant_bits, args.seed, args.group_size)
    print(f"# artifacts ready in {time.perf_counter() - t0:.0f}s under {args.workdir}", flush=True)
    records = []
    if args.prepare_only:
        if "check" in args.rows and args.convert_script:
            convert_with_llama_cpp(paths["moekit"], args.workdir, Path(args.convert_script))
        return 0
    if "check" in args.rows:
        import moekit

        ggufs = {"moekit export-gguf f32": paths["f32"]}
        if args.convert_script:
            ggufs["llama.cpp convert f32"] = convert_with_llama_cpp(
                paths["moekit"], args.workdir, Path(args.convert_script)
            )
        else:
            print("# no --convert-script / LLAMA_CPP_CONVERT: the converter check is skipped", flush=True)
        torch.set_num_threads(max(args.threads))
        prompt = np.random.default_rng(args.seed).integers(0, shape.vocab - 1, args.prompt_len).tolist()
        model = moekit.from_pretrained(paths["moekit"]).eval()
        for row in args.rows:
            if row in QUANT_ROWS:
                bits, gtype = QUANT_ROWS[row]
                ggufs[f"moekit export-gguf {gtype}"] = paths[gtype]
        result = logits_check(model, ggufs, prompt)
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0]
            for bits in quant_bits:
                q = moekit.from_pretrained(paths[f"moekit-int{bits}"]).eval()
                result[f"moekit int{bits}"] = float((q(torch.tensor([prompt])).logits[0] - ref).abs().max())
                del q
        print("# logits vs moekit fp32 (max |diff|):", json.dumps(result), flush=True)
        del model
    for row in args.rows:
        if row == "check":
            continue
        for threads in args.threads:
            records += run_row(row, shape, args.size, paths, threads, args)
    if records:
        print(markdown(records))
        if args.json:
            with args.json.open("a") as f:
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
