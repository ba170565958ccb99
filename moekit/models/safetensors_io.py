"""Checked safetensors reading: a corrupt file is one ``ValueError`` naming the file and the fault.

The safetensors library reports a truncated file, flipped header bytes or an absurd header length
as a Rust panic or a long traceback, and some faults (a tensor claiming 1e15 elements) only
surface when memory runs out. :func:`check_safetensors` validates the header against the file's
real size before any tensor is touched:

* the 8-byte little-endian header length fits in the file (and below ``MAX_HEADER_BYTES``);
* the header is a UTF-8 JSON object of ``{name: {"dtype", "shape", "data_offsets"}}``;
* every dtype is known, every shape is a list of non-negative ints, every tensor's byte range
  lies inside the data section and equals ``numel * itemsize``.

Every moekit reader (model folders, quantized folders, Hugging Face shards, checkpoints) opens
files through :func:`open_safetensors` or :func:`load_safetensors`.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# The safetensors spec caps the header at 100 MB; anything larger is a corrupt length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _fail(path: Path, reason: str) -> ValueError:
    return ValueError(f"{path}: not a valid safetensors file ({reason}); re-save or re-download it")


def check_safetensors(path: str | Path) -> dict[str, dict[str, Any]]:
    """Validates ``path``'s header against its size; returns ``{name: {"dtype", "shape", "num_bytes"}}``.

    Raises:
        ValueError: one line naming the file and what is wrong with it (missing, empty, truncated,
            bad header length, bad JSON, unknown dtype, a tensor outside the file or of the wrong
            byte size).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found")
    size = path.stat().st_size
    if size < 8:
        raise _fail(path, f"{size} bytes, too short for a header" if size else "the file is empty")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {header_len} exceeds {MAX_HEADER_BYTES} bytes")
        if 8 + header_len > size:
            raise _fail(path, f"header of {header_len} bytes but the file has {size}: truncated")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"the header is not UTF-8 JSON: {err}") from None
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object")
    data_bytes = size - 8 - header_len
    out: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _fail(path, f"tensor {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _fail(path, f"tensor {name!r} has shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise _fail(path, f"tensor {name!r} lies outside the file's {data_bytes} data bytes: truncated")
        num_bytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != num_bytes:
            raise _fail(
                path,
                f"tensor {name!r} of shape {shape} {dtype} needs {num_bytes} bytes, "
                f"its range holds {offsets[1] - offsets[0]}",
            )
        out[name] = {"dtype": dtype, "shape": tuple(shape), "num_bytes": num_bytes}
    return out


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open(path, "pt")`` after :func:`check_safetensors`; faults become one ``ValueError``."""
    from safetensors import SafetensorError, safe_open

    check_safetensors(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise _fail(Path(path), str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    with handle as f:
        yield f


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checked safetensors file (see :func:`check_safetensors`)."""
    with open_safetensors(path) as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def total_bytes(path: str | Path) -> int:
    """Bytes of tensor data a checked safetensors file holds."""
    return sum(info["num_bytes"] for info in check_safetensors(path).values())
