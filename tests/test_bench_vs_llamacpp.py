"""benchmarks/bench_vs_llamacpp.py's pieces on a tiny model: building, export, bytes, arguments.

The llama.cpp parts skip with a reason when llama-cpp-python (the ``bench`` extra) is not
installed; the converter check also needs ``LLAMA_CPP_CONVERT`` (see the benchmark's docstring).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="GGUF export needs the gguf package (the compress/dev extra)")
pytest.importorskip("tokenizers", reason="the synthetic tokenizer needs tokenizers (the hf/dev extra)")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_llamacpp.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_paths(bench, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench-vs-llamacpp")
    return bench.prepare(bench.SIZES["tiny"], workdir, ("f32", "q8_0"), (8,))


def test_the_model_is_mixtral_shaped_with_spread_logits(bench):
    shape = bench.SIZES["100m"]
    cfg = bench.model_config(shape)
    assert (cfg.dim, cfg.moe.ffn_dim, cfg.num_layers, cfg.moe.num_experts, cfg.moe.top_k) == (
        512,
        2048,
        4,
        8,
        2,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (8, 2, 32000)
    model = bench.build_model(bench.SIZES["tiny"])
    with torch.no_grad():
        logits = model(torch.randint(0, 511, (1, 16))).logits
    assert 0.7 * bench.LOGIT_STD < logits.std() < 1.3 * bench.LOGIT_STD  # neither flat nor degenerate
    assert logits.argmax(-1).unique().numel() > 8  # different positions pick different tokens


def test_the_synthetic_tokenizer_has_one_id_per_row(bench, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bench.synthetic_tokenizer(300, tmp_path / "tokenizer.json")))
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id("<|endoftext|>") == 299
    assert tok.decode(tok.encode("ab c").ids) == "ab c"


def test_prepare_writes_a_moekit_folder_its_quantized_copy_and_ggufs(bench, tiny_paths):
    from gguf import GGUFReader

    import moekit

    shape = bench.SIZES["tiny"]
    model = moekit.from_pretrained(tiny_paths["moekit"])
    q8 = moekit.from_pretrained(tiny_paths["moekit-int8"])
    assert q8.quant_config.bits == 8 and q8.quant_config.group_size == 32
    names = {t.name for t in GGUFReader(str(tiny_paths["f32"])).tensors}
    assert {"token_embd.weight", "blk.1.ffn_gate_exps.weight", "output.weight"} <= names
    # f32 in both: the same bytes per token (norms and routers are f32 in both too).
    ours, theirs = bench.moekit_active_bytes(model, shape), bench.gguf_active_bytes(tiny_paths["f32"], shape)
    assert ours == pytest.approx(theirs, rel=1e-3)
    # q8_0 stores 34 bytes per 32 weights; the int8 folder's codes plus scales come close.
    q8_bytes = bench.gguf_active_bytes(tiny_paths["q8_0"], shape)
    assert 0.2 * theirs < q8_bytes < 0.4 * theirs
    assert bench.moekit_active_bytes(q8, shape) < 0.5 * ours


def test_prepare_reuses_the_artifacts(bench, tiny_paths):
    stamp = tiny_paths["f32"].stat().st_mtime_ns
    again = bench.prepare(bench.SIZES["tiny"], tiny_paths["moekit"].parent, ("f32",), ())
    assert again["f32"].stat().st_mtime_ns == stamp


def test_active_bytes_counts_top_k_experts_and_one_embedding_row(bench):
    shape = bench.SIZES["tiny"]  # 4 experts top-2, vocab 512
    items = [("token_embd.weight", 512 * 10), ("blk.0.ffn_up_exps.weight", 400), ("output.weight", 7)]
    assert bench.active_bytes(items, shape) == 10 + 200 + 7


def test_arguments(bench):
    args = bench.parse_args(["--quick", "--rows", "decode,q4", "--threads", "1,2", "--size", "tiny"])
    assert (args.rounds, args.new_tokens, args.prefill) == (3, 16, 128)
    assert args.rows == ["decode", "q4"] and args.threads == [1, 2]
    assert args.workdir.name == "tiny"
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "decode,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--new-tokens", "1"])


def test_markdown_table(bench):
    rec = {"size": "tiny", "row": "decode, fp32 vs f32", "threads": 1, "ratio": 0.5, "moekit GB/s": None}
    table = bench.markdown([rec]).splitlines()
    assert table[0].startswith("| size | row | threads |") and len(table) == 3
    assert "| 0.5 |" in table[2] and "| - |" in table[2]


def test_llama_cpp_rows_run_and_match_moekit(bench, tiny_paths, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the bench extra)")
    workdir = str(tiny_paths["moekit"].parent)
    argv = ["--size", "tiny", "--quick", "--rows", "check,decode,q8", "--threads", "1", "--workdir", workdir]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0  # sets torch's thread count per row
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| tiny | decode, fp32 vs f32 | 1 |" in out and "| tiny | decode, int8 vs q8_0 | 1 |" in out
    model = bench.build_model(bench.SIZES["tiny"])
    prompt = list(range(3, 40))
    diffs = bench.logits_check(model, {"f32": tiny_paths["f32"]}, prompt)
    assert diffs["f32"] < 1e-4 and diffs["f32 argmax agree"] == 1.0
    llm = bench.open_llama(tiny_paths["f32"], threads=1, n_ctx=128)
    assert bench.llama_greedy(llm, prompt, 8) == bench.moekit_greedy(model, prompt, 8)


def test_llama_cpp_converter_agrees_with_moekit_export(bench, tiny_paths):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the bench extra)")
    script = os.environ.get("LLAMA_CPP_CONVERT")
    if not script or not Path(script).is_file():
        pytest.skip("LLAMA_CPP_CONVERT does not name llama.cpp's convert_hf_to_gguf.py")
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports sentencepiece")
    import moekit

    converted = bench.convert_with_llama_cpp(tiny_paths["moekit"], tiny_paths["moekit"].parent, Path(script))
    model = moekit.from_pretrained(tiny_paths["moekit"])
    diffs = bench.logits_check(model, {"ours": tiny_paths["f32"], "theirs": converted}, list(range(5, 30)))
    assert diffs["ours"] < 1e-4 and diffs["theirs"] < 1e-4
