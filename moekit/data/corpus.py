"""Corpora, the train/validation split and cached token streams.

Flow: :func:`resolve_corpus` turns paths into a sorted list of :class:`Document` s ->
:func:`split_documents` assigns each document to train or validation by a hash of its relative path ->
:func:`load_token_data` tokenises both splits into flat id streams (documents separated by
``<|endoftext|>``), cached on disk -> :class:`~moekit.data.sampler.WindowSampler` draws random
``seq_len + 1`` windows.

Shape legend: B = batch size, L = sequence length.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Folders never read when walking a corpus folder: VCS metadata, bytecode, environments.
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "node_modules", ".mypy_cache"})
# Extra folders skipped in the default (standard library) corpus: tests and installed packages, so the
# corpus is the library's own code and stays around ten MB.
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib"})
# Bump when the tokenisation format changes, so old caches are not reused.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Document:
    """One corpus file.

    Attributes:
        path: absolute path.
        rel_path: path relative to the corpus root it came from; the split hashes this, so the split
            does not depend on where the corpus lives.
        num_bytes: file size.
    """

    path: Path
    rel_path: str
    num_bytes: int


def default_cache_dir() -> Path:
    """``$MOEKIT_CACHE`` or ``~/.cache/moekit``."""
    return Path(os.environ.get("MOEKIT_CACHE") or Path.home() / ".cache" / "moekit")


def stdlib_root() -> Path:
    """The folder of the running Python's standard library (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_text_file(path: Path) -> bool:
    # A NUL byte or undecodable UTF-8 in the first 8 KB means binary. The last 4 bytes may be a
    # multi-byte character cut in half, so they are not held against the file.
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 4
    return True


def _walk(root: Path, skip_dirs: frozenset[str], suffix: str | None) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if suffix is None or name.endswith(suffix):
                out.append(Path(dirpath) / name)
    return out


def _glob_root(pattern: str) -> Path:
    # The longest leading part of the pattern without wildcards: relative paths are taken from it.
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _hash_order(docs: list[Document]) -> list[Document]:
    return sorted(docs, key=lambda d: hashlib.sha1(d.rel_path.encode()).hexdigest())


def resolve_corpus(
    corpus: str | Path | list[str | Path] | None = None, max_bytes: int | None = None
) -> list[Document]:
    """Lists the documents of a corpus.

    Args:
        corpus: a file, a folder (read recursively, text files only), a glob pattern (``**`` allowed),
            or a list of those. ``None`` means the Python standard library's own ``*.py`` source,
            without tests and site-packages.
        max_bytes: cap on the total size. Documents are taken in the order of a hash of their relative
            path until the cap, so the subset is deterministic and spread over the whole corpus rather
            than the alphabetically first folders.

    Returns:
        Documents sorted by path.

    Raises:
        FileNotFoundError: a path or pattern matches nothing.
        ValueError: the corpus holds no text files, or only empty ones.
    """
    if corpus is None:
        root = stdlib_root()
        paths = _walk(root, SKIP_DIRS | STDLIB_SKIP_DIRS, ".py")
        docs = [Document(p.resolve(), str(p.relative_to(root)), p.stat().st_size) for p in paths]
        where = f"the standard library at {root}"
    else:
        items = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
        if not items:
            raise ValueError("the corpus list is empty; pass a file, folder or glob (or None for the stdlib)")
        docs = []
        for item in items:
            docs.extend(_resolve_item(item))
        where = ", ".join(str(i) for i in items)
    # The same file reached twice (overlapping items) counts once.
    unique = {d.path: d for d in docs}
    docs = [d for d in unique.values() if d.num_bytes > 0]
    if not docs:
        raise ValueError(
            f"the corpus {where} has no non-empty text files; pass --corpus with a file, folder or glob of "
            "UTF-8 text (e.g. --corpus 'src/**/*.py')"
        )
    if max_bytes is not None:
        kept, total = [], 0
        for d in _hash_order(docs):
            if total and total + d.num_bytes > max_bytes:
                continue
            kept.append(d)
            total += d.num_bytes
        docs = kept
    return sorted(docs, key=lambda d: str(d.path))


def _resolve_item(item: str | Path) -> list[Document]:
    text = str(item)
    path = Path(text).expanduser()
    if path.is_file():
        if not _is_text_file(path):
            raise ValueError(f"corpus file {path} is not UTF-8 text; pass text files (code, prose, markdown)")
        return [Document(path.resolve(), path.name, path.stat().st_size)]
    if path.is_dir():
        files = [p for p in _walk(path, SKIP_DIRS, None) if _is_text_file(p)]
        if not files:
            raise ValueError(
                f"corpus folder {path} holds no text files; pass a folder with UTF-8 text files, a file, or a glob"
            )
        return [Document(p.resolve(), str(p.relative_to(path)), p.stat().st_size) for p in files]
    if glob.has_magic(text):
        root = _glob_root(text)
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [p for p in matches if p.is_file() and _is_text_file(p)]
        if not files:
            raise FileNotFoundError(
                f"corpus glob {text!r} matches no text files; check the pattern (quote it so the shell does not "
                "expand it) or pass a folder"
            )
        return [Document(p.resolve(), os.path.relpath(p, root), p.stat().st_size) for p in files]
    raise FileNotFoundError(
        f"corpus path {text} does not exist; pass an existing file, folder or glob pattern"
    )


