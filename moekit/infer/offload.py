"""Expert offloading: experts live in a store and are loaded on demand into a byte-budgeted cache.

Shape legend: E = experts of a layer, T = tokens, D = model width, H = input-projection rows,
F = expert hidden width.

* :class:`ExpertStore` holds every (layer, expert) entry in safetensors files read through
  memory mapping (one file per MoE layer, keys ``{e}.w_in`` / ``{e}.w_out``). A ``bandwidth``
  throttles reads to model a real SSD or PCIe link ("slow store"): reading through the page
  cache at memory speed would hide everything.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.layers import ExpertWeights, MoELayer, StackedExpertWeights
from moekit.layers.experts import activate

Key = tuple[int, int]  # (MoE layer index, expert)


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
        from safetensors import safe_open

        self.root = Path(root)
        self.bandwidth, self.dtype = bandwidth, dtype
        files = sorted(self.root.glob("layer*.safetensors"), key=lambda p: int(p.stem[5:]))
        if not files:
            raise FileNotFoundError(
                f"no expert store in {self.root}; build one with ExpertStore.write(model, root)"
            )
        self._files = [safe_open(str(f), framework="pt") for f in files]
        self._link = threading.Lock()  # one storage link: demand loads and prefetches share its bandwidth
        self.num_experts = [len({k.split(".")[0] for k in f.keys()}) for f in self._files]  # noqa: SIM118
        self._bytes = {
            (layer, e): _nbytes(f, f"{e}.w_in") + _nbytes(f, f"{e}.w_out")
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

    def read(self, layer: int, expert: int) -> tuple[Tensor, Tensor, int]:
        """Loads ``(w_in [H, D], w_out [D, F], bytes)``, at most at ``bandwidth``."""
        f = self._files[layer]
        with self._link:
            t0 = time.perf_counter()
            w_in = f.get_tensor(f"{expert}.w_in").clone()  # clone: leave the mmap, own the memory
            w_out = f.get_tensor(f"{expert}.w_out").clone()
            nbytes = w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
            if self.bandwidth:
                wait = nbytes / self.bandwidth - (time.perf_counter() - t0)
                if wait > 0:
                    time.sleep(wait)
        if self.dtype is not None:
            w_in, w_out = w_in.to(self.dtype), w_out.to(self.dtype)
        return w_in, w_out, nbytes


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4, "I64": 8}


def _nbytes(f, key: str) -> int:
    sl = f.get_slice(key)
    n = 1
    for dim in sl.get_shape():
        n *= dim
    return n * _DTYPE_BYTES[sl.get_dtype()]


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

    def _load(self, key: Key, entry: _Entry) -> None:
        w_in, w_out, nbytes = self.store.read(*key)
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
        self._load(key, entry)
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
        if entry is not None:  # a prefetch is loading it: wait for that load, count the stall
            future.result()
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
                # Every other byte is reserved by prefetches in flight: let them land, then evict.
                pending = [e.future for e in self._entries.values() if e.future is not None]
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
