"""Offloaded experts: a layer's storage served from an :class:`~moekit.offload.cache.ExpertCache`,
and the dispatcher that prefetches the next layer's experts.

Shape legend: T = tokens, D = model width, K = slots per token, N = rows given to the experts.

:class:`OffloadedExperts` is storage (``layer.experts``): expert e's weights come from the cache,
and its one ``forward_sorted`` loop serves every store kind (resident tensors or packed codes;
the store's ``compute`` runs a loaded expert). :class:`OffloadDispatcher` (``layer.dispatcher``)
asks a predictor for the next layer's experts, starts their prefetch, then runs permute ->
experts -> combine. :func:`offload_model` / :func:`serve_from_store` install both on every MoE
layer; the layer code does not change.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.layers import Dispatcher, ExpertWeights, MoELayer, combine, permute, require_plain_expert_math
from moekit.offload.cache import ExpertCache
from moekit.offload.store import FINGERPRINT_NAME, ExpertStore, read_fingerprint, store_file_sizes

Predictor = Callable[[int, Tensor, Tensor], list[int]]


class OffloadedExperts(ExpertWeights):
    """A layer's experts served from an :class:`ExpertCache` (storage only).

    Args:
        cache: the shared cache (its store decides what a loaded expert is and how it runs).
        layer_index: this layer's index among the model's MoE layers.
        num_experts, dim, ffn_dim, activation: as the resident experts.
        fallback: experts to run when an expert is not resident (e.g. ``moekit.compress``'s
            low-bit ``QuantizedExperts``, HOBBIT), or None to wait for the load.
    """

    def __init__(
        self,
        cache: ExpertCache,
        layer_index: int,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        activation: str,
        fallback: ExpertWeights | None = None,
    ) -> None:
        super().__init__()
        self.cache, self.layer_index, self.fallback = cache, layer_index, fallback
        self.num_experts, self.dim, self.ffn_dim, self.activation = num_experts, dim, ffn_dim, activation

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """Plain ``(w_in [H, D], w_out [D, F])`` of one expert from the cache (loads on a miss)."""
        return self.cache.store.tensors(*self.cache.get(self.layer_index, expert))

    def _run(self, expert: int, x_ND: Tensor, out_ND: Tensor) -> None:
        # The loaded weights live only in this frame: once it returns, an eviction frees them
        # (a reference kept across the next load would hold evicted bytes over the budget).
        if self.fallback is not None and not self.cache.is_resident(self.layer_index, expert):
            self.cache.prefetch([(self.layer_index, expert)])
            with self.cache.stats.lock:
                self.cache.stats.fallbacks += 1
            out_ND.copy_(self.fallback.expert_forward(expert, x_ND))
            return
        w_in, w_out = self.cache.get(self.layer_index, expert)
        self.cache.store.compute(w_in, w_out, x_ND, self.activation, out_ND)

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Runs one expert (loading it on a miss, or its fallback): ``[N, D] -> [N, D]``."""
        out_ND = x_ND.new_empty(x_ND.shape[0], self.dim)
        self._run(expert, x_ND, out_ND)
        return out_ND

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Expert e on the e-th contiguous slice; only the experts with rows are fetched."""
        y_ND = x_ND.new_empty(x_ND.shape[0], self.dim)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                self._run(expert, x_ND[start : start + count], y_ND[start : start + count])
                start += count
        return y_ND

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, num_experts={self.num_experts}, store={self.cache.store.root}"


class OffloadDispatcher(Dispatcher):
    """Local dispatch into :class:`OffloadedExperts` that first prefetches the next MoE layer's
    predicted experts on the cache's background thread (while this layer computes and the next
    attention runs). Reports backend ``"offload"``.

    Args:
        cache: the shared cache.
        layer_index, num_layers: this layer's index and the number of MoE layers.
        predictor: ``f(layer_index, x_TD, expert_ids_TK) -> experts of the next MoE layer``, or None.
    """

    def __init__(
        self, cache: ExpertCache, layer_index: int, num_layers: int, predictor: Predictor | None
    ) -> None:
        self.cache, self.layer_index, self.num_layers, self.predictor = (
            cache,
            layer_index,
            num_layers,
            predictor,
        )

    def dispatch(
        self, experts: ExpertWeights, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str
    ) -> tuple[Tensor, str]:
        """Prefetch the next layer's experts, then permute -> cached experts -> combine."""
        if self.predictor is not None and self.layer_index + 1 < self.num_layers:
            nxt = self.predictor(self.layer_index, x_TD, expert_ids_TK)
            mine = {
                (self.layer_index, int(e))
                for e in torch.unique(expert_ids_TK).tolist()
                if 0 <= e < experts.num_experts
            }
            self.cache.prefetch([(self.layer_index + 1, e) for e in nxt], protect=mine)
        x_ND, plan = permute(x_TD, expert_ids_TK, weights_TK, experts.num_experts)
        y_ND = experts.forward_sorted(x_ND, plan.counts)
        return combine(y_ND, plan, x_TD.shape[0]), "offload"

    def __repr__(self) -> str:
        return f"OffloadDispatcher(layer={self.layer_index}, prefetch={self.predictor is not None})"


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
    """The prefetch predictor named by ``prefetch``: None, ``"pregate"``, ``"stats"`` (first-order
    transitions) or ``"edgemoe"`` (transitions conditioned on this and the previous layer's choices,
    :func:`moekit.compress.edgemoe.edgemoe_predictor`); the last two need ``trace``."""
    if prefetch is None:
        return None
    if prefetch == "pregate":
        return pregate_predictor(model)
    if prefetch == "stats":
        if trace is None:
            raise ValueError("prefetch='stats' needs a routing trace (moekit trace) to learn from")
        return transition_predictor(trace)
    if prefetch == "edgemoe":
        if trace is None:
            raise ValueError("prefetch='edgemoe' needs a routing trace (moekit trace) to learn from")
        from moekit.compress.edgemoe import SecondOrderTransitions, edgemoe_predictor

        return edgemoe_predictor(SecondOrderTransitions.fit(trace.expert_ids, trace.num_experts))
    raise ValueError(f"prefetch={prefetch!r} is not valid; choose None, 'pregate', 'stats' or 'edgemoe'")


