"""Weights in transparent huge pages, for the bandwidth-bound decode kernels.

A batch-1 decode step streams every active weight once; with 4 KiB pages that is one TLB entry
per 4 KiB of a stream (about 43,000 for the 177 MB a token of the 100m benchmark model reads),
and each new page also restarts the hardware prefetcher. Copying the large weights into memory
advised with ``MADV_HUGEPAGE`` (2 MiB pages) measured 5% faster at 1 thread and 13% at 2 on that
model (``benchmarks/bench_kernels.py --hugepages``).

:func:`move_to_hugepages` does it for a module, once: it is what the whole-step decode path
(:mod:`moekit.models.native_step`) calls, and it is a no-op where the kernel does not offer
transparent huge pages ("never" in ``/sys/kernel/mm/transparent_hugepage/enabled``), off Linux,
for non-CPU tensors, and under ``MOEKIT_HUGEPAGES=0`` or ``MOEKIT_KERNELS=0``. Values never
change; only where the parameters live.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.kernels.build import kernels_enabled

HUGE_PAGE = 2 << 20
#: tensors below this stay where they are (a huge page per small tensor wastes memory for nothing).
MIN_BYTES = 2 << 20
_MARK = "_moekit_hugepage_weights"


def hugepages_available() -> bool:
    """Whether this process can ask for transparent huge pages (see the module doc)."""
    if not kernels_enabled() or os.environ.get("MOEKIT_HUGEPAGES", "1").strip() in (
        "0",
        "false",
        "no",
        "off",
    ):
        return False
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def hugepage_copy(t: Tensor) -> Tensor:
    """A contiguous copy of CPU tensor ``t`` in 2 MiB-aligned memory advised ``MADV_HUGEPAGE``.

    The tensor owns the mapping (it is unmapped when the last view goes). Returns ``t`` itself
    when it is not a CPU tensor or huge pages are not available.
    """
    if t.device.type != "cpu" or not hugepages_available():
        return t
    nbytes = t.numel() * t.element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    offset = (-address) % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE)
    out = torch.frombuffer(region, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
    out.copy_(t)
    return out


def move_to_hugepages(module: nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Moves ``module``'s CPU parameters and buffers of at least ``min_bytes`` into huge-page
    memory, once.

    Parameters keep their identity (``param.data`` is replaced), so tied weights stay tied and
    optimizers keep working; a tensor registered under several names (a quantized layer's stored
    codes that double as its kernel form) moves once and stays shared. Anything holding a view of
    an old tensor must be rebuilt after. Returns the bytes moved (0 on a second call, or where
    huge pages are unavailable).
    """
    if getattr(module, _MARK, False) or not hugepages_available():
        return 0
    # Keyed by the memory a tensor views (not id(): param.data is a fresh object per access, and
    # a freed one's id is reused), so two names for one tensor get one copy.
    copies: dict[tuple, Tensor] = {}
    moved = 0

    def relocated(t: Tensor) -> Tensor:
        nonlocal moved
        key = (t.device.type, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in copies:
            nbytes = t.numel() * t.element_size()
            big = t.device.type == "cpu" and nbytes >= min_bytes and t.is_contiguous()
            copies[key] = hugepage_copy(t) if big else t
            moved += nbytes if big else 0
        return copies[key]

    with torch.no_grad():
        for param in module.parameters():
            param.data = relocated(param.data)
        for sub in module.modules():
            for name, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[name] = relocated(buf)
    setattr(module, _MARK, True)
    return moved
