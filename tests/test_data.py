"""moekit.data: corpus resolution, the split, token caches, the sampler, the tokenizer, TextDataModule."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from moekit.data import (
    TextDataModule,
    WindowSampler,
    load_token_data,
    load_tokenizer,
    resolve_corpus,
    save_tokenizer,
    split_documents,
    train_tokenizer,
)
from moekit.data import corpus as data_mod
from tests.test_train import VOCAB, _write_corpus


@pytest.fixture
def corpus(tmp_path):
    return _write_corpus(tmp_path / "corpus")


# ---- tokenizer and data ------------------------------------------------------------------------


def test_tokenizer_loads_in_transformers_with_identical_ids(tmp_path, corpus):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    docs = resolve_corpus(str(corpus))
    tok = train_tokenizer([data_mod.read_text(d) for d in docs], VOCAB)
    assert tok.get_vocab_size() <= VOCAB
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|pad|>") == 1
    save_tokenizer(tok, tmp_path / "tok")
    text = "def router(self, token):\n    return expert[index]  # ünïcode ✓\n"
    ids = tok.encode(text).ids
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    assert auto(text)["input_ids"] == ids
    assert fast(text)["input_ids"] == ids
    assert auto.eos_token_id == 0 and auto.pad_token_id == 1
    assert auto.decode(ids) == text
    assert load_tokenizer(tmp_path / "tok").encode(text).ids == ids


def test_token_cache_is_reused(tmp_path, corpus, monkeypatch):
    docs = resolve_corpus(str(corpus))
    train_docs, val_docs = split_documents(docs, 0.2)
    tok = train_tokenizer([data_mod.read_text(d) for d in train_docs], VOCAB)
    first = load_token_data(tok, train_docs, val_docs, tmp_path / "cache")
    assert not first.from_cache and len(first.train) > 1000 and len(first.val) > 100
    assert first.train.dtype == np.uint16

    def boom(*a, **k):
        raise AssertionError("re-tokenised despite a warm cache")

    monkeypatch.setattr(data_mod, "tokenize_documents", boom)
    second = load_token_data(tok, train_docs, val_docs, tmp_path / "cache")
    assert second.from_cache
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.val, second.val)
    # Touching a file changes the key: the cache is not reused for a changed corpus.
    train_docs[0].path.write_text(train_docs[0].path.read_text() + "x = 1\n")
    with pytest.raises(AssertionError, match="re-tokenised"):
        load_token_data(tok, train_docs, val_docs, tmp_path / "cache")


def test_split_is_deterministic_and_location_independent(tmp_path, corpus):
    docs = resolve_corpus(str(corpus))
    train_a, val_a = split_documents(docs, 0.2)
    train_b, val_b = split_documents(resolve_corpus(str(corpus)), 0.2)
    assert train_a == train_b and val_a == val_b
    assert train_a and val_a and not set(train_a) & set(val_a)
    moved = tmp_path / "elsewhere"
    shutil.copytree(corpus, moved)
    _, val_moved = split_documents(resolve_corpus(str(moved)), 0.2)
    assert [d.rel_path for d in val_moved] == [d.rel_path for d in val_a]


def test_corpus_forms_and_cap(tmp_path, corpus):
    all_docs = resolve_corpus(str(corpus))
    assert len(all_docs) == 14
    assert len(resolve_corpus(str(corpus / "**" / "*.py"))) == 14
    assert len(resolve_corpus([str(corpus / "lib"), str(corpus / "pkg" / "mod_01.py")])) == 8
    capped = resolve_corpus(str(corpus), max_bytes=5000)
    assert 0 < sum(d.num_bytes for d in capped) <= 5000
    assert capped == resolve_corpus(str(corpus), max_bytes=5000)


def test_corpus_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        resolve_corpus(str(tmp_path / "empty"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(ValueError, match="no text files"):
        resolve_corpus(str(tmp_path / "bin"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty text files"):
        resolve_corpus(str(tmp_path / "blank"))
    with pytest.raises(FileNotFoundError, match="matches no text files"):
        resolve_corpus(str(tmp_path / "*.nothing"))


def test_default_corpus_is_the_stdlib():
    docs = resolve_corpus(None, max_bytes=2_000_000)
    assert docs and all(d.path.suffix == ".py" for d in docs)
    assert not any("site-packages" in d.path.parts or "test" in d.path.parts for d in docs)
    assert sum(d.num_bytes for d in docs) <= 2_000_000


def test_sampler_state_resumes_exactly():
    tokens = np.arange(1000, dtype=np.uint16)
    a = WindowSampler(tokens, 16, 3, seed=1)
    a.next_batch()
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()}
    expected = [a.next_batch() for _ in range(3)]
    b = WindowSampler(tokens, 16, 3, seed=1)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert torch.equal(got, want) and got.shape == (3, 17)
        assert torch.equal(got[:, 1:] - got[:, :-1], torch.ones(3, 16, dtype=torch.int64))


def test_text_data_module_state_resumes_and_val_is_fixed(tmp_path, corpus):
    docs = resolve_corpus(str(corpus))
    train_docs, val_docs = split_documents(docs, 0.2)
    tok = train_tokenizer([data_mod.read_text(d) for d in train_docs], VOCAB)
    tokens = load_token_data(tok, train_docs, val_docs, tmp_path / "cache")
    a = TextDataModule(tok, tokens, seq_len=16, batch_size=3, eval_steps=2, seed=5)
    a.next_train_batch()
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()}
    want = [a.next_train_batch() for _ in range(2)]
    b = TextDataModule(tok, tokens, seq_len=16, batch_size=3, eval_steps=2, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(b.next_train_batch(), w) for w in want)
    assert len(a.val_batches()) == 2 and all(
        torch.equal(x, y) for x, y in zip(a.val_batches(), b.val_batches())
    )
    assert a.describe()["num_train_docs"] == len(train_docs) and a.baselines()["unigram_val_loss"] > 0
    a.save_artifacts(tmp_path / "art")
    assert load_tokenizer(tmp_path / "art").encode("def x").ids == tok.encode("def x").ids
