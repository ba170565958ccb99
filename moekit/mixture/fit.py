"""Fitting a mixture to text: scoring windows, training the gate, the selection objective.

Shape legend: N = windows, L = window length (P prompt + T continuation), D = embedding width,
E = experts, T = continuation tokens.

``moekit mixture train`` samples windows from the training split of a corpus, scores every
expert on them once (:func:`score`), trains the gate on the scores, and saves the scores of
validation windows next to the gate (``scores.safetensors``), so ``moekit mixture select`` can
evaluate any subset without running an expert again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.mixture.gate import (
    GateConfig,
    MixtureGate,
    mixture_nll,
    prompt_embedding,
    score_windows,
    subset_mask,
)
from moekit.mixture.gate import uniform_nll as _uniform_nll

SCORES = "scores.safetensors"


SPLITS = ("train", "val", "val-a", "val-b")


def sample_windows(
    tokenizer, eos: int, corpus, split: str, num: int, length: int, seed: int = 0, val_fraction: float = 0.05
) -> Tensor:
    """``num`` windows ``[N, L]`` of token ids drawn from ``split`` of ``corpus``.

    The corpus is split by document as ``moekit train`` splits it (a stable hash of the path
    relative to the corpus root, the same ``val_fraction``), so ``"val"`` is text the experts
    were not trained on when they were trained on (slices of) the same corpus. ``"val-a"`` and
    ``"val-b"`` are the first and second halves of every validation document's tokens: the gate
    trains on one and is evaluated on the other, and both hold the same mix of documents (split
    by whole documents instead, a few large files decide which half is which domain). Windows
    start at seeded random positions.

    Raises:
        ValueError: an unknown split, or one that holds fewer than ``length`` tokens.
    """
    from moekit.data import read_text, resolve_corpus, split_documents

    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    docs = resolve_corpus(corpus, max_bytes=12_000_000)
    train, val = split_documents(docs, val_fraction)
    chosen = (train if split == "train" else val) or docs
    ids: list[int] = []
    for doc in chosen:
        doc_ids = tokenizer.encode(read_text(doc)).ids + [eos]
        if split in ("val-a", "val-b"):
            # Each document's first half for one, its second half for the other: both halves
            # see the same mix of documents, and no text is in both.
            mid = len(doc_ids) // 2
            doc_ids = doc_ids[mid:] if split == "val-b" else doc_ids[:mid]
        ids.extend(doc_ids)
        if len(ids) > 64 * num * length:  # enough text to draw from
            break
    if len(ids) < length + 1:
        raise ValueError(
            f"the {split} split has {len(ids)} tokens; windows need {length} (pass a bigger --corpus)"
        )
    tokens = np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - length, size=num)
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]))


@dataclass
class Scores:
    """Every expert's view of some windows.

    Attributes:
        emb_ND: the gate's input for each window's prompt.
        logp_ENT: each expert's log-probability of each continuation token (float64).
        experts: expert names (order of E).
        vocab_size: the tokenizer's vocabulary (``-log V`` is the quality of a uniform guess).
    """

    emb_ND: Tensor
    logp_ENT: Tensor
    experts: list[str]
    vocab_size: int

    def save(self, path: str | Path) -> None:
        """Writes a safetensors file (the names go in its metadata)."""
        from safetensors.torch import save_file

        meta = {"experts": "\n".join(self.experts), "vocab_size": str(self.vocab_size)}
        save_file(
            {"emb": self.emb_ND.contiguous(), "logp": self.logp_ENT.contiguous()}, str(path), metadata=meta
        )

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Reads what :meth:`save` wrote (``ValueError`` naming the file when it is damaged)."""
        from safetensors import safe_open

        from moekit.models.safetensors_io import load_safetensors

        tensors = load_safetensors(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        names, vocab = meta.get("experts", ""), meta.get("vocab_size", "")
        if set(tensors) != {"emb", "logp"} or not names or not vocab.isdigit():
            raise ValueError(f"{path} is not a mixture scores file (write it with `moekit mixture train`)")
        return cls(tensors["emb"], tensors["logp"], names.split("\n"), int(vocab))


@torch.no_grad()
def score(mixture, windows_NL: Tensor, prompt_len: int, embedder: str, embedding: str) -> Scores:
    """Scores every expert of ``mixture`` on the windows and embeds their prompts."""
    from moekit.mixture.bridge import TextBridge

    logp = []
    for name in mixture.config.names:
        model = mixture.models[name]
        if isinstance(model, TextBridge):
            logp.append(model.score_windows(windows_NL, prompt_len))
        else:
            logp.append(score_windows(model, windows_NL, prompt_len))
    emb_ND = prompt_embedding(mixture.models[embedder], windows_NL[:, :prompt_len], embedding)
    return Scores(emb_ND, torch.stack(logp), mixture.config.names, mixture.tokenizer.get_vocab_size())


def gate_config_for(mixture, embedder: str | None, embedding: str, hidden_dim: int) -> GateConfig:
    """The gate's config: ``embedder`` defaults to the first expert."""
    name = embedder or mixture.config.names[0]
    if name not in mixture.models:
        raise ValueError(f"--embedder {name!r} is not an expert of this mixture ({mixture.config.names})")
    model = mixture.models[name]
    from moekit.mixture.bridge import TextBridge

    if isinstance(model, TextBridge):
        raise ValueError(
            f"--embedder {name!r} has its own tokenizer; the gate reads the mixture's ids, pick another"
        )
    return GateConfig(
        experts=mixture.config.names,
        embedder=name,
        embedding=embedding,
        input_dim=model.config.dim,
        hidden_dim=hidden_dim,
    )


@torch.no_grad()
def subset_nll(gate: MixtureGate | None, scores: Scores, subset, aggregation: str = "mixture") -> float:
    """The NLL (nats/token) of the mixture restricted to ``subset`` (expert indices).

    ``gate=None`` weighs the subset uniformly; ``aggregation="best"`` lets each prompt's
    highest-weighted expert of the subset answer alone.
    """
    if gate is None:
        return float(_uniform_nll(scores.logp_ENT, subset))
    logits_NE = gate(scores.emb_ND.float(), subset_mask(scores.logp_ENT.shape[0], subset))
    if aggregation == "best":
        best_N = logits_NE.argmax(-1)
        return float(-scores.logp_ENT[best_N, torch.arange(best_N.shape[0])].mean())
    return float(mixture_nll(logits_NE, scores.logp_ENT))


def quality(gate: MixtureGate | None, scores: Scores, aggregation: str = "mixture"):
    """The selection objective ``q(S) = -NLL(S)`` as a function of a subset (see :mod:`.select`)."""
    return lambda subset: -subset_nll(gate, scores, subset, aggregation)


__all__ = ["SCORES", "Scores", "gate_config_for", "quality", "sample_windows", "score", "subset_nll"]
