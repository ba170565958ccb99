"""``blind make``: every system answers every prompt; the pairs are shuffled, anonymised and sealed.

A blind folder holds

* ``pairs.jsonl``: what raters see, in the order they see it: ``pair_id`` (random hex), the prompt
  and the ``left``/``right`` answers. Nothing in it names a system.
* ``key.json``: the sealed key: the seed, the systems (name and spec) and, per pair, which system
  is on which side. Only ``unblind`` and ``judge`` read it; the rating server never opens it.
* ``manifest.json``: counts and the SHA-256 of ``key.json`` (the seal), so ``unblind`` can tell a
  key that was edited after the pairs were made.
* ``ratings/<rater>.jsonl``: written later by ``rate`` and ``judge``.

With N systems every prompt gives N(N-1)/2 pairs (each unordered pair of systems once). The pair
order and each pair's left/right come from one ``random.Random(seed)``; the seed is recorded only
in the key, since knowing it would let a rater recompute the sides.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moekit.blind.spec import Prompt, SystemSpec

KEY_FORMAT = "moekit-blind-key/1"
PAIRS_NAME, KEY_NAME, MANIFEST_NAME, RATINGS_DIR = "pairs.jsonl", "key.json", "manifest.json", "ratings"


@dataclass(frozen=True)
class Pair:
    """One shown pair: its id, the prompt, and the two answers in the order the page shows them."""

    pair_id: str
    prompt_id: str
    prompt: str
    left: str
    right: str


@dataclass(frozen=True)
class KeyEntry:
    """The sealed truth of one pair: which system answered on which side."""

    left: str
    right: str


def _load_once(spec: SystemSpec, cache: dict):
    from moekit.loader import load_model_and_tokenizer

    key = (str(Path(spec.model).resolve()), spec.dtype)
    if key not in cache:
        cache[key] = load_model_and_tokenizer(
            spec.model, dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[spec.dtype]
        )
    return cache[key]


def answer_prompts(spec: SystemSpec, prompts: Sequence[str], cache: dict | None = None) -> list[str]:
    """The system's answer (decoded new text, end-of-text dropped) to each prompt.

    Each prompt gets its own sampling generator seeded with ``spec.seed + index``, so an answer
    does not depend on which prompts came before it. ``cache`` shares loaded models between specs
    that use the same folder (e.g. SCMoE against greedy on one model).
    """
    import torch

    from moekit.infer.decoding import SelfContrastSession
    from moekit.models.generation import Sampler, generate

    loaded = _load_once(spec, {} if cache is None else cache)
    model, tok, eos = loaded.model, loaded.tokenizer, loaded.eos_token_id
    if not hasattr(model.config, "max_position_embeddings"):
        raise ValueError(f"{spec.model}: blind make needs a text language model (got {type(model).__name__})")
    if spec.decode_mode == "scmoe" and not getattr(model, "moe_layers", None):
        raise ValueError(f"{spec.model}: decode=scmoe needs a model with MoE layers (this one is dense)")
    context = model.config.max_position_embeddings
    answers = []
    for index, text in enumerate(prompts):
        ids = tok.encode(text).ids
        if not ids:
            raise ValueError(f"prompt {index} encodes to no tokens for {spec.model}")
        room = min(spec.max_new_tokens, context - len(ids))
        if room < 1:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; {spec.model} has {context} positions")
        prompt_ids = torch.tensor([ids])
        decode = spec.decode_mode
        sampler = Sampler(
            temperature=spec.temperature if decode == "sample" else 0.0,
            top_k=spec.top_k,
            top_p=spec.top_p,
            generator=torch.Generator().manual_seed(spec.seed + index),
        )
        source = None
        if decode == "scmoe":
            source = SelfContrastSession(
                model,
                prompt_ids,
                max_new_tokens=room,
                alpha=spec.scmoe_alpha,
                beta=spec.scmoe_beta,
                weak=spec.scmoe_weak,
                moe_k=spec.k,
            )
        out = generate(
            model,
            prompt_ids,
            max_new_tokens=room,
            sampler=sampler,
            eos_token_id=eos,
            moe_k=spec.k,
            source=source,
            compile=False,
        )
        new = out[0, len(ids) :].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        answers.append(tok.decode(new))
    return answers


def build_pairs(
    prompts: Sequence[Prompt], answers: dict[str, Sequence[str]], seed: int
) -> tuple[list[Pair], dict[str, KeyEntry]]:
    """Shuffled, anonymised pairs and their key, from each system's answers (same order as prompts).

    Every unordered pair of systems meets on every prompt; ``random.Random(seed)`` draws the pair
    ids, the order and each pair's left/right. Pure: the same inputs give the same pairs.
    """
    names = list(answers)
    if len(names) < 2:
        raise ValueError("a blind comparison needs at least two systems")
    for name in names:
        if len(answers[name]) != len(prompts):
            raise ValueError(f"system {name!r} has {len(answers[name])} answers for {len(prompts)} prompts")
    rng = random.Random(seed)
    slots = [(i, a, b) for i in range(len(prompts)) for a, b in itertools.combinations(names, 2)]
    rng.shuffle(slots)
    pairs, key, used = [], {}, set()
    for i, a, b in slots:
        pair_id = f"{rng.getrandbits(48):012x}"
        while pair_id in used:  # 48 random bits: a repeat is astronomically rare, but never reuse one
            pair_id = f"{rng.getrandbits(48):012x}"
        used.add(pair_id)
        left, right = (a, b) if rng.random() < 0.5 else (b, a)
        pairs.append(Pair(pair_id, prompts[i].id, prompts[i].text, answers[left][i], answers[right][i]))
        key[pair_id] = KeyEntry(left, right)
    return pairs, key


def _write(path: Path, text: str, mode: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_blind_dir(
    out: str | Path,
    pairs: Sequence[Pair],
    key: dict[str, KeyEntry],
    systems: dict[str, dict],
    seed: int,
) -> Path:
    """Writes ``pairs.jsonl``, the sealed ``key.json`` (mode 0600) and ``manifest.json`` under ``out``.

    ``systems`` maps each system name to its spec (JSON form). Refuses a folder that already holds
    pairs, so a new ``make`` never mixes with ratings of an old one.
    """
    out = Path(out)
    if (out / PAIRS_NAME).exists() or (out / KEY_NAME).exists():
        raise ValueError(f"{out} already holds a blind comparison; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / RATINGS_DIR).mkdir(exist_ok=True)
    lines = [json.dumps(p.__dict__, ensure_ascii=False) for p in pairs]
    _write(out / PAIRS_NAME, "\n".join(lines) + "\n")
    key_doc = {
        "format": KEY_FORMAT,
        "seed": seed,
        "systems": systems,
        "pairs": {pid: {"left": e.left, "right": e.right} for pid, e in key.items()},
    }
    key_text = json.dumps(key_doc, indent=1, ensure_ascii=False) + "\n"
    _write(out / KEY_NAME, key_text, mode=0o600)
    manifest = {
        "format": "moekit-blind/1",
        "num_pairs": len(pairs),
        "num_systems": len(systems),
        "key_sha256": hashlib.sha256(key_text.encode()).hexdigest(),
    }
    _write(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return out


def make_blind(
    specs: Sequence[SystemSpec],
    prompts: Sequence[Prompt],
    out: str | Path,
    seed: int | None = None,
    answer: Callable[[SystemSpec, list[str], dict], list[str]] = answer_prompts,
) -> Path:
    """Answers every prompt with every system, then writes the blind folder (see the module docstring).

    ``seed`` None draws one from the OS (it is recorded in the key). ``answer`` is the answering
    function (tests pass a fake one).
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"two systems share the name {next(n for n in names if names.count(n) > 1)!r}; "
            "give each spec a distinct name=... (or distinct options)"
        )
    seed = secrets.randbits(63) if seed is None else seed
    cache: dict = {}
    texts = [p.text for p in prompts]
    answers = {s.name: answer(s, texts, cache) for s in specs}
    pairs, key = build_pairs(prompts, answers, seed)
    return write_blind_dir(out, pairs, key, {s.name: s.to_dict() for s in specs}, seed)


def read_pairs(folder: str | Path) -> list[Pair]:
    """The shown pairs of a blind folder, in rating order (never touches the key)."""
    path = Path(folder) / PAIRS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a blind folder (no {PAIRS_NAME}); run `moekit blind make`")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            pairs.append(Pair(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} line {number}: not a pair ({e})") from None
    return pairs


def read_key(folder: str | Path) -> tuple[dict[str, KeyEntry], dict]:
    """The sealed key: ``({pair_id: KeyEntry}, the whole key document)``.

    Raises:
        ValueError: the key does not match the manifest's SHA-256 (edited or swapped after ``make``).
    """
    folder = Path(folder)
    path = folder / KEY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {KEY_NAME}; cannot unblind")
    raw = path.read_bytes()
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        want = json.loads(manifest.read_text()).get("key_sha256")
        if want and hashlib.sha256(raw).hexdigest() != want:
            raise ValueError(f"{path} does not match the seal in {manifest} (edited after `blind make`?)")
    doc = json.loads(raw)
    if doc.get("format") != KEY_FORMAT:
        raise ValueError(f"{path}: not a moekit blind key (format {doc.get('format')!r})")
    return {pid: KeyEntry(v["left"], v["right"]) for pid, v in doc["pairs"].items()}, doc
