"""Offloading quantized experts: the store keeps packed codes, so a miss moves ``b + 24/g`` bits
per weight instead of 32.

Shape legend: T = tokens, D = model width, N = rows given to one expert.

:class:`QuantizedExpertStore` is an :class:`~moekit.offload.store.ExpertStore` whose files hold
``{e}.w_in.qweight``/``.scale``/``.zero`` and the same for ``w_out`` (one safetensors file per MoE
layer, plus ``quant_store.json`` with each expert's width and shapes); a read returns two
:class:`~moekit.compress.kernels.PackedLinear` (kernel forms are built after the throttled read),
and its ``compute`` runs them. Everything else (the cache, budget, LRU/LFU, prefetch, counters,
the one forward loop of :class:`~moekit.offload.experts.OffloadedExperts`) is shared.
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
from moekit.layers import ExpertWeights
from moekit.layers.experts import activate
from moekit.offload.cache import ExpertCache
from moekit.offload.experts import prepare_store, serve_from_store
from moekit.offload.store import (
    ExpertStore,
    MappedSafetensors,
    StorageLink,
    tensors_fingerprint,
    write_fingerprint,
    write_layer_files,
)

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

    kind = "quantized"

    @staticmethod
    def _tensors_and_meta(model: nn.Module) -> tuple[list[dict[str, Tensor]], list[dict]]:
        per_layer, meta = [], []
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
            per_layer.append({k: v.contiguous() for k, v in tensors.items()})
            meta.append(
                {
                    "bits": experts.bits,
                    "group_size": [m.group_size for m in experts.w_in],
                    "w_in_shape": [experts.w_in[0].out_features, experts.w_in[0].in_features],
                    "w_out_shape": [experts.w_out[0].out_features, experts.w_out[0].in_features],
                    "activation": experts.activation,
                }
            )
        return per_layer, meta

    @staticmethod
    def model_fingerprint(model: nn.Module) -> str:
        """The fingerprint a store written from ``model`` would carry (packed codes plus widths)."""
        per_layer, meta = QuantizedExpertStore._tensors_and_meta(model)
        return tensors_fingerprint(per_layer) + _meta_hash(meta)

    @staticmethod
    def write(model: nn.Module, root: str | os.PathLike, fingerprint: str | None = None) -> Path:
        """Writes every MoE layer's :class:`QuantizedExperts` of ``model`` to ``root``, then the
        fingerprint (``fingerprint``: the caller's :meth:`model_fingerprint`, to hash once)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        per_layer, meta = QuantizedExpertStore._tensors_and_meta(model)
        write_layer_files(root, per_layer)
        (root / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        fingerprint = fingerprint or tensors_fingerprint(per_layer) + _meta_hash(meta)
        write_fingerprint(root, QuantizedExpertStore.kind, fingerprint, [len(m["bits"]) for m in meta])
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

    @staticmethod
    def compute(
        w_in: PackedLinear, w_out: PackedLinear, x_ND: Tensor, activation: str, out_ND: Tensor
    ) -> None:
        """Runs one loaded expert with its packed kernels into ``out_ND``."""
        out_ND.copy_(w_out(activate(w_in(x_ND), activation)))

    @staticmethod
    def tensors(w_in: PackedLinear, w_out: PackedLinear) -> tuple[Tensor, Tensor]:
        """Dequantized float32 ``(w_in [H, D], w_out [D, F])``."""
        return w_in.dequantized_weight(), w_out.dequantized_weight()


def _meta_hash(meta: list[dict]) -> str:
    import hashlib

    return hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=8).hexdigest()


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
    """:func:`moekit.offload.offload_model` for a model quantized by ``moekit.compress.quantize_model``.

    The experts go to a :class:`QuantizedExpertStore` (packed codes) and are served through one
    byte-budgeted cache; arguments as ``offload_model``. Returns the cache.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("offload_quantized_model: the model has no MoE layers")
    fingerprint = QuantizedExpertStore.model_fingerprint(model)
    root = prepare_store(
        store_dir,
        QuantizedExpertStore.kind,
        fingerprint,
        lambda r: QuantizedExpertStore.write(model, r, fingerprint),
    )
    kernel = getattr(getattr(model, "quant_config", None), "kernel", "auto")
    store = QuantizedExpertStore(root, bandwidth=bandwidth, kernel=kernel)
    return serve_from_store(model, layers, store, cache_bytes, policy, prefetch, trace, fallback)


__all__ = ["QuantizedExpertStore", "offload_quantized_model"]
