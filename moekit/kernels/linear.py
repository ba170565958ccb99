"""fp32 decode kernels (``csrc/decode_f32.cpp``): a streaming small-M linear and a fused one-token MoE.

Shape legend: N = input rows (tokens, at most :data:`MAX_NATIVE_ROWS` for the native op), C = input
width, R = output rows, E = experts, K = experts chosen for the token, D = model width, F = expert
hidden width, H = input-projection rows (2F for SwiGLU, gate rows first; F for GELU variants).

At batch 1 a decode step reads every weight once, so its speed is the rate at which the matrix-
vector products stream weights. MKL's sgemm at M=1 streams 7-17 GB/s on this AMD EPYC; the native
GEMV (4 rows per pass, AVX-512, rows split across threads) streams about twice that
(``benchmarks/bench_kernels.py``). The fused MoE op computes a token's K experts in one parallel
region: gate and up rows in one pass over ``w_in[e]``, the activation, the down projection, the
gate weights and the slot-order sum, with one barrier between the two projections.

Every wrapper takes the native op when :func:`native_available` and the inputs fit
(:func:`linear_fits`, :func:`moe_fits`: CPU float32, no autograd, unit inner stride), and otherwise
the pure-PyTorch reference (``F.linear``; the per-expert loop), which gives the same result up to
float rounding (the experts' reference is :meth:`~moekit.layers.experts.ExpertWeights.decode_token`,
which the stacked storage's override falls back to). ``MOEKIT_KERNELS=0`` (read on every call)
selects the references everywhere.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.kernels.build import kernels_enabled, load_ops

#: input rows up to which :func:`linear` takes the native GEMV (beyond it MKL's GEMM is faster).
MAX_NATIVE_ROWS = 8
#: the activations the fused MoE op implements, with the op's codes.
MOE_ACTIVATIONS = {"swiglu": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}


@functools.cache
def _load() -> bool:
    if not load_ops("decode_f32"):
        return False
    _register_fakes()
    return True


def native_available() -> bool:
    """True when the native fp32 decode ops are built and loaded and ``MOEKIT_KERNELS`` allows them."""
    return kernels_enabled() and _load()


def _register_fakes() -> None:
    # Shapes only, so a torch.compile graph can hold the ops (they run as opaque calls).
    @torch.library.register_fake("moekit::linear_f32")
    def _linear_fake(x, weight, bias=None):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("moekit::moe_decode_f32")
    def _moe_fake(x, w_in, w_out, ids, gates, act):
        return x.new_empty(1, w_in.shape[2])


def _f32_cpu(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def _no_grad(*tensors: Tensor | None) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def linear_fits(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether the native GEMV can compute ``F.linear(x, weight, bias)`` (see the module doc)."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    return (
        _f32_cpu(x)
        and _f32_cpu(weight)
        and weight.dim() == 2
        and weight.stride(-1) == 1
        and 0 < rows <= MAX_NATIVE_ROWS
        and (bias is None or (_f32_cpu(bias) and bias.dim() == 1 and bias.is_contiguous()))
        and _no_grad(x, weight, bias)
    )


def uses_native_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether :func:`linear` on these inputs runs the native op (what tests assert)."""
    return native_available() and linear_fits(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, native: bool | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., C]``, ``weight [R, C]`` -> ``[..., R]``.

    Native for a few rows of CPU float32 (``native=None`` asks :func:`native_available`; False
    forces the reference). A non-contiguous ``x`` is copied first; the op itself accepts any row
    stride but rejects a non-unit inner stride.
    """
    if native is None:
        native = native_available()
    if not (native and linear_fits(x, weight, bias)):
        return F.linear(x, weight, bias)
    x_NC = x.reshape(-1, x.shape[-1])
    if x_NC.stride(-1) != 1:
        x_NC = x_NC.contiguous()
    y_NR = torch.ops.moekit.linear_f32(x_NC, weight, bias)
    return y_NR.view(*x.shape[:-1], weight.shape[0])


def moe_fits(x_1D: Tensor, w_in_EHD: Tensor, w_out_EDF: Tensor, activation: str) -> bool:
    """Whether the fused op can compute this token's experts (one row, float32, contiguous stacks)."""
    return (
        activation in MOE_ACTIVATIONS
        and _f32_cpu(x_1D)
        and x_1D.numel() == w_in_EHD.shape[-1]
        and _f32_cpu(w_in_EHD)
        and _f32_cpu(w_out_EDF)
        and w_in_EHD.is_contiguous()
        and w_out_EDF.is_contiguous()
        and _no_grad(x_1D, w_in_EHD, w_out_EDF)
    )


def uses_native_moe(x_1D: Tensor, w_in_EHD: Tensor, w_out_EDF: Tensor, activation: str) -> bool:
    """Whether :func:`moe_decode` may run on these inputs (native ops loaded and :func:`moe_fits`)."""
    return native_available() and moe_fits(x_1D, w_in_EHD, w_out_EDF, activation)


def moe_decode(
    x_1D: Tensor,
    w_in_EHD: Tensor,
    w_out_EDF: Tensor,
    ids_K: Tensor | list[int],
    weights_1K: Tensor,
    activation: str,
) -> Tensor:
    """One token's routed experts with the native op: ``sum_k weights_1K[:, k] * expert_{ids[k]}(x_1D)``.

    ``x_1D [1, D]``; ``w_in_EHD [E, H, D]``, ``w_out_EDF [E, D, F]`` stacked weights; ``ids_K`` the
    K chosen experts (int64 tensor or ints) in slot order; ``weights_1K [1, K]`` their gate weights.
    Returns ``[1, D]``. Only call it where :func:`uses_native_moe` holds; the reference is
    :meth:`moekit.layers.experts.ExpertWeights.decode_token` (this module sits below the layers).
    """
    if not isinstance(ids_K, Tensor):
        ids_K = torch.tensor(ids_K, dtype=torch.long)
    gates_K = weights_1K.reshape(-1).to(torch.float32)
    return torch.ops.moekit.moe_decode_f32(
        x_1D.reshape(1, -1).contiguous(), w_in_EHD, w_out_EDF, ids_K, gates_K, MOE_ACTIVATIONS[activation]
    )
