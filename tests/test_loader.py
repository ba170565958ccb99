"""The one loader: every folder kind opens through ``moekit.from_pretrained`` and every ``--model``
verb, Hugging Face folders included; corrupt or absurd folders fail fast with one line."""

from __future__ import annotations

import json
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli.main import main
from moekit.loader import inspect_folder, load_model_and_tokenizer
from moekit.models import MoEForCausalLM, get_preset

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

TEXT = "def parse(text):\n    return [line.split() for line in text.splitlines()]\n\n" * 40


@pytest.fixture(scope="module")
def tok():
    from moekit.data.tokenizer import train_tokenizer

    return train_tokenizer([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    """A tiny random Qwen3-MoE folder written by transformers itself, with a tokenizer.json."""
    from moekit.data.tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("hf") / "qwen3moe"
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        eos_token_id=0,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    save_tokenizer(tok, folder)
    return folder


@pytest.fixture(scope="module")
def moekit_dir(tmp_path_factory, tok):
    from moekit.data.tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("mk") / "model"
    config = get_preset("moe-tiny").replace(vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    MoEForCausalLM(config).save_pretrained(folder)
    save_tokenizer(tok, folder)
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_hf_folder_equals_transformers_through_the_loader(hf_dir):
    ids = torch.tensor([[5, 9, 14, 3, 7, 2]])
    ours = moekit.from_pretrained(hf_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert inspect_folder(hf_dir).kind == "hf"
    assert ours.config.eos_token_id == 0
    torch.testing.assert_close(_logits(ours, ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_every_folder_kind_opens(tmp_path, moekit_dir):
    ids = torch.tensor([[1, 5, 9, 2]])
    base = moekit.from_pretrained(moekit_dir)
    assert inspect_folder(moekit_dir).kind == "moekit"
    # A run folder and a checkpoint folder: the layout `moekit train` writes.
    run = tmp_path / "run"
    shutil.copytree(moekit_dir, run / "checkpoints" / "last")
    (run / "checkpoints" / "last" / "trainer_state.json").write_text("{}")
    assert inspect_folder(run).kind == "run"
    assert inspect_folder(run / "checkpoints" / "last").kind == "checkpoint"
    torch.testing.assert_close(_logits(moekit.from_pretrained(run), ids), _logits(base, ids))
    # A quantized folder written by `moekit quantize`.
    out = tmp_path / "q8"
    assert main(["quantize", "--model", str(moekit_dir), "--bits", "8", "--out", str(out)]) == 0
    assert inspect_folder(out).kind == "quantized"
    q = moekit.from_pretrained(out)
    assert q.quant_config.bits == 8
    torch.testing.assert_close(_logits(q, ids), _logits(base, ids), rtol=0.05, atol=0.05)
    loaded = load_model_and_tokenizer(out)
    assert loaded.eos_token_id == 0 and loaded.tokenizer.get_vocab_size() == base.config.vocab_size


def test_cli_verbs_take_an_hf_folder(hf_dir, tmp_path, capsys):
    d = str(hf_dir)
    assert (
        main(["generate", "--model", d, "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"])
        == 0
    )
    assert capsys.readouterr().out.startswith("def ")
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    assert (
        main(
            [
                "eval",
                "--model",
                d,
                "--corpus",
                str(corpus),
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--batches",
                "2",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens_scored"] == 64
    trace = tmp_path / "t.safetensors"
    args = [
        "trace",
        "--model",
        d,
        "--corpus",
        str(corpus),
        "--out",
        str(trace),
        "--tokens",
        "64",
        "--seq-len",
        "16",
    ]
    assert main(args) == 0 and trace.is_file()
    assert main(["quantize", "--model", d, "--bits", "4", "--out", str(tmp_path / "q4")]) == 0
    assert inspect_folder(tmp_path / "q4").kind == "quantized"
    assert main(["generate", "--model", str(tmp_path / "q4"), "--prompt", "x", "--max-new-tokens", "3"]) == 0
    pytest.importorskip("gguf")
    assert main(["export-gguf", "--model", d, "--out", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 10_000
    capsys.readouterr()


def test_upcycle_an_hf_dense_folder(tmp_path, tok, capsys):
    from moekit.data.tokenizer import save_tokenizer

    dense = tmp_path / "qwen3"
    cfg = transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(dense)
    save_tokenizer(tok, dense)
    out = tmp_path / "up"
    assert (
        main(["upcycle", "--model", str(dense), "--out", str(out), "--num-experts", "4", "--top-k", "2"]) == 0
    )
    up = moekit.from_pretrained(out)
    assert up.config.moe.num_experts == 4
    ids = torch.tensor([[3, 8, 1, 9]])
    # Upcycled at init equals its dense parent: every expert is a copy of the FFN.
    torch.testing.assert_close(
        _logits(up, ids), _logits(moekit.from_pretrained(dense), ids), rtol=1e-5, atol=1e-5
    )
    capsys.readouterr()


def test_quantized_folder_is_refused_where_float_weights_are_needed(moekit_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(moekit_dir), "--bits", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["upcycle", "--model", str(out), "--out", str(tmp_path / "u"), "--num-experts", "4"]) == 2
    assert "quantized folder" in capsys.readouterr().err


def test_hf_export_writes_eos_and_generation_config(moekit_dir, tmp_path):
    out = tmp_path / "hf"
    assert main(["convert", "--from", str(moekit_dir), "--to", str(out), "--format", "hf"]) == 0
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == 0


def test_unsupported_hf_family_lists_the_supported(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' is not supported; moekit reads .*mixtral"):
        moekit.from_pretrained(folder)


def test_not_a_model_folder(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and len(err.strip().splitlines()) == 1


def _corrupt(path: Path, case: str) -> None:
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    if case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "flipped header":
        body = bytearray(data)
        for i in range(8, 8 + 20):
            body[i] ^= 0xFF
        path.write_bytes(bytes(body))
    elif case == "huge header length":
        path.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif case == "huge tensor":
        header = json.loads(data[8 : 8 + header_len])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [10**9, 10**6]
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + header_len :])


@pytest.mark.parametrize(
    "case", ["truncated", "empty", "flipped header", "huge header length", "huge tensor"]
)
def test_corrupt_weights_give_one_line(moekit_dir, tmp_path, capsys, case):
    folder = tmp_path / "m"
    shutil.copytree(moekit_dir, folder)
    _corrupt(folder / "model.safetensors", case)
    with pytest.raises(ValueError, match="model.safetensors"):
        moekit.from_pretrained(folder)
    assert main(["generate", "--model", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and len(err.splitlines()) == 1, err


def test_corrupt_hf_shard_gives_one_line(hf_dir, tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(hf_dir, folder)
    _corrupt(folder / "model.safetensors", "truncated")
    assert main(["convert", "--from", str(folder), "--to", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated" in err and len(err.splitlines()) == 1, err


def test_absurd_config_fails_before_allocating(moekit_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(moekit_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["moe"]["num_experts"] = 10**7
    (folder / "config.json").write_text(json.dumps(cfg))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="shape"):
        moekit.from_pretrained(folder)
    assert time.perf_counter() - t0 < 10
    # ru_maxrss is in KiB on Linux: the attempt allocated well under 1 GB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1_000_000


def test_cli_flags_are_validated(moekit_dir, tmp_path, capsys):
    d = str(moekit_dir)
    for bad in ("inf", "nan", "-5", "0%", "nan%"):
        assert main(["generate", "--model", d, "--prompt", "x", "--expert-cache-bytes", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "--expert-cache-bytes" in err and len(err.splitlines()) == 1, err
    a_file = tmp_path / "f"
    a_file.write_text("x")
    args = ["generate", "--model", d, "--prompt", "x", "--expert-cache-bytes", "50%", "--store", str(a_file)]
    assert main(args) == 2
    assert "existing file" in capsys.readouterr().err
    assert main(["serve", "--model", d, "--port", "99999"]) == 2
    assert "--port" in capsys.readouterr().err


def test_generate_stays_inside_the_context(moekit_dir, capsys):
    positions = moekit.from_pretrained(moekit_dir).config.max_position_embeddings
    args = ["generate", "--model", str(moekit_dir), "--prompt", "x", "--max-new-tokens", "100000"]
    assert main([*args, "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert f"{positions}-position context" in captured.err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"moekit {moekit.__version__}"


def test_train_init_from_an_hf_folder(hf_dir, tmp_path, capsys, monkeypatch):
    from tests.test_train import _write_corpus

    corpus = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    args = ["train", "--init-from", str(hf_dir), "--corpus", str(corpus), "--steps", "2", "--out", str(out)]
    args += ["--seq-len", "16", "--batch-size", "2"]
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    assert main(args) == 0, capsys.readouterr().err
    trained = moekit.from_pretrained(out)
    assert inspect_folder(out).kind == "run"
    assert (
        trained.config.moe.num_experts == 4
        and trained.config.vocab_size == moekit.from_pretrained(hf_dir).config.vocab_size
    )
