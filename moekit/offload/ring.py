"""SE-MoE ring memory: a fixed ring of S layer sections that the MoE layers stream through.

Shape legend: T = tokens, D = model width, K = slots per token, N = rows given to the experts,
E = experts of the widest layer, H = expert input-projection rows, F = expert hidden width.

SE-MoE (Shen et al., 2022, "ring-memory inference") splits the accelerator's expert memory into
S equal sections arranged as a ring, each big enough for one MoE layer's experts. While layer i
computes from its section, one copy stream loads layer i+S-1 into the section layer i-1 just
freed; layers run in order and wrap around (the next token's layer 0 follows the last layer).
Unlike the per-expert cache (:mod:`moekit.offload.cache`), a section holds a whole layer, so the
loads do not depend on routing and can start S-1 layers ahead; the price is that every expert of
a layer is loaded, routed or not.

:class:`LayerRing` keeps the S sections as preallocated tensors (``[E, H, D]`` and ``[E, D, F]``
each), so expert memory is fixed at S layers whatever happens. :meth:`LayerRing.acquire` is the
one entry point: asked for layer i, it makes sure the window i, i+1, ..., i+S-1 (cyclic) is
resident or loading, reusing only sections outside the window, then waits for layer i. In the
steady cycle that is exactly SE-MoE's schedule; after an aborted forward (an exception between
layers) or any out-of-order call the same rule resynchronises the ring: a layer that is missing
is loaded on demand, and the window is refilled behind it.

``ring_offload_model(model, store_dir, num_sections, bandwidth)`` installs it on every MoE layer
(:class:`RingExperts` storage and :class:`RingDispatcher`, backend ``"ring"``). Outputs equal the
resident model's exactly: the expert matmuls are the store's ``compute`` on views of the section.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moekit.layers import Dispatcher, ExpertWeights, MoELayer, combine, permute
from moekit.offload.experts import prepare_store
from moekit.offload.store import ExpertStore


@dataclass
class RingStats:
    """Counters of one ring run.

    Attributes:
        layer_loads: whole-layer loads (prefetched and demanded).
        demand_loads: of those, loads the compute thread had to wait for from the start (the first
            layer, ``S = 1``, or a resynchronisation).
        bytes_read: bytes read from the store.
        stall_s: seconds the compute thread waited for a layer.
        max_resident_layers: the most layers held (resident or loading) at any time (<= S).
    """

    layer_loads: int = 0
    demand_loads: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    max_resident_layers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict:
        """Plain numbers for reports."""
        return {
            "layer_loads": self.layer_loads,
            "demand_loads": self.demand_loads,
            "bytes_read": self.bytes_read,
            "stall_s": round(self.stall_s, 4),
            "max_resident_layers": self.max_resident_layers,
        }


class LayerRing:
    """S preallocated layer sections over an :class:`~moekit.offload.ExpertStore`, filled by one
    copy thread in SE-MoE's round-robin order.

    Args:
        store: a plain expert store (every layer the same expert shapes; experts per layer may differ).
        num_sections: S >= 1; more sections than MoE layers are not allocated (the ring then holds
            every layer after the first pass and loads nothing more).
        dtype: dtype of the sections (None: the store's dtype, else the stored one).
    """

    def __init__(self, store: ExpertStore, num_sections: int, dtype: torch.dtype | None = None) -> None:
        if getattr(store, "kind", None) != ExpertStore.kind:
            raise ValueError(
                f"ring memory needs a plain expert store, got kind {getattr(store, 'kind', None)!r}"
            )
        if isinstance(num_sections, bool) or not isinstance(num_sections, int) or num_sections < 1:
            raise ValueError(f"num_sections must be a positive int, got {num_sections!r}")
        self.store = store
        self.num_layers = len(store.num_experts)
        self.num_sections = min(num_sections, self.num_layers)
        # Views over the store's mapping (no bytes read): a layer loads as one stack per tensor.
        self._views = [
            [store.expert_views(layer, e) for e in range(n)] for layer, n in enumerate(store.num_experts)
        ]
        shapes = {(v[0][0].shape, v[0][1].shape) for v in self._views}
        if len(shapes) != 1:
            raise ValueError(f"ring memory needs the same expert shapes in every layer, got {sorted(shapes)}")
        (in_shape, out_shape) = shapes.pop()
        num_e = max(store.num_experts)
        dtype = dtype or store.dtype or self._views[0][0][0].dtype
        # The ring's whole expert memory, allocated once: S sections of the widest layer.
        self.w_in_SEHD = [torch.empty(num_e, *in_shape, dtype=dtype) for _ in range(self.num_sections)]
        self.w_out_SEDF = [torch.empty(num_e, *out_shape, dtype=dtype) for _ in range(self.num_sections)]
        self.section_layer: list[int | None] = [None] * self.num_sections
        self._futures: list[Future | None] = [None] * self.num_sections
        self.stats = RingStats()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-ring")

    @property
    def section_bytes(self) -> int:
        """Bytes of one section (one layer of the widest expert count)."""
        t_in, t_out = self.w_in_SEHD[0], self.w_out_SEDF[0]
        return t_in.numel() * t_in.element_size() + t_out.numel() * t_out.element_size()

    def resident_layers(self) -> list[int]:
        """Layers resident or loading, section by section."""
        return [layer for layer in self.section_layer if layer is not None]

    def _load(self, section: int, layer: int, demand: bool) -> None:
        views = self._views[layer]
        num_e = len(views)
        w_in_EHD, w_out_EDF = self.w_in_SEHD[section][:num_e], self.w_out_SEDF[section][:num_e]
        nbytes = sum(self.store.expert_bytes(layer, e) for e in range(num_e))

        def copy() -> None:
            # One stack per tensor kind: two copies with the GIL released, not 2E small ones
            # (a copy thread that takes the GIL per expert starves the compute thread).
            if w_in_EHD.dtype == views[0][0].dtype:
                torch.stack([v[0] for v in views], out=w_in_EHD)
                torch.stack([v[1] for v in views], out=w_out_EDF)
            else:
                w_in_EHD.copy_(torch.stack([v[0] for v in views]))
                w_out_EDF.copy_(torch.stack([v[1] for v in views]))

        self.store.link.transfer(nbytes, copy, demand)
        with self.stats.lock:
            self.stats.bytes_read += nbytes

    def _claim(self, layer: int, keep: set[int]) -> int:
        """A section for ``layer``: one holding no layer of ``keep``, its pending load finished."""
        for s, held in enumerate(self.section_layer):
            if held is None or held not in keep:
                future = self._futures[s]
                if future is not None and not future.cancel():
                    future.result()  # never overwrite a section while a copy writes it
                self._futures[s] = None
                self.section_layer[s] = layer
                held_now = len(self.resident_layers())
                self.stats.max_resident_layers = max(self.stats.max_resident_layers, held_now)
                return s
        raise AssertionError("ring: no free section (the window is larger than the ring)")

    def acquire(self, layer: int) -> tuple[Tensor, Tensor]:
        """The section holding ``layer``'s experts ``(w_in [E, H, D], w_out [E, D, F])``, once loaded.

        Keeps the cyclic window ``layer .. layer + S - 1`` resident or loading (the layers behind
        it give up their sections), so the next S - 1 layers load while this one computes.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"ring: MoE layer {layer} out of range [0, {self.num_layers})")
        t0 = time.perf_counter()
        window = [(layer + j) % self.num_layers for j in range(self.num_sections)]
        keep = set(window)
        with self._lock:
            if layer not in self.section_layer:  # first use, S = 1, or resynchronising
                s = self._claim(layer, keep - {layer})
                self._load(s, layer, demand=True)
                with self.stats.lock:
                    self.stats.layer_loads += 1
                    self.stats.demand_loads += 1
            for ahead in window[1:]:
                if ahead not in self.section_layer:
                    s = self._claim(ahead, keep)
                    self._futures[s] = self._pool.submit(self._load, s, ahead, False)
                    with self.stats.lock:
                        self.stats.layer_loads += 1
            s = self.section_layer.index(layer)
            future = self._futures[s]
        if future is not None:
            future.result()
        with self.stats.lock:
            self.stats.stall_s += time.perf_counter() - t0
        return self.w_in_SEHD[s], self.w_out_SEDF[s]

    def close(self) -> None:
        """Waits for copies in flight and stops the copy thread."""
        self._pool.shutdown(wait=True)


