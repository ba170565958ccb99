"""One byte-budgeted cache of expert weights for all MoE layers, with background prefetch.

:class:`ExpertCache` keeps what a store's ``read`` returns (two tensors, or two packed modules)
under one budget. The budget counts what is really alive: entries resident or reserved by a load
in flight, plus evicted entries whose tensors something else still holds (they are tracked by
weak references and leave the count when freed). Eviction: ``lru``, ``lfu`` or ``edgemoe``
(:func:`moekit.compress.edgemoe.eviction_priority`: low-frequency experts of the layers that run
furthest ahead go first).
:class:`OffloadStats` counts hits, misses, bytes read, prefetch accuracy and time stalled.
"""

from __future__ import annotations

import gc
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from moekit.offload.store import ExpertStore

Key = tuple[int, int]  # (MoE layer index, expert)


def object_bytes(obj: Any) -> int:
    """Resident bytes of a loaded tensor or module (its parameters and buffers)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        return sum(t.numel() * t.element_size() for t in (*obj.parameters(), *obj.buffers()))
    return 0


@dataclass
class OffloadStats:
    """Counters of one offloaded run.

    Attributes:
        hits, misses: demand lookups found resident / not resident (a miss waits for a load).
        prefetch_hits: demand lookups served by an entry a prefetch brought in.
        prefetches: prefetch loads issued; prefetch_used: of those, how many were used before eviction.
        bytes_read: bytes read from the store (demand and prefetch).
        stall_s: seconds the compute thread waited for loads.
        fallbacks: misses served by a resident low-bit copy instead of waiting (HOBBIT).
    """

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetches: int = 0
    prefetch_used: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    fallbacks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def hit_rate(self) -> float:
        """Share of demand lookups that did not wait for a fresh load."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Share of prefetched entries that were used."""
        return self.prefetch_used / self.prefetches if self.prefetches else 0.0

    def as_dict(self) -> dict:
        """Plain numbers for reports."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hit_rate, 4),
            "prefetch_hits": self.prefetch_hits,
            "prefetches": self.prefetches,
            "prefetch_accuracy": round(self.prefetch_accuracy, 4),
            "bytes_read": self.bytes_read,
            "stall_s": round(self.stall_s, 4),
            "fallbacks": self.fallbacks,
        }


@dataclass
class _Entry:
    w_in: Any
    w_out: Any
    nbytes: int
    future: Future | None = None
    prefetched: bool = False
    used: bool = False
    freq: int = 0
    urgent: bool = False  # a demand lookup waits for this prefetch: it stops yielding the link
    live_bytes: int = 0  # bytes of this entry's loaded objects not yet freed
    evicted: bool = False


class ExpertCache:
    """One byte-budgeted cache of expert weights for all layers.

    Args:
        store: where misses are read from.
        budget_bytes: the most bytes resident or in flight at any time.
        policy: ``"lru"``, ``"lfu"`` (LFU counts uses over the whole run; ties by recency) or
            ``"edgemoe"`` (frequency weighted by how soon the expert's layer runs again after the
            layer of the latest ``get``; ties by recency).
    """

    def __init__(self, store: ExpertStore, budget_bytes: int, policy: str = "lru") -> None:
        if policy not in ("lru", "lfu", "edgemoe"):
            raise ValueError(f"policy={policy!r} is not valid; choose 'lru', 'lfu' or 'edgemoe'")
        biggest = max(store.expert_bytes(lay, e) for lay, n in enumerate(store.num_experts) for e in range(n))
        if budget_bytes < biggest:
            raise ValueError(
                f"expert cache budget {budget_bytes} bytes is below one expert ({biggest} bytes); raise --expert-cache-bytes"
            )
        self.store, self.budget, self.policy = store, int(budget_bytes), policy
        self.stats = OffloadStats()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._freq: dict[Key, int] = {}
        self._current_layer = -1  # layer of the latest get (the edgemoe policy's reference point)
        self._used_bytes = 0
        self._zombie_bytes = 0  # evicted, but still referenced outside the cache
        self._warned_zombies = False
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
        self.max_used_bytes = 0

    @property
    def used_bytes(self) -> int:
        """Bytes alive: resident or reserved by loads in flight, plus evicted ones still referenced."""
        return self._used_bytes + self._zombie_bytes

    def _note_peak(self) -> None:
        self.max_used_bytes = max(self.max_used_bytes, self._used_bytes + self._zombie_bytes)

    def _released(self, entry: _Entry, nbytes: int) -> None:
        # weakref.finalize callback: a loaded tensor/module was freed.
        with self._lock:
            entry.live_bytes -= nbytes
            if entry.evicted:
                self._zombie_bytes -= nbytes

    def _evict_for(self, nbytes: int, protect: set[Key]) -> bool:
        """Evicts until ``nbytes`` fit; False when only loads in flight hold the missing bytes."""
        while self._used_bytes + self._zombie_bytes + nbytes > self.budget:
            victims = [k for k, e in self._entries.items() if e.future is None and k not in protect]
            if not victims:
                if self._used_bytes + nbytes <= self.budget:
                    return self._zombies_in_the_way()
                return False
            if self.policy == "lru":
                victim = victims[0]  # OrderedDict keeps recency order: oldest first
            elif self.policy == "edgemoe":
                from moekit.compress.edgemoe import eviction_priority

                num_l, cur = len(self.store.num_experts), self._current_layer
                victim = min(victims, key=lambda k: eviction_priority(self._freq.get(k, 0), k[0], cur, num_l))
            else:
                victim = min(victims, key=lambda k: self._freq.get(k, 0))
            entry = self._entries.pop(victim)
            self._used_bytes -= entry.nbytes
            entry.evicted = True
            self._zombie_bytes += entry.live_bytes
            entry.w_in = entry.w_out = None  # the cache's references go; the finalizers count the rest
            del entry
        return True

    def _zombies_in_the_way(self) -> bool:
        # Evicted experts are still referenced elsewhere (an autograd graph, a caller's variable):
        # collect cycles once, then go on over budget rather than deadlock, and say why once.
        gc.collect()
        if self._zombie_bytes and not self._warned_zombies:
            self._warned_zombies = True
            warnings.warn(
                f"expert cache: {self._zombie_bytes} bytes of evicted experts are still referenced outside "
                f"the cache, so resident expert bytes exceed the budget of {self.budget}; run offloaded "
                "models under torch.no_grad() and do not keep expert tensors",
                RuntimeWarning,
                stacklevel=4,
            )
        return True

    def _load(self, key: Key, entry: _Entry, demand: bool = True) -> None:
        w_in, w_out, nbytes = self.store.read(*key, urgent=None if demand else (lambda: entry.urgent))
        with self._lock:
            for obj in (w_in, w_out):
                size = object_bytes(obj)
                entry.live_bytes += size
                weakref.finalize(obj, self._released, entry, size).atexit = False
            entry.w_in, entry.w_out = w_in, w_out
            self.stats.bytes_read += nbytes
            del w_in, w_out

    def prefetch(self, keys: list[Key], protect: set[Key] | None = None) -> None:
        """Starts background loads of ``keys`` that are not resident, if the budget allows."""
        with self._lock:
            for key in keys:
                if key in self._entries:
                    continue
                nbytes = self.store.expert_bytes(*key)
                if not self._evict_for(nbytes, set(protect or ()) | set(keys)):
                    return
                entry = _Entry(None, None, nbytes, prefetched=True)
                self._entries[key] = entry
                self._used_bytes += nbytes
                self._note_peak()
                self.stats.prefetches += 1
                entry.future = self._pool.submit(self._finish_prefetch, key, entry)

    def _finish_prefetch(self, key: Key, entry: _Entry) -> None:
        self._load(key, entry, demand=False)
        with self._lock:
            entry.future = None

    def is_resident(self, layer: int, expert: int) -> bool:
        """True when the expert is loaded (a lookup now would not wait)."""
        with self._lock:
            entry = self._entries.get((layer, expert))
            return entry is not None and entry.future is None

    def get(self, layer: int, expert: int) -> tuple[Any, Any]:
        """The loaded weights of one expert (what the store's ``read`` returns), loading it (and
        evicting others) if needed. Do not keep the result past the expert's compute: a reference
        held while the next expert loads keeps evicted bytes alive."""
        key = (layer, expert)
        t0 = time.perf_counter()
        with self._lock:
            self._current_layer = layer
            self._freq[key] = self._freq.get(key, 0) + 1
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                if entry.prefetched and not entry.used:
                    entry.used = True
                    self.stats.prefetch_used += 1
                if entry.future is None:
                    self.stats.hits += 1
                    self.stats.prefetch_hits += int(entry.prefetched)
                    return entry.w_in, entry.w_out
                future = entry.future
                if future.cancel():
                    # Still queued behind other prefetches: load it now as a demand load instead.
                    entry.future, entry.prefetched = None, False
                    self.stats.prefetches -= 1
                    self.stats.prefetch_used -= 1
                    future = None
                else:
                    entry.urgent = True  # loading now: finish it without yielding the link
        if entry is not None:  # a prefetch is (or was to be) loading it: count the stall
            if future is not None:
                future.result()
            else:
                self._load(key, entry)
            with self._lock:
                self.stats.misses += 1
                self.stats.stall_s += time.perf_counter() - t0
            return entry.w_in, entry.w_out
        nbytes = self.store.expert_bytes(layer, expert)
        while True:
            with self._lock:
                if self._evict_for(nbytes, {key}):
                    entry = _Entry(None, None, nbytes)
                    self._entries[key] = entry
                    self._used_bytes += nbytes
                    self._note_peak()
                    break
                # Every other byte is reserved by prefetches: drop the queued ones, and let the
                # one loading land, then evict.
                pending = []
                for k, e in list(self._entries.items()):
                    if e.future is None:
                        continue
                    if e.future.cancel():
                        del self._entries[k]
                        self._used_bytes -= e.nbytes
                        self.stats.prefetches -= 1
                        e.evicted = True
                    else:
                        pending.append(e.future)
            for f in pending:
                f.result()
        self._load(key, entry)
        with self._lock:
            self.stats.misses += 1
            self.stats.stall_s += time.perf_counter() - t0
        return entry.w_in, entry.w_out

    def close(self) -> None:
        """Waits for loads in flight and stops the prefetch thread."""
        self._pool.shutdown(wait=True)
