"""Keeping freed memory in the process on CPU, so large tensors are not page-faulted in again.

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap``
and unmaps it on free. A training step allocates and frees hundreds of megabytes of such blocks
(activations, the weight gradients of stacked experts), and the kernel zero-fills every page of
each one on first touch: measured here, writing a fresh 277 MB tensor takes 75-80 ms against
7-11 ms for the same tensor once mapped (one MoE layer's expert gradients at D=1024, F=2816,
E=8). :func:`keep_freed_memory` tells malloc to take large blocks from its heap and not to give
freed memory back, so the next step reuses the same pages. It is a process-wide setting (like
``torch.set_num_threads``), opt-in: the price is that the process keeps its peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory(top_pad_mb: int = 64) -> bool:
    """Makes glibc malloc serve large blocks from its heap and never trim it (see module docstring).

    Call it once, early (before the first training step). Returns True when the setting took
    effect, False where there is no glibc ``mallopt`` (macOS, Windows, musl): nothing changes then.
    The numbers a training run computes are unchanged; only where its memory comes from.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1  # no mmap'd blocks: everything from the heap
    ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok  # never return the heap's top
    ok = libc.mallopt(_M_TOP_PAD, top_pad_mb << 20) == 1 and ok  # grow the heap in big steps
    return ok