def prepare_store(
    store_dir: str | os.PathLike, kind: str, fingerprint: str, write: Callable[[Path], object]
) -> Path:
    """Reuses ``store_dir`` only if it was written from these very weights; otherwise rebuilds it.

    A store whose ``fingerprint.json`` names other weights, another store kind, or none at all
    (an older moekit), or whose data files changed size since, is rebuilt with a warning that
    says so. A path that is a file, or a folder
    holding something other than a store, is refused with a ``ValueError``.
    """
    root = Path(store_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"expert store {root} is a file; give a folder (it is created if missing)")
    meta = read_fingerprint(root) if root.is_dir() else None
    if meta is not None and meta.get("kind") == kind and meta.get("fingerprint") == fingerprint:
        if meta.get("files") == store_file_sizes(root):
            return root
        meta = dict(meta, fingerprint=f"{meta['fingerprint']} with changed files")
    if root.is_dir() and any(root.iterdir()):
        names = [p.name for p in root.iterdir()]
        store_names = [n for n in names if _is_store_file(n)]
        if len(store_names) != len(names):
            others = sorted(set(names) - set(store_names))[:3]
            raise ValueError(
                f"expert store {root} holds files that are not an expert store ({', '.join(others)}); "
                "give an empty or new folder"
            )
        why = (
            "has no fingerprint (written by an older moekit)"
            if meta is None
            else f"was written from other weights (fingerprint {meta.get('kind')}:{meta.get('fingerprint')}, "
            f"this model {kind}:{fingerprint})"
        )
        warnings.warn(f"expert store {root} {why}; rebuilding it for this model", UserWarning, stacklevel=3)
        for name in store_names:
            path = root / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    write(root)
    return root


