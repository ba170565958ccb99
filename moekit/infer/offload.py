"""Expert offloading: experts live in a store and are loaded on demand into a byte-budgeted cache.

Shape legend: E = experts of a layer, T = tokens, D = model width, H = input-projection rows,
F = expert hidden width.

* :class:`ExpertStore` holds every (layer, expert) entry in safetensors files read through
  memory mapping (one file per MoE layer, keys ``{e}.w_in`` / ``{e}.w_out``). A ``bandwidth``
  throttles reads to model a real SSD or PCIe link ("slow store"): reading through the page
  cache at memory speed would hide everything.
* :class:`StorageLink` is that one link: demand loads go first, prefetches read in chunks and
  yield between them, so a wrong prefetch delays a miss by one chunk at most.
* :class:`ExpertCache` is one cache for all layers under one byte budget; prefetches in flight
  reserve their bytes, so the resident bytes never exceed the budget. Eviction: ``lru`` or
  ``lfu``.
* :class:`OffloadedExperts` replaces a layer's :class:`~moekit.layers.ExpertWeights`; the layer
  code does not change. After computing a layer it asks a predictor for the next layer's
  experts and prefetches them on a background thread while the next attention runs.
* Predictors: ``pregate`` applies the next MoE layer's router to this layer's input (Pre-gated
  MoE); ``stats`` uses transition counts from a routing trace (EdgeMoE).
* :class:`OffloadStats` counts hits, misses, bytes read, prefetch accuracy and time stalled.

Offloaded computation uses the same matmuls as the resident ``sorted`` path, so offloaded
generation gives the same tokens (tested bit-exactly in float64).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.layers import ExpertWeights, MoELayer, StackedExpertWeights
from moekit.layers.experts import activate

Key = tuple[int, int]  # (MoE layer index, expert)


_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MappedSafetensors:
    """Zero-copy views of the tensors in one safetensors file, through one memory mapping.

    ``view(name)`` is a tensor over the mapped bytes (copy-on-write, so never written back):
    reading a chunk of it into resident memory is a single copy with the GIL released, where
    ``safe_open(...).get_slice`` would materialise a temporary first.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import json
        import mmap
        import struct

        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        header.pop("__metadata__", None)
        self._base = 8 + header_len
        self._meta = header

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self._meta)

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor."""
        start, end = self._meta[name]["data_offsets"]
        return end - start

    def view(self, name: str) -> Tensor:
        """The tensor ``name`` as a view over the mapping (no bytes read yet)."""
        meta = self._meta[name]
        start, end = meta["data_offsets"]
        dtype = _TORCH_DTYPES[meta["dtype"]]
        if end == start:
            return torch.empty(meta["shape"], dtype=dtype)
        flat = torch.frombuffer(
            self._map, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self._base + start
        )
        return flat.view(meta["shape"])


class StorageLink:
    """The one link expert weights are read over, shared by demand loads and prefetches.

    Demand loads go first: a prefetch reads in chunks of ``chunk_bytes`` and takes the link for
    its next chunk only while no demand load is registered, so a wrong or early prefetch delays a
    miss by at most one chunk instead of a whole expert. Prefetches run one at a time, in order.
    With a ``bandwidth`` each chunk holds the link for ``chunk bytes / bandwidth`` seconds (a
    "slow store" that models an SSD or PCIe link); sleep overshoot is carried over as credit so the
    link's average rate stays exact.

    Args:
        bandwidth: bytes/s (None: as fast as the page cache allows).
        chunk_bytes: prefetch preemption granularity.
    """

    def __init__(self, bandwidth: float | None = None, chunk_bytes: int = 1 << 20) -> None:
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive bytes/s, got {bandwidth}")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.bandwidth, self.chunk_bytes = bandwidth, int(chunk_bytes)
        self._cond = threading.Condition()
        self._busy = False
        self._demands = 0
        self._credit_s = 0.0  # sleep overshoot owed back to the next chunk

    @contextmanager
    def demand(self):
        """Registers a demand load for the block's duration: prefetch chunks wait meanwhile."""
        with self._cond:
            self._demands += 1
        try:
            yield
        finally:
            with self._cond:
                self._demands -= 1
                self._cond.notify_all()

    def _chunk(self, nbytes: int, copy: Callable[[], None], urgent: bool) -> None:
        with self._cond:
            while self._busy or (not urgent and self._demands):
                self._cond.wait()
            self._busy = True
        try:
            t0 = time.perf_counter()
            copy()
            if self.bandwidth:
                budget = nbytes / self.bandwidth - self._credit_s
                copied = time.perf_counter() - t0
                if budget > copied:
                    time.sleep(budget - copied)
                self._credit_s = max(0.0, (time.perf_counter() - t0) - max(budget, copied))
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def read(
        self, f: MappedSafetensors, names: list[str], urgent: Callable[[], bool] | None = None
    ) -> dict[str, Tensor]:
        """Reads tensors ``names`` of a mapped safetensors file over the link, row chunk by chunk.

        ``urgent``: None for a demand load (registered for the whole read); for a prefetch, a
        callable asked before each chunk (True once a demand load waits for this very entry).
        """
        out: dict[str, Tensor] = {}
        ctx = self.demand() if urgent is None else nullcontext()
        with ctx:
            for name in names:
                src = f.view(name)
                dst = out[name] = torch.empty_like(src)
                if src.dim() == 0 or src.numel() == 0:
                    self._chunk(
                        f.nbytes(name), lambda dst=dst, src=src: dst.copy_(src), urgent is None or urgent()
                    )
                    continue
                row_bytes = max(1, src[0].numel() * src.element_size())
                step = max(1, self.chunk_bytes // row_bytes)
                for start in range(0, src.shape[0], step):
                    stop = min(src.shape[0], start + step)

                    def copy(dst=dst, src=src, start=start, stop=stop) -> None:
                        dst[start:stop].copy_(src[start:stop])

                    self._chunk((stop - start) * row_bytes, copy, urgent is None or urgent())
        return out


class ExpertStore:
    """Expert weights on disk, one safetensors file per MoE layer, read through mmap.

    Args:
        root: folder with ``layer{l}.safetensors`` files (written by :meth:`write`).
        bandwidth: bytes/s to throttle reads to (None: as fast as the disk/page cache allows).
        dtype: dtype to return tensors in (None: as stored).
    """

    def __init__(
        self, root: str | os.PathLike, bandwidth: float | None = None, dtype: torch.dtype | None = None
    ):
        self.root = Path(root)
        self.bandwidth, self.dtype = bandwidth, dtype
        files = sorted(self.root.glob("layer*.safetensors"), key=lambda p: int(p.stem[5:]))
        if not files:
            raise FileNotFoundError(
                f"no expert store in {self.root}; build one with ExpertStore.write(model, root)"
            )
        self._files = [MappedSafetensors(f) for f in files]
        self.link = StorageLink(bandwidth)
        self.num_experts = [len({k.split(".")[0] for k in f.keys()}) for f in self._files]  # noqa: SIM118
        self._bytes = {
            (layer, e): f.nbytes(f"{e}.w_in") + f.nbytes(f"{e}.w_out")
            for layer, f in enumerate(self._files)
            for e in range(self.num_experts[layer])
        }

    @staticmethod
    def write(model: nn.Module, root: str | os.PathLike) -> Path:
        """Writes every MoE layer's experts of ``model`` to ``root`` (atomically per file)."""
        from safetensors.torch import save_file

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        for index, layer in enumerate(layers):
            experts = layer.experts
            if not isinstance(experts, StackedExpertWeights):
                raise ValueError(
                    f"MoE layer {index}: expected resident stacked experts, got {type(experts).__name__}"
                )
            tensors = {}
            for e in range(experts.num_experts):
                tensors[f"{e}.w_in"] = experts.w_in[e].detach().contiguous()
                tensors[f"{e}.w_out"] = experts.w_out[e].detach().contiguous()
            tmp = root / f".layer{index}.safetensors.tmp"
            save_file(tensors, str(tmp))
            os.replace(tmp, root / f"layer{index}.safetensors")
        return root

    def expert_bytes(self, layer: int, expert: int) -> int:
        """Bytes of one entry as stored."""
        return self._bytes[(layer, expert)]

    def read(
        self, layer: int, expert: int, urgent: Callable[[], bool] | None = None
    ) -> tuple[Tensor, Tensor, int]:
        """Loads ``(w_in [H, D], w_out [D, F], bytes)`` over the link (see :class:`StorageLink`).

        ``urgent``: None for a demand load; a prefetch passes a callable (see
        :meth:`StorageLink.read`).
        """
        names = [f"{expert}.w_in", f"{expert}.w_out"]
        tensors = self.link.read(self._files[layer], names, urgent)
        w_in, w_out = tensors[names[0]], tensors[names[1]]
        nbytes = w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
        if self.dtype is not None:
            w_in, w_out = w_in.to(self.dtype), w_out.to(self.dtype)
        return w_in, w_out, nbytes


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
    w_in: Tensor | None
    w_out: Tensor | None
    nbytes: int
    future: Future | None = None
    prefetched: bool = False
    used: bool = False
    freq: int = 0
    urgent: bool = False  # a demand lookup waits for this prefetch: it stops yielding the link


class ExpertCache:
    """One byte-budgeted cache of expert weights for all layers.

    Args:
        store: where misses are read from.
        budget_bytes: the most bytes resident or in flight at any time.
        policy: ``"lru"`` or ``"lfu"`` (LFU counts uses over the whole run; ties by recency).
    """

    def __init__(self, store: ExpertStore, budget_bytes: int, policy: str = "lru") -> None:
        if policy not in ("lru", "lfu"):
            raise ValueError(f"policy={policy!r} is not valid; choose 'lru' or 'lfu'")
        biggest = max(store.expert_bytes(lay, e) for lay, n in enumerate(store.num_experts) for e in range(n))
        if budget_bytes < biggest:
            raise ValueError(
                f"expert cache budget {budget_bytes} bytes is below one expert ({biggest} bytes); raise --expert-cache-bytes"
            )
        self.store, self.budget, self.policy = store, int(budget_bytes), policy
        self.stats = OffloadStats()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._freq: dict[Key, int] = {}
        self._used_bytes = 0
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
        self.max_used_bytes = 0

    @property
    def used_bytes(self) -> int:
        """Bytes resident or reserved by loads in flight."""
        return self._used_bytes

    def _evict_for(self, nbytes: int, protect: set[Key]) -> bool:
        while self._used_bytes + nbytes > self.budget:
            victims = [k for k, e in self._entries.items() if e.future is None and k not in protect]
            if not victims:
                return False
            if self.policy == "lru":
                victim = victims[0]  # OrderedDict keeps recency order: oldest first
            else:
                victim = min(victims, key=lambda k: self._freq.get(k, 0))
            entry = self._entries.pop(victim)
            self._used_bytes -= entry.nbytes
        return True

    def _load(self, key: Key, entry: _Entry, demand: bool = True) -> None:
        w_in, w_out, nbytes = self.store.read(*key, urgent=None if demand else (lambda: entry.urgent))
        with self._lock:
            entry.w_in, entry.w_out = w_in, w_out
            self.stats.bytes_read += nbytes

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
                self.max_used_bytes = max(self.max_used_bytes, self._used_bytes)
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

    def get(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        """The weights of one expert, loading it (and evicting others) if needed."""
        key = (layer, expert)
        t0 = time.perf_counter()
        with self._lock:
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
                    self.max_used_bytes = max(self.max_used_bytes, self._used_bytes)
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


Predictor = Callable[[int, Tensor, Tensor], list[int]]


class OffloadedExperts(ExpertWeights):
    """A layer's experts served from an :class:`ExpertCache`.

    Args:
        cache: the shared cache.
        layer_index: this layer's index among the model's MoE layers.
        num_experts, dim, ffn_dim, activation: as the resident experts.
        predictor: ``f(layer_index, x_TD, expert_ids_TK) -> experts of the next MoE layer`` to
            prefetch, or None.
        fallback: experts to run when an expert is not resident (e.g. ``moekit.compress``'s
            low-bit ``QuantizedExperts``), or None to wait for the load.
    """

    def __init__(
        self,
        cache: ExpertCache,
        layer_index: int,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        activation: str,
        predictor: Predictor | None = None,
        num_layers: int = 1,
        fallback: ExpertWeights | None = None,
    ) -> None:
        super().__init__()
        # HOBBIT: a resident low-bit copy of this layer's experts, run on a miss instead of
        # waiting for the load (which is started in the background for later tokens).
        self.fallback = fallback
        self.cache, self.layer_index, self.predictor, self.num_layers = (
            cache,
            layer_index,
            predictor,
            num_layers,
        )
        self.num_experts, self.dim, self.ffn_dim, self.activation = num_experts, dim, ffn_dim, activation

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """Weights of one expert from the cache (loads on a miss)."""
        return self.cache.get(self.layer_index, expert)

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Same matmuls as the resident ``sorted`` path; only the experts with rows are fetched."""
        y_ND = x_ND.new_empty(x_ND.shape[0], self.dim)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                if self.fallback is not None and not self.cache.is_resident(self.layer_index, expert):
                    self.cache.prefetch([(self.layer_index, expert)])
                    with self.cache.stats.lock:
                        self.cache.stats.fallbacks += 1
                    y_ND[rows] = self.fallback.expert_forward(expert, x_ND[rows])
                    start += count
                    continue
                w_in, w_out = self.cache.get(self.layer_index, expert)
                h = torch.mm(x_ND[rows], w_in.t())
                torch.mm(activate(h, self.activation), w_out.t(), out=y_ND[rows])
                start += count
        return y_ND

    def routed_forward(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str) -> Tensor:
        """Permute -> cached experts -> combine, then prefetch the next layer's predicted experts."""
        from moekit.layers.dispatch import combine, permute

        if self.predictor is not None and self.layer_index + 1 < self.num_layers:
            nxt = self.predictor(self.layer_index, x_TD, expert_ids_TK)
            mine = {
                (self.layer_index, int(e))
                for e in torch.unique(expert_ids_TK).tolist()
                if 0 <= e < self.num_experts
            }
            self.cache.prefetch([(self.layer_index + 1, e) for e in nxt], protect=mine)
        x_ND, plan = permute(x_TD, expert_ids_TK, weights_TK, self.num_experts)
        y_ND = self.forward_sorted(x_ND, plan.counts)
        return combine(y_ND, plan, x_TD.shape[0])


def pregate_predictor(model: nn.Module, top_k: int | None = None) -> Predictor:
    """Pre-gated MoE: the next MoE layer's router applied to this layer's input."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]

    @torch.no_grad()
    def predict(index: int, x_TD: Tensor, expert_ids_TK: Tensor) -> list[int]:
        router = layers[index + 1].router
        k = top_k or layers[index + 1].config.top_k
        ids = router(x_TD).expert_ids_TK[:, :k]
        return torch.unique(ids[ids >= 0]).tolist()

    return predict


def transition_predictor(trace, top_k: int = 2) -> Predictor:
    """EdgeMoE-style statistics: P(next expert | this layer's experts) counted on a trace.

    For the tokens of a step, the predicted set is the union over tokens of the ``top_k`` most
    likely next experts given each token's first choice.
    """
    mats = trace.transition_topk(top_k)

    def predict(index: int, x_TD: Tensor, expert_ids_TK: Tensor) -> list[int]:
        if index >= len(mats):
            return []
        firsts = expert_ids_TK[:, 0]
        firsts = firsts[firsts >= 0]
        return torch.unique(mats[index][firsts]).tolist()

    return predict


def make_predictor(model: nn.Module, prefetch: str | None, trace=None) -> Predictor | None:
    """The prefetch predictor named by ``prefetch``: None, ``"pregate"`` or ``"stats"`` (needs ``trace``)."""
    if prefetch is None:
        return None
    if prefetch == "pregate":
        return pregate_predictor(model)
    if prefetch == "stats":
        if trace is None:
            raise ValueError("prefetch='stats' needs a routing trace (moekit trace) to learn from")
        return transition_predictor(trace)
    raise ValueError(f"prefetch={prefetch!r} is not valid; choose None, 'pregate' or 'stats'")


def offload_model(
    model: nn.Module,
    store_dir: str | os.PathLike,
    cache_bytes: int,
    policy: str = "lru",
    prefetch: str | None = None,
    bandwidth: float | None = None,
    trace=None,
    fallback: list[ExpertWeights] | None = None,
) -> ExpertCache:
    """Moves every MoE layer's experts to a store and serves them through one cache, in place.

    Args:
        model: a model with resident stacked experts.
        store_dir: where the store is written (reused if it already holds this model's experts).
        cache_bytes: the byte budget for resident plus in-flight experts.
        policy: ``"lru"`` or ``"lfu"``.
        prefetch: None, ``"pregate"`` or ``"stats"`` (needs ``trace``).
        bandwidth: throttle store reads to this many bytes/s.
        fallback: per MoE layer, resident low-bit experts to run on a miss (HOBBIT); None waits.

    Returns:
        The cache (its ``stats`` hold the counters).
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("offload_model: the model has no MoE layers")
    store_dir = Path(store_dir)
    if not any(store_dir.glob("layer*.safetensors")):
        ExpertStore.write(model, store_dir)
    dtype = next(model.parameters()).dtype
    store = ExpertStore(store_dir, bandwidth=bandwidth, dtype=dtype)
    return serve_from_store(
        model, layers, store, cache_bytes, policy, prefetch, trace, fallback, OffloadedExperts
    )


def serve_from_store(
    model: nn.Module,
    layers: list[MoELayer],
    store,
    cache_bytes: int,
    policy: str,
    prefetch: str | None,
    trace,
    fallback: list[ExpertWeights] | None,
    experts_cls: type[OffloadedExperts],
) -> ExpertCache:
    """Puts one cache over ``store`` and gives every MoE layer an ``experts_cls`` reading from it.

    Shared by resident-precision and quantized offloading (``moekit.compress.offload``).
    """
    if store.num_experts != [layer.config.num_experts for layer in layers]:
        wanted = [layer.config.num_experts for layer in layers]
        raise ValueError(
            f"{store.root} holds experts {store.num_experts}, the model has {wanted}; use a fresh store folder"
        )
    cache = ExpertCache(store, cache_bytes, policy)
    predictor = make_predictor(model, prefetch, trace)
    for index, layer in enumerate(layers):
        old = layer.experts
        layer.experts = experts_cls(
            cache,
            index,
            old.num_experts,
            old.dim,
            old.ffn_dim,
            old.activation,
            predictor,
            len(layers),
            None if fallback is None else fallback[index],
        )
    return cache
