"""float32 matrix products through oneDNN, which runs AVX-512 code on this AMD CPU where MKL does not.

Shape legend: M = rows of the left operand (tokens), K = the contracted width, N = output columns.

torch's ``aten::mm`` calls MKL's sgemm, which on this AMD EPYC streams at about 80 GFLOP/s on one
core (its Intel-tuned kernels are not chosen here); oneDNN, which torch also ships, gives 160-200
GFLOP/s on the same products (expert shapes, M = 256-512; ``benchmarks/bench_layer.py`` and
``python -m moekit.kernels.gemm`` measure it). :func:`mm` takes oneDNN's linear primitive
(``torch.ops.mkldnn._linear_pointwise``, a public op of torch's CPU build) for CPU float32
products of at least :data:`MIN_ROWS` rows and :data:`MIN_MACS` multiply-adds without autograd,
and ``torch.mm`` otherwise. Both
compute the same product up to float rounding (tests/test_gemm.py checks against float64).

:func:`linear` (with :func:`apply_linear` for modules) does the same for ``F.linear``, in the
forward and both backward products; the attention projections, dense FFNs and the LM head call
it, so training and prefill get oneDNN's rate on every large product.

``MOEKIT_KERNELS=0`` or ``MOEKIT_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from moekit.kernels.build import kernels_enabled

#: rows from which oneDNN is used (at a few rows the products are bandwidth-bound and equal).
MIN_ROWS = 8
#: multiply-adds (M * K * N) from which oneDNN is used. oneDNN builds a primitive per shape, about
#: 0.6-0.8 ms the first time a shape is seen (measured here at K=256, N=512), and expert row counts
#: change every step; below this size that cost is not won back (a 64-token step of a tiny model
#: ran 2.7x slower on oneDNN), above it the 2x rate wins.
MIN_MACS = 1 << 24


@functools.cache
def _has_op() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_enabled() -> bool:
    """Whether :func:`mm` may use oneDNN in this process (read on every call). Never inside a
    ``torch.compile`` trace: there the compiler picks the kernels."""
    if torch.compiler.is_compiling():
        return False
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
        and a_MK.shape[0] * a_MK.shape[1] * b_KN.shape[1] >= MIN_MACS
        and not (torch.is_grad_enabled() and (a_MK.requires_grad or b_KN.requires_grad))
    )


def swaps_operands(a_MK: Tensor, b_KN: Tensor) -> bool:
    """Whether :func:`mm` computes ``(b^T a^T)^T`` instead (what tests assert). The primitive
    copies a non-contiguous left operand (a weight gradient's ``g^T x``) at a slow strided rate:
    copying it first measured 10-15% faster, and when ``b`` is the narrower operand, copying
    ``b^T`` and the result instead about 1.5x (an expert's ``w_in`` gradient: 2.29 -> 1.53 ms)."""
    if a_MK.is_contiguous():
        return False
    num_m, num_k = a_MK.shape
    return b_KN.shape[1] * (num_k + num_m) < num_m * num_k


def mm(a_MK: Tensor, b_KN: Tensor, out: Tensor | None = None) -> Tensor:
    """``a_MK @ b_KN`` -> ``[M, N]`` (into ``out`` when given), like ``torch.mm``."""
    if not uses_onednn(a_MK, b_KN):
        return torch.mm(a_MK, b_KN, out=out)
    linear = torch.ops.mkldnn._linear_pointwise
    if swaps_operands(a_MK, b_KN):
        y_NM = linear(b_KN.t().contiguous(), a_MK, None, "none", [], "")
        return y_NM.t().contiguous() if out is None else out.copy_(y_NM.t())
    if not a_MK.is_contiguous():
        a_MK = a_MK.contiguous()
    # The primitive computes x @ w^T for a weight w [N, K]; b's transpose is that (a view).
    y_MN = linear(a_MK, b_KN.t(), None, "none", [], "")
    if out is None:
        return y_MN
    return out.copy_(y_MN)


class _OneDNNLinear(torch.autograd.Function):
    """``x @ w^T + b`` with oneDNN products in the forward and both backward products."""

    @staticmethod
    def forward(ctx, x_MK: Tensor, w_NK: Tensor, b_N: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_MK, w_NK)
        ctx.has_bias = b_N is not None
        return torch.ops.mkldnn._linear_pointwise(x_MK, w_NK, b_N, "none", [], "")

    @staticmethod
    def backward(ctx, grad_MN: Tensor):
        x_MK, w_NK = ctx.saved_tensors
        grad_x = mm(grad_MN, w_NK) if ctx.needs_input_grad[0] else None
        grad_w = mm(grad_MN.t(), x_MK) if ctx.needs_input_grad[1] else None
        grad_b = grad_MN.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear_fits(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether :func:`linear` runs oneDNN on these operands (CPU float32, at least
    :data:`MIN_ROWS` rows; with or without autograd)."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    return (
        onednn_enabled()
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.device.type == weight.device.type == "cpu"
        and weight.dim() == 2
        and rows >= MIN_ROWS
        and rows * weight.shape[0] * weight.shape[1] >= MIN_MACS
        and x.shape[-1] == weight.shape[1]
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., K]``, ``weight [N, K]`` -> ``[..., N]``, with
    oneDNN products (forward and backward) where :func:`linear_fits`, else ``F.linear``."""
    if not linear_fits(x, weight, bias):
        return F.linear(x, weight, bias)
    x_MK = x.reshape(-1, x.shape[-1])
    return _OneDNNLinear.apply(x_MK, weight, bias).view(*x.shape[:-1], weight.shape[0])


def apply_linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a projection: a plain ``nn.Linear`` without hooks goes through
    :func:`linear`; anything else (quantized, LoRA-wrapped, hooked for calibration) is called."""
    hooked = module._forward_hooks or module._forward_pre_hooks
    if type(module) is nn.Linear and not (hooked or _global_forward_hooks or _global_forward_pre_hooks):
        return linear(x, module.weight, module.bias)
    return module(x)


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
