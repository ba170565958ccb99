"""Offloading quantized experts: the store keeps packed codes, so a miss moves ``b + 24/g`` bits
per weight instead of 32.

Shape legend: T = tokens, D = model width, N = rows given to one expert.

:class:`QuantizedExpertStore` is an :class:`~moekit.infer.offload.ExpertStore` whose files hold
``{e}.w_in.qweight``/``.scale``/``.zero`` and the same for ``w_out`` (one safetensors file per MoE
layer, plus ``quant_store.json`` with each expert's width and shapes); a read returns two
:class:`~moekit.compress.kernels.PackedLinear` (kernel forms are built after the throttled read).
:class:`OffloadedQuantizedExperts` runs them; the shared :class:`~moekit.infer.offload.ExpertCache`
(budget, LRU/LFU, prefetch, counters) is reused unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from moekit.compress.calibrate import moe_layers
from moekit.compress.experts import QuantizedExperts
from moekit.compress.kernels import PackedLinear
from moekit.compress.quant import QuantizedTensor
from moekit.infer.offload import (
    ExpertCache,
    ExpertStore,
    MappedSafetensors,
    OffloadedExperts,
    StorageLink,
    serve_from_store,
)
from moekit.layers import ExpertWeights
from moekit.layers.experts import activate

META_NAME = "quant_store.json"
_PARTS = ("qweight", "scale", "zero")


class QuantizedExpertStore(ExpertStore):
    """Quantized experts on disk, read through mmap at most at ``bandwidth`` bytes/s.

    Args:
        root: folder written by :meth:`write`.
        bandwidth: bytes/s to throttle reads to (None: unthrottled).
        kernel: kernel choice for the loaded :class:`PackedLinear` (see ``choose_kernel``).
    """

    def __init__(self, root: str | os.PathLike, bandwidth: float | None = None, kernel: str = "auto") -> None:
        self.root = Path(root)
        self.bandwidth, self.dtype, self.kernel = bandwidth, None, kernel
        meta_file = self.root / META_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"no quantized expert store in {self.root}; build one with QuantizedExpertStore.write"
            )
        self.meta = json.loads(meta_file.read_text())
        self._files = [MappedSafetensors(self.root / f"layer{i}.safetensors") for i in range(len(self.meta))]
        self.link = StorageLink(bandwidth)
        self.num_experts = [len(layer["bits"]) for layer in self.meta]
        self._bytes = {}
        for layer, f in enumerate(self._files):
            for e in range(self.num_experts[layer]):
                total = sum(f.nbytes(f"{e}.{proj}.{part}") for proj in ("w_in", "w_out") for part in _PARTS)
                self._bytes[(layer, e)] = total

    @staticmethod
    def write(model: nn.Module, root: str | os.PathLike) -> Path:
        """Writes every MoE layer's :class:`QuantizedExperts` of ``model`` to ``root``."""
        from safetensors.torch import save_file

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        meta = []
        for index, layer in enumerate(moe_layers(model)):
            experts = layer.experts
            if not isinstance(experts, QuantizedExperts):
                raise ValueError(
                    f"MoE layer {index}: expected QuantizedExperts (quantize_model first), got {type(experts).__name__}"
                )
            tensors = {}
            for e in range(experts.num_experts):
                for proj in ("w_in", "w_out"):
                    tensors.update(getattr(experts, proj)[e].quantized().state_dict(f"{e}.{proj}"))
            tmp = root / f".layer{index}.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, root / f"layer{index}.safetensors")
            meta.append(
                {
                    "bits": experts.bits,
                    "group_size": [m.group_size for m in experts.w_in],
                    "w_in_shape": [experts.w_in[0].out_features, experts.w_in[0].in_features],
                    "w_out_shape": [experts.w_out[0].out_features, experts.w_out[0].in_features],
                    "activation": experts.activation,
                }
            )
        (root / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        return root

    def read(
        self, layer: int, expert: int, urgent: Callable[[], bool] | None = None
    ) -> tuple[PackedLinear, PackedLinear, int]:
        """Loads one expert as ``(w_in, w_out, bytes)`` PackedLinear modules over the store's link."""
        f, m = self._files[layer], self.meta[layer]
        names = [f"{expert}.{proj}.{part}" for proj in ("w_in", "w_out") for part in _PARTS]
        tensors = self.link.read(f, names, urgent)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        bits, group = m["bits"][expert], m["group_size"][expert]
        mods = []
        for proj in ("w_in", "w_out"):
            qt = QuantizedTensor.from_state(
                tensors, f"{expert}.{proj}", bits, group, tuple(m[f"{proj}_shape"])
            )
            mods.append(PackedLinear(qt, kernel=self.kernel))
        return mods[0], mods[1], nbytes


class OffloadedQuantizedExperts(OffloadedExperts):
    """A layer's quantized experts served from an :class:`ExpertCache` over a
    :class:`QuantizedExpertStore` (same arguments as :class:`OffloadedExperts`)."""

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Runs one expert (loading it on a miss): ``[N, D] -> [N, D]``."""
        w_in, w_out = self.cache.get(self.layer_index, expert)
        return w_out(activate(w_in(x_ND), self.activation))

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """Dequantized ``(w_in [H, D], w_out [D, F])`` float32 (loads on a miss)."""
        w_in, w_out = self.cache.get(self.layer_index, expert)
        return w_in.dequantized_weight(), w_out.dequantized_weight()

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Expert e on the e-th contiguous slice; a low-bit ``fallback`` runs on misses if set."""
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
                else:
                    y_ND[rows] = self.expert_forward(expert, x_ND[rows])
                start += count
        return y_ND


def offload_quantized_model(
    model: nn.Module,
    store_dir: str | os.PathLike,
    cache_bytes: int,
    policy: str = "lru",
    prefetch: str | None = None,
    bandwidth: float | None = None,
    trace=None,
    fallback: list[ExpertWeights] | None = None,
) -> ExpertCache:
    """:func:`moekit.infer.offload.offload_model` for a model quantized by :func:`quantize_model`.

    The experts go to a :class:`QuantizedExpertStore` (packed codes) and are served through one
    byte-budgeted cache; arguments as ``offload_model``. Returns the cache.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("offload_quantized_model: the model has no MoE layers")
    store_dir = Path(store_dir)
    if not (store_dir / META_NAME).is_file():
        QuantizedExpertStore.write(model, store_dir)
    kernel = getattr(getattr(model, "quant_config", None), "kernel", "auto")
    store = QuantizedExpertStore(store_dir, bandwidth=bandwidth, kernel=kernel)
    return serve_from_store(
        model, layers, store, cache_bytes, policy, prefetch, trace, fallback, OffloadedQuantizedExperts
    )


__all__ = ["OffloadedQuantizedExperts", "QuantizedExpertStore", "offload_quantized_model"]