class RingExperts(ExpertWeights):
    """A layer's experts served from a :class:`LayerRing` section (storage only).

    Args:
        ring: the shared ring.
        layer_index: this layer's index among the model's MoE layers.
        num_experts, dim, ffn_dim, activation: as the resident experts.
    """

    def __init__(
        self, ring: LayerRing, layer_index: int, num_experts: int, dim: int, ffn_dim: int, activation: str
    ) -> None:
        super().__init__()
        self.ring, self.layer_index = ring, layer_index
        self.num_experts, self.dim, self.ffn_dim, self.activation = num_experts, dim, ffn_dim, activation

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """``(w_in [H, D], w_out [D, F])`` of one expert: views of this layer's section."""
        w_in_EHD, w_out_EDF = self.ring.acquire(self.layer_index)
        return w_in_EHD[expert], w_out_EDF[expert]

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Runs one expert: ``[N, D] -> [N, D]``."""
        w_in, w_out = self.expert_tensors(expert)
        out_ND = x_ND.new_empty(x_ND.shape[0], self.dim)
        self.ring.store.compute(w_in, w_out, x_ND, self.activation, out_ND)
        return out_ND

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Expert e on the e-th contiguous slice, from the section (acquired once per call)."""
        w_in_EHD, w_out_EDF = self.ring.acquire(self.layer_index)
        y_ND = x_ND.new_empty(x_ND.shape[0], self.dim)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                self.ring.store.compute(
                    w_in_EHD[expert], w_out_EDF[expert], x_ND[rows], self.activation, y_ND[rows]
                )
                start += count
        return y_ND

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, num_experts={self.num_experts}, ring_sections={self.ring.num_sections}"


