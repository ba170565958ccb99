"""The model verbs end to end on a tiny trained run: generate, eval, trace, report."""

from __future__ import annotations

import json

import pytest

from moekit.cli.main import main
from tests.test_train import _config, _write_corpus


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from moekit.train import train

    tmp = tmp_path_factory.mktemp("cli")
    corpus = _write_corpus(tmp / "corpus")
    train(_config(tmp, corpus, max_steps=8), progress=False)
    return tmp / "run"


def test_generate_streams_and_is_repeatable(run_dir, capsys):
    args = ["generate", "--model", str(run_dir), "--prompt", "for ", "--max-new-tokens", "12", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("for ")
    assert main([*args[:-2], "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args[:-2], "--temperature", "0", "--compile"]) == 0
    assert capsys.readouterr().out == greedy


def test_eval_reports_perplexity(run_dir, capsys):
    assert (
        main(["eval", "--model", str(run_dir), "--seq-len", "16", "--batch-size", "2", "--batches", "2"]) == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tokens_scored"] == 2 * 2 * 16
    assert 1.0 < report["perplexity"] < 600


def test_trace_then_report(run_dir, tmp_path, capsys):
    from moekit.analysis import load_trace

    out = tmp_path / "t.safetensors"
    assert (
        main(["trace", "--model", str(run_dir), "--out", str(out), "--tokens", "128", "--seq-len", "16"]) == 0
    )
    trace = load_trace(out)
    assert trace.num_tokens == 128 and trace.num_layers >= 1
    assert main(["report", "--model", str(run_dir), "--trace", str(out), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "loss.png" in text and "expert_load.png" in text and "Unigram baseline" in text
    assert (tmp_path / "rep" / "loss.png").stat().st_size > 1000


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_a_trained_run_to_hf_and_transformers_agrees(run_dir, tmp_path):
    """A model trained by `moekit train` runs in transformers with the same logits."""
    import torch
    import transformers

    import moekit

    out = tmp_path / "hf"
    assert main(["convert", "--from", str(run_dir), "--to", str(out), "--format", "hf"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    mk = moekit.from_pretrained(run_dir / "checkpoints" / "last")
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, mk(ids).logits, rtol=1e-4, atol=1e-5)