def read_text(doc: Document) -> str:
    """The document's text (invalid UTF-8 replaced, so one bad byte does not stop a run)."""
    return doc.path.read_text(encoding="utf-8", errors="replace")


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a stable hash of its relative path."""
    h = int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Splits documents into (train, validation) by :func:`is_validation`.

    With at least two documents both splits are non-empty: if the hash puts every document on one
    side, the document first in hash order moves over. A single document goes to train; the token
    stream is then split by position instead (see :func:`load_token_data`).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train = [d for d in docs if not is_validation(d.rel_path, val_fraction)]
    val = [d for d in docs if is_validation(d.rel_path, val_fraction)]
    if len(docs) >= 2 and val_fraction > 0 and (not train or not val):
        first = _hash_order(docs)[0]
        if not val:
            train, val = [d for d in train if d != first], [first]
        else:
            val, train = [d for d in val if d != first], [first]
    return train, val


@dataclass
class TokenData:
    """Token streams of both splits.

    Attributes:
        train: 1-D uint16/uint32 array of train token ids (documents separated by EOS).
        val: the same for validation.
        vocab_size: the tokenizer's vocabulary size.
        cache_path: the cache file stem the arrays were loaded from or written to.
        from_cache: True when nothing was tokenised (the cache was hit).
        num_train_docs, num_val_docs: documents per split.
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    cache_path: Path | None
    from_cache: bool
    num_train_docs: int
    num_val_docs: int


def corpus_fingerprint(docs: list[Document]) -> str:
    """Hash of the document list with sizes and modification times: changes when any file changes."""
    h = hashlib.sha256()
    for d in docs:
        st = d.path.stat()
        h.update(f"{d.path}\0{d.rel_path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tokenize_documents(tok: Tokenizer, docs: list[Document], eos_id: int) -> np.ndarray:
    """Encodes documents into one stream, each followed by ``eos_id``; uint16 when the vocab fits."""
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    parts = []
    # Batches bound the memory of the encoded objects; encode_batch runs on all cores.
    for start in range(0, len(docs), 256):
        chunk = docs[start : start + 256]
        for enc in tok.encode_batch([read_text(d) for d in chunk], add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=dtype))
            parts.append(np.asarray([eos_id], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def load_token_data(
    tok: Tokenizer,
    train_docs: list[Document],
    val_docs: list[Document],
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.0,
) -> TokenData:
    """Tokenises both splits, or loads them from ``<cache_dir>/tokens/<key>.{train,val}.npy``.

    The key hashes the document list (paths, sizes, mtimes), the split and the tokenizer, so any
    change re-tokenises and an unchanged corpus loads at once. Files are written atomically.
    With no validation documents (a one-file corpus), the last ``val_fraction`` of the train stream
    becomes validation.
    """
    from moekit.data.tokenizer import special_token_id, tokenizer_hash

    eos_id = special_token_id(tok)
    key_src = json.dumps(
        {
            "format": CACHE_FORMAT,
            "train": corpus_fingerprint(train_docs),
            "val": corpus_fingerprint(val_docs),
            "tokenizer": tokenizer_hash(tok),
            "val_fraction": val_fraction,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "tokens"
    stem = folder / key
    train_path, val_path = stem.with_suffix(".train.npy"), stem.with_suffix(".val.npy")
    common: dict[str, Any] = {
        "vocab_size": tok.get_vocab_size(),
        "cache_path": stem,
        "num_train_docs": len(train_docs),
        "num_val_docs": len(val_docs),
    }
    if train_path.is_file() and val_path.is_file():
        try:
            return TokenData(np.load(train_path), np.load(val_path), from_cache=True, **common)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    train = tokenize_documents(tok, train_docs, eos_id)
    if val_docs:
        val = tokenize_documents(tok, val_docs, eos_id)
    else:
        cut = len(train) - int(len(train) * val_fraction)
        train, val = train[:cut], train[cut:]
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(train_path, train)
    _atomic_save_npy(val_path, val)
    return TokenData(train, val, from_cache=False, **common)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``val`` of the add-one-smoothed unigram distribution of ``train``.

    The loss of a model that ignores context: a trained LM should end clearly below it.
    """
    counts = np.bincount(train.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val.astype(np.int64)].mean())