def _is_store_file(name: str) -> bool:
    stem = name.lstrip(".")
    return (
        stem.startswith("layer") or stem.startswith(FINGERPRINT_NAME) or stem.startswith("quant_store.json")
    )


def working_set_bytes(layers: list[MoELayer], store) -> int:
    """One token's working set: its experts at every MoE layer (the largest ``k`` per layer).

    Below this budget, least-recently-used eviction drops each expert before the next token
    needs it again, so every lookup misses.
    """
    total = 0
    for index, layer in enumerate(layers):
        cfg = layer.config
        k = cfg.min_k if cfg.router_type in ("top_p", "expert_choice") else cfg.top_k
        sizes = sorted((store.expert_bytes(index, e) for e in range(store.num_experts[index])), reverse=True)
        total += sum(sizes[: min(k, len(sizes))])
    return total


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
        store_dir: where the store is written; reused only if its fingerprint matches this
            model's expert weights, rebuilt (with a warning) otherwise (see :func:`prepare_store`).
        cache_bytes: the byte budget for every expert tensor alive (resident, in flight, or
            evicted but still referenced).
        policy: ``"lru"``, ``"lfu"`` or ``"edgemoe"``.
        prefetch: None, ``"pregate"``, ``"stats"`` or ``"edgemoe"`` (the last two need ``trace``).
        bandwidth: throttle store reads to this many bytes/s.
        fallback: per MoE layer, resident low-bit experts to run on a miss (HOBBIT); None waits.

    Returns:
        The cache (its ``stats`` hold the counters).
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("offload_model: the model has no MoE layers")
    require_plain_expert_math(layers, "offload")  # the store holds w_in/w_out only
    fingerprint = ExpertStore.model_fingerprint(model)  # hashed once, checked and written
    root = prepare_store(
        store_dir, ExpertStore.kind, fingerprint, lambda r: ExpertStore.write(model, r, fingerprint)
    )
    dtype = next(model.parameters()).dtype
    store = ExpertStore(root, bandwidth=bandwidth, dtype=dtype)
    return serve_from_store(model, layers, store, cache_bytes, policy, prefetch, trace, fallback)


def serve_from_store(
    model: nn.Module,
    layers: list[MoELayer],
    store,
    cache_bytes: int,
    policy: str = "lru",
    prefetch: str | None = None,
    trace=None,
    fallback: list[ExpertWeights] | None = None,
) -> ExpertCache:
    """Puts one cache over ``store`` and gives every MoE layer an :class:`OffloadedExperts`
    storage and an :class:`OffloadDispatcher` reading from it (any store kind).

    Warns when ``cache_bytes`` is below one token's working set (:func:`working_set_bytes`).
    """
    if store.num_experts != [layer.config.num_experts for layer in layers]:
        wanted = [layer.config.num_experts for layer in layers]
        raise ValueError(
            f"{store.root} holds experts {store.num_experts}, the model has {wanted}; use a fresh store folder"
        )
    cache = ExpertCache(store, cache_bytes, policy)
    minimum = working_set_bytes(layers, store)
    if cache_bytes < minimum:
        warnings.warn(
            f"expert cache budget {cache_bytes} bytes is below one token's working set ({minimum} bytes: "
            "the routed experts of every MoE layer), so almost every lookup will miss; the minimum useful "
            f"budget is {minimum} bytes",
            UserWarning,
            stacklevel=2,
        )
    predictor = make_predictor(model, prefetch, trace)
    for index, layer in enumerate(layers):
        old = layer.experts
        layer.experts = OffloadedExperts(
            cache,
            index,
            old.num_experts,
            old.dim,
            old.ffn_dim,
            old.activation,
            None if fallback is None else fallback[index],
        )
        layer.dispatcher = OffloadDispatcher(cache, index, len(layers), predictor)
    return cache
