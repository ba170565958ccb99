"""Reading and writing Hugging Face safetensors checkpoints, one shard at a time.

Reading never unpickles: ``.bin``/``.pt`` weights are refused with a message to convert them to
safetensors. Loading builds the moekit model first and then copies each checkpoint tensor into
its destination slice while its shard is open, so the weights are never held twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit.convert.families.base import Piece, Target
from moekit.models.safetensors_io import open_safetensors

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def weight_map(folder: Path) -> dict[str, Path]:
    """``{tensor name: shard file}`` of a safetensors checkpoint folder.

    Raises:
        ValueError: no safetensors weights (naming pickle files when that is what the folder has),
            or an index that names a missing shard.
    """
    index = folder / SAFE_INDEX
    if index.is_file():
        data = json.loads(index.read_text())
        mapping = {name: folder / shard for name, shard in data["weight_map"].items()}
        for shard in set(mapping.values()):
            if not shard.is_file():
                raise ValueError(f"{index} names shard {shard.name}, which is missing")
        return mapping
    single = folder / SAFE_SINGLE
    if not single.is_file():
        shards = sorted(folder.glob("*.safetensors"))
        if len(shards) == 1:
            single = shards[0]
        else:
            pickled = [
                p.name
                for p in folder.iterdir()
                if p.suffix in (".bin", ".pt", ".pth") or p.name in PICKLE_NAMES
            ]
            if pickled:
                raise ValueError(
                    f"{folder} holds pickled weights {sorted(pickled)[:3]}; moekit never unpickles checkpoints. "
                    "Convert them to safetensors first (e.g. load with transformers and "
                    "save_pretrained(..., safe_serialization=True))"
                )
            raise ValueError(f"{folder}: no {SAFE_SINGLE} or {SAFE_INDEX} found")
    with open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single)


def checkpoint_dtype(mapping: dict[str, Path]) -> torch.dtype:
    """The dtype of the first floating-point tensor of the checkpoint (float32 if none)."""
    for name, shard in mapping.items():
        with open_safetensors(shard) as f:
            dtype = f.get_slice(name).get_dtype()
        table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
        if dtype in table:
            return table[dtype]
    return torch.float32


def resolve_layout(target: Target, available: set[str]) -> list[Piece]:
    """The first layout of ``target`` whose tensors all exist; ValueError naming a missing tensor."""

    def keys(piece: Piece) -> list[str]:
        return [piece.key] if piece.mxfp4_scales is None else [piece.key, piece.mxfp4_scales]

    for layout in target.layouts:
        if all(k in available for p in layout for k in keys(p)):
            return layout
    best = max(target.layouts, key=lambda lay: sum(k in available for p in lay for k in keys(p)))
    missing = [k for p in best for k in keys(p) if k not in available]
    raise ValueError(
        f"checkpoint is missing tensor {missing[0]!r} (needed for moekit {target.name!r}"
        + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else "")
        + ")"
    )


@torch.no_grad()
def load_into(state: dict[str, torch.Tensor], targets: list[Target], mapping: dict[str, Path]) -> None:
    """Copies the checkpoint into the model's tensors ``state`` (state-dict views), shard by shard.

    Raises:
        ValueError: a missing tensor or one whose shape differs from its destination (naming it).
    """
    available = set(mapping)
    plan: dict[Path, list[tuple[Piece, str]]] = defaultdict(list)
    used = set()
    for target in targets:
        if target.name not in state:
            raise KeyError(f"adapter maps {target.name!r}, which the moekit model does not have")
        for piece in resolve_layout(target, available):
            plan[mapping[piece.key]].append((piece, target.name))
            used.add(piece.key)
            if piece.mxfp4_scales is not None:
                used.add(piece.mxfp4_scales)
    unused = sorted(available - used)
    if unused:
        warnings.warn(
            f"{len(unused)} checkpoint tensor(s) not used by the moekit model, e.g. {unused[:3]}",
            stacklevel=3,
        )
    for shard, pieces in plan.items():
        with open_safetensors(shard) as f:
            for piece, name in pieces:
                dest = state[name][piece.index] if piece.index else state[name]
                if piece.plain:
                    shape = tuple(f.get_slice(piece.key).get_shape())
                    if shape != tuple(dest.shape):
                        raise ValueError(
                            f"checkpoint tensor {piece.key!r} has shape {shape}, but moekit {name!r} expects "
                            f"{tuple(dest.shape)} there (config.json and weights disagree?)"
                        )
                    dest.copy_(f.get_tensor(piece.key))
                    continue
                if piece.mxfp4_scales is not None:
                    _copy_mxfp4(f, mapping, piece, name, dest)
                    continue
                _copy_changed_layout(f, piece, name, dest)


def _copy_mxfp4(f, mapping: dict[str, Path], piece: Piece, name: str, dest: torch.Tensor) -> None:
    """Dequantizes an MXFP4 blocks/scales pair (:class:`Piece` ``mxfp4_scales``) into ``dest``."""
    from moekit.convert.mxfp4 import dequantize_mxfp4

    with open_safetensors(mapping[piece.mxfp4_scales]) as g:
        scales = g.get_tensor(piece.mxfp4_scales)
    values = dequantize_mxfp4(f.get_tensor(piece.key), scales, dtype=dest.dtype)
    want = piece.hf_shape(tuple(dest.shape))
    if tuple(values.shape) != want:
        raise ValueError(
            f"checkpoint tensor {piece.key!r} dequantizes to shape {tuple(values.shape)}, but moekit {name!r} "
            f"expects {want} there (config.json and weights disagree?)"
        )
    dest.copy_(piece.from_hf(values, tuple(dest.shape)))


def _copy_changed_layout(f, piece: Piece, name: str, dest: torch.Tensor) -> None:
    """Copies a piece with ``hf_rows``/``transpose``/``flatten`` (see :class:`Piece`) into ``dest``."""
    full = tuple(f.get_slice(piece.key).get_shape())
    want = piece.hf_shape(tuple(dest.shape))
    rows = piece.hf_rows
    if rows is not None:
        start, stop, _ = rows.indices(full[0] if full else 0)
        shape = (max(stop - start, 0), *full[1:])
    else:
        shape = full
    if shape != want or (rows is not None and (rows.stop is None or rows.stop > full[0])):
        where = f" rows {rows.start}:{rows.stop}" if rows is not None else ""
        raise ValueError(
            f"checkpoint tensor {piece.key!r}{where} has shape {shape} (full {full}), but moekit {name!r} "
            f"expects {want} there (config.json and weights disagree?)"
        )
    values = f.get_slice(piece.key)[rows.start : rows.stop] if rows is not None else f.get_tensor(piece.key)
    dest.copy_(piece.from_hf(values, tuple(dest.shape)))


def hf_tensors(state: dict[str, torch.Tensor], targets: list[Target]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, tensor)`` pairs in the export layout (each target's first layout).

    Pieces that are row ranges of one HF tensor (``Piece.hf_rows``) are concatenated in row order
    and yielded once, when the last of them is reached.
    """
    split: dict[str, int] = defaultdict(int)
    for target in targets:
        for piece in target.layouts[0]:
            if piece.hf_rows is not None:
                split[piece.key] += 1
    parts: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for target in targets:
        src = state[target.name]
        for piece in target.layouts[0]:
            region = src[piece.index] if piece.index else src
            values = piece.to_hf(region.detach()).contiguous().cpu()
            if piece.hf_rows is None:
                yield piece.key, values
                continue
            parts[piece.key].append((piece.hf_rows.start or 0, values))
            if len(parts[piece.key]) == split[piece.key]:
                yield piece.key, torch.cat([v for _, v in sorted(parts.pop(piece.key), key=lambda p: p[0])])


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path, max_shard_bytes: int) -> None:
    """Writes ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index above ``max_shard_bytes``.

    Tensors are cloned (safetensors refuses views that share storage) one shard at a time, so
    export holds at most one shard of extra memory.
    """
    for stale in list(folder.glob("model*.safetensors")) + [folder / SAFE_INDEX]:
        if stale.exists():
            stale.unlink()
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size, total = 0, 0

    def flush() -> None:
        path = folder / f".shard-{len(written):05d}.safetensors"
        _atomic_save(shard, path)
        written.append((path, list(shard)))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.clone()
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], folder / SAFE_SINGLE)
        return
    names = {}
    for i, (path, keys) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(path, folder / fname)
        names.update(dict.fromkeys(keys, fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(names.items()))}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer_files(src: Path | None, dst: Path) -> list[str]:
    """Copies the tokenizer/generation files present in ``src`` to ``dst``; returns their names."""
    if src is None or not Path(src).is_dir() or Path(src).resolve() == Path(dst).resolve():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)
            copied.append(name)
    return copied
