"""float32 matrix products through oneDNN, which runs AVX-512 code on this AMD CPU where MKL does not.

Shape legend: M = rows of the left operand (tokens), K = the contracted width, N = output columns.

torch's ``aten::mm`` calls MKL's sgemm, which on this AMD EPYC streams at about 80 GFLOP/s on one
core (its Intel-tuned kernels are not chosen here); oneDNN, which torch also ships, gives 160-200
GFLOP/s on the same products (expert shapes, M = 256-512; ``benchmarks/bench_layer.py`` and
``python -m moekit.kernels.gemm`` measure it). :func:`mm` takes oneDNN's linear primitive
(``torch.ops.mkldnn._linear_pointwise``, a public op of torch's CPU build) for CPU float32
products of at least :data:`MIN_ROWS` rows without autograd, and ``torch.mm`` otherwise. Both
compute the same product up to float rounding (tests/test_gemm.py checks against float64).

``MOEKIT_KERNELS=0`` or ``MOEKIT_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from moekit.kernels.build import kernels_enabled

#: rows from which oneDNN is used (at a few rows the products are bandwidth-bound and equal).
MIN_ROWS = 8


@functools.cache
def _has_op() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_enabled() -> bool:
    """Whether :func:`mm` may use oneDNN in this process (read on every call)."""
    flag = os.environ.get("MOEKIT_ONEDNN", "1").strip() not in ("0", "false", "no", "off")
    return flag and kernels_enabled() and _has_op()


def uses_onednn(a_MK: Tensor, b_KN: Tensor) -> bool:
    """Whether :func:`mm` on these operands runs oneDNN (what tests assert)."""
    return (
        onednn_enabled()
        and a_MK.dtype == torch.float32
        and b_KN.dtype == torch.float32
        and a_MK.device.type == "cpu"
        and b_KN.device.type == "cpu"
        and a_MK.dim() == 2
        and b_KN.dim() == 2
        and a_MK.shape[0] >= MIN_ROWS
        and a_MK.shape[1] > 0
        and b_KN.shape[1] > 0
        and not (torch.is_grad_enabled() and (a_MK.requires_grad or b_KN.requires_grad))
    )


def mm(a_MK: Tensor, b_KN: Tensor, out: Tensor | None = None) -> Tensor:
    """``a_MK @ b_KN`` -> ``[M, N]`` (into ``out`` when given), like ``torch.mm``."""
    if not uses_onednn(a_MK, b_KN):
        return torch.mm(a_MK, b_KN, out=out)
    # The primitive computes x @ w^T for a weight w [N, K]; b's transpose is that (a view).
    y_MN = torch.ops.mkldnn._linear_pointwise(a_MK, b_KN.t(), None, "none", [], "")
    if out is None:
        return y_MN
    return out.copy_(y_MN)


def _main() -> None:  # a quick side-by-side: python -m moekit.kernels.gemm
    import time

    for m, k, n in ((512, 512, 4096), (512, 2048, 512), (64, 512, 4096)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates = {}
        for name, fn in (("torch.mm (MKL)", torch.mm), ("moekit gemm.mm (oneDNN)", mm)):
            fn(a, b)
            t0 = time.perf_counter()
            for _ in range(10):
                fn(a, b)
            rates[name] = 2 * m * k * n * 10 / (time.perf_counter() - t0) / 1e9
        print(f"M={m} K={k} N={n}: " + ", ".join(f"{k_}: {v:.0f} GFLOP/s" for k_, v in rates.items()))


if __name__ == "__main__":
    _main()