class RingDispatcher(Dispatcher):
    """Local dispatch into :class:`RingExperts`: the ring is asked for this layer (which starts the
    loads of the layers ahead) even when no token routes to an expert. Reports backend ``"ring"``."""

    def __init__(self, ring: LayerRing, layer_index: int) -> None:
        self.ring, self.layer_index = ring, layer_index

    def dispatch(
        self, experts: ExpertWeights, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str
    ) -> tuple[Tensor, str]:
        """Acquire the section, then permute -> experts -> combine."""
        self.ring.acquire(self.layer_index)
        x_ND, plan = permute(x_TD, expert_ids_TK, weights_TK, experts.num_experts)
        y_ND = experts.forward_sorted(x_ND, plan.counts)
        return combine(y_ND, plan, x_TD.shape[0]), "ring"

    def __repr__(self) -> str:
        return f"RingDispatcher(layer={self.layer_index}, sections={self.ring.num_sections})"


def ring_offload_model(
    model: nn.Module, store_dir: str | os.PathLike, num_sections: int, bandwidth: float | None = None
) -> LayerRing:
    """Moves every MoE layer's experts to a store and streams them through a ring of
    ``num_sections`` layer sections (SE-MoE), in place.

    Args:
        model: a model with resident stacked experts.
        store_dir: where the store is written (reused only for the same weights, see
            :func:`moekit.offload.prepare_store`).
        num_sections: S, the layers the ring holds at once (its whole expert memory).
        bandwidth: throttle store reads to this many bytes/s.

    Returns:
        The ring (``stats`` holds the counters; ``close()`` stops its copy thread).
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("ring_offload_model: the model has no MoE layers")
    fingerprint = ExpertStore.model_fingerprint(model)
    root = prepare_store(
        store_dir, ExpertStore.kind, fingerprint, lambda r: ExpertStore.write(model, r, fingerprint)
    )
    dtype = next(model.parameters()).dtype
    ring = LayerRing(ExpertStore(root, bandwidth=bandwidth, dtype=dtype), num_sections)
    for index, layer in enumerate(layers):
        old = layer.experts
        layer.experts = RingExperts(ring, index, old.num_experts, old.dim, old.ffn_dim, old.activation)
        layer.dispatcher = RingDispatcher(ring, index)
    return ring
