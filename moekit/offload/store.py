"""Expert stores: expert weights in safetensors files read through mmap over one storage link.

Shape legend: H = input-projection rows, D = model width, F = expert hidden width.

* :class:`MappedSafetensors`: zero-copy views of one safetensors file.
* :class:`StorageLink`: the one link reads go over; demand loads first, prefetches in chunks, an
  optional ``bandwidth`` models an SSD or PCIe link ("slow store").
* :class:`ExpertStore`: one file per MoE layer, keys ``{e}.w_in`` / ``{e}.w_out``, plus
  ``fingerprint.json``: a hash of the tensors' bytes, names, shapes and dtypes the store was made
  from (:func:`weights_fingerprint`), so a store is never reused for other weights.

A store kind defines ``read`` (what a cache entry holds), ``compute`` (run one loaded expert) and
``tensors`` (its plain weights); ``moekit.offload.quantized`` adds a packed-code store.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.layers import MoELayer, StackedExpertWeights
from moekit.layers.experts import activate

FINGERPRINT_NAME = "fingerprint.json"

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

    def transfer(self, nbytes: int, copy: Callable[[], None], demand: bool = True) -> None:
        """One copy of ``nbytes`` over the link as a single chunk (a ring section's whole layer):
        ``copy`` runs holding the link, which is then held for ``nbytes / bandwidth`` seconds in
        all. A demand transfer goes before waiting prefetch chunks; a prefetch waits for demands."""
        ctx = self.demand() if demand else nullcontext()
        with ctx:
            self._chunk(nbytes, copy, demand)

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


def weights_fingerprint(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A hash of tensors' names, dtypes, shapes and bytes (hex): what a store was made from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named_tensors:
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def read_fingerprint(root: str | os.PathLike) -> dict | None:
    """The ``fingerprint.json`` of a store folder, or None when absent or unreadable (an older store)."""
    path = Path(root) / FINGERPRINT_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "fingerprint" in meta else None


def store_file_sizes(root: Path) -> dict[str, int]:
    """Byte sizes of a store's data files (``layer*.safetensors`` and ``quant_store.json``)."""
    names = [*root.glob("layer*.safetensors"), *root.glob("quant_store.json")]
    return {p.name: p.stat().st_size for p in sorted(names)}


def write_fingerprint(root: Path, kind: str, fingerprint: str, num_experts: list[int]) -> None:
    """Writes ``fingerprint.json`` last and atomically, so a half-written store never looks valid.

    It also records the data files' sizes: a file replaced or truncated afterwards makes the
    store stale (see ``moekit.offload.prepare_store``).
    """
    tmp = root / f".{FINGERPRINT_NAME}.tmp"
    meta = {
        "kind": kind,
        "fingerprint": fingerprint,
        "num_experts": num_experts,
        "files": store_file_sizes(root),
    }
    tmp.write_text(json.dumps(meta) + "\n")
    os.replace(tmp, root / FINGERPRINT_NAME)


def resident_expert_tensors(layers: list[MoELayer]) -> list[dict[str, Tensor]]:
    """Per MoE layer, the ``{e}.w_in``/``{e}.w_out`` tensors a resident store holds."""
    out = []
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
        out.append(tensors)
    return out


def tensors_fingerprint(per_layer: list[dict[str, Tensor]]) -> str:
    """:func:`weights_fingerprint` over every layer's store tensors."""
    return weights_fingerprint(
        (f"layer{index}.{name}", t) for index, tensors in enumerate(per_layer) for name, t in tensors.items()
    )


def write_layer_files(root: Path, per_layer: list[dict[str, Tensor]]) -> None:
    """One ``layer{l}.safetensors`` per MoE layer, each written atomically."""
    from safetensors.torch import save_file

    for index, tensors in enumerate(per_layer):
        tmp = root / f".layer{index}.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, root / f"layer{index}.safetensors")


class ExpertStore:
    """Expert weights on disk, one safetensors file per MoE layer, read through mmap.

    Args:
        root: folder with ``layer{l}.safetensors`` files (written by :meth:`write`).
        bandwidth: bytes/s to throttle reads to (None: as fast as the disk/page cache allows).
        dtype: dtype to return tensors in (None: as stored).
    """

    kind = "experts"

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

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the weights this store was written from (None: an older store)."""
        meta = read_fingerprint(self.root)
        return None if meta is None or meta.get("kind") != self.kind else meta["fingerprint"]

    @staticmethod
    def model_fingerprint(model: nn.Module) -> str:
        """The fingerprint a store written from ``model`` would carry."""
        return tensors_fingerprint(
            resident_expert_tensors([m for m in model.modules() if isinstance(m, MoELayer)])
        )

    @staticmethod
    def write(model: nn.Module, root: str | os.PathLike, fingerprint: str | None = None) -> Path:
        """Writes every MoE layer's experts of ``model`` to ``root`` (atomically per file), then
        the fingerprint (``fingerprint``: the caller's :meth:`model_fingerprint`, to hash once)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        per_layer = resident_expert_tensors([m for m in model.modules() if isinstance(m, MoELayer)])
        write_layer_files(root, per_layer)
        num_experts = [len(t) // 2 for t in per_layer]
        write_fingerprint(root, ExpertStore.kind, fingerprint or tensors_fingerprint(per_layer), num_experts)
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
        w_in, w_out = tensors.pop(names[0]), tensors.pop(names[1])
        nbytes = w_in.numel() * w_in.element_size() + w_out.numel() * w_out.element_size()
        if self.dtype is not None:
            w_in, w_out = w_in.to(self.dtype), w_out.to(self.dtype)
        return w_in, w_out, nbytes

    def expert_views(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        """``(w_in [H, D], w_out [D, F])`` of one expert as stored: views over the mapping, nothing
        read yet (copy them over :attr:`link` with :meth:`StorageLink.transfer`)."""
        f = self._files[layer]
        return f.view(f"{expert}.w_in"), f.view(f"{expert}.w_out")

    @staticmethod
    def compute(w_in: Tensor, w_out: Tensor, x_ND: Tensor, activation: str, out_ND: Tensor) -> None:
        """Runs one loaded expert into ``out_ND``: the same matmuls as the resident ``sorted`` path."""
        h_NH = torch.mm(x_ND, w_in.t())
        torch.mm(activate(h_NH, activation), w_out.t(), out=out_ND)

    @staticmethod
    def tensors(w_in: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor]:
        """``(w_in [H, D], w_out [D, F])`` of one loaded expert."""
        return w_in, w_out
