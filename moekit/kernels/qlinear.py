"""Quantized linears at small M and a one-token experts op (``csrc/quant_gemv.cpp``), with their
pure-PyTorch reference.

Shape legend: N = activation rows, R = output rows, C = input columns, G = weight groups per row,
g = group size, B = activation blocks per row (C / 32), K = experts of one token, D = model width,
F = expert hidden width, H = input-projection rows (2F for SwiGLU).

Weights are moekit's group-wise asymmetric codes: codes ``q`` (unsigned), a float16 scale ``s``
and a uint8 zero ``z`` per (row, group), ``w = (q - z) s``. Activations are quantized on the fly
in blocks of 32 as llama.cpp's q8_0 does (``d = amax / 127``, ``xq = round(x / d)``, int8), so

    ``y[n, r] = sum_b s_g(b) d_b (sum_{k in b} q xq) - sum_g s_g z_g sum_{b in g} d_b sum(xq_b)``.

The native op computes the block dots in int32 with AVX-512 VNNI (``dpbusd``: u8 codes x s8
activations); :func:`q_linear_reference` computes the same quantities in PyTorch (the block dots
are exact in float32 too: at most 32 * 255 * 127 < 2^24), so both paths agree up to the order of
the float sums.

Kernel layout (:func:`kernel_matrix`): rows in tiles of :data:`TILE` (the last tile holds the
``R % TILE`` rest), each tile block-interleaved so one 512-bit register holds 4 columns of all 16
rows and each ``dpbusd`` lane accumulates one output row: within a tile of ``h`` rows, block ``b``
(32 columns) takes ``h * bytes_per_block`` bytes; at 8 bits it is 8 lane groups, group ``k`` byte
``4 t + j`` = ``code[t, 32 b + 4 k + j]``; at 1..4 bits 4 groups, group ``m`` byte ``4 t + j`` =
``code[t, 32 b + 4 m + j] | code[t, 32 b + 16 + 4 m + j] << 4``. A tile's scales and zeros are
stored group-major (``[G, h]``). The shapes stay the stored ones (codes ``[R, C]`` or
``[R, C / 2]``, scale and zero ``[R, G]``); only the order inside a tile differs. Needs
``C % 32 == 0`` and ``g % 32 == 0`` (:func:`fits`).

Floor 0: imports nothing else from moekit.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.kernels.build import load_ops

QBLOCK = 32  # activation block
TILE = 16  # weight rows per kernel tile
ACTIVATIONS = {"swiglu": 0, "gelu": 1}


@functools.cache
def native_available() -> bool:
    """True when ``quant_gemv`` built and loaded (False with ``MOEKIT_KERNELS=0``); the first True
    also registers the ops' fake impls, so ``torch.compile`` graphs can call them."""
    if not load_ops("quant_gemv"):
        return False

    @torch.library.register_fake("moekit::q_linear")
    def _q_linear_fake(x, codes, scale, zero, bits, group):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("moekit::q_linear_portable")
    def _q_linear_portable_fake(x, codes, scale, zero, bits, group):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("moekit::q_experts_token")
    def _q_experts_fake(x, weights, ic, isc, iz, oc, osc, oz, bits, gi, go, act):
        return x.new_empty(1, x.shape[-1])

    return True


def fits(bits: int, group_size: int, num_cols: int) -> bool:
    """Whether the kernel runs an ``[*, num_cols]`` matrix of ``bits``-bit codes in groups of
    ``group_size`` (the reference runs the same cases)."""
    return (
        (bits == 8 or 1 <= bits <= 4)
        and num_cols % QBLOCK == 0
        and group_size > 0
        and group_size % QBLOCK == 0
        and num_cols % group_size == 0
    )


def _tiles(num_r: int) -> list[tuple[int, int, int]]:
    """``(first row, tiles, height)`` runs covering ``num_r`` rows: the full tiles, then the rest."""
    full = num_r // TILE
    runs = [(0, full, TILE)] if full else []
    if num_r % TILE:
        runs.append((full * TILE, 1, num_r % TILE))
    return runs


def kernel_matrix(
    codes_RC: Tensor, scale_RG: Tensor, zero_RG: Tensor, bits: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Stored-order codes uint8 ``[R, C]``, scale float16 ``[R, G]`` and zero uint8 ``[R, G]`` ->
    the kernel layout (see the module doc): ``(codes [R, C or C / 2], scale [R, G], zero [R, G])``."""
    num_r, num_c = codes_RC.shape
    num_g = scale_RG.shape[1]
    codes_out, scale_out, zero_out = [], [], []
    for first, num_t, h in _tiles(num_r):
        q = codes_RC[first : first + num_t * h].reshape(num_t, h, num_c // QBLOCK, QBLOCK)
        if bits == 8:
            lanes = q.reshape(num_t, h, num_c // QBLOCK, 8, 4)
        else:
            lo = q[..., :16].reshape(num_t, h, num_c // QBLOCK, 4, 4)
            lanes = lo | (q[..., 16:].reshape(num_t, h, num_c // QBLOCK, 4, 4) << 4)
        codes_out.append(lanes.permute(0, 2, 3, 1, 4).reshape(-1))
        for src, out in ((scale_RG, scale_out), (zero_RG, zero_out)):
            out.append(src[first : first + num_t * h].reshape(num_t, h, num_g).transpose(1, 2).reshape(-1))
    width = num_c if bits == 8 else num_c // 2
    return (
        torch.cat(codes_out).view(num_r, width),
        torch.cat(scale_out).view(num_r, num_g),
        torch.cat(zero_out).view(num_r, num_g),
    )


def stored_matrix(
    k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, bits: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`kernel_matrix`: ``(codes uint8 [R, C], scale [R, G], zero [R, G])`` in
    the stored (row-major) order."""
    num_r, width = k_codes.shape
    num_c = width if bits == 8 else 2 * width
    num_g = k_scale.shape[1]
    blocks = num_c // QBLOCK
    flat_c, flat_s, flat_z = k_codes.reshape(-1), k_scale.reshape(-1), k_zero.reshape(-1)
    codes_out, scale_out, zero_out = [], [], []
    for first, num_t, h in _tiles(num_r):
        span = slice(first * width, (first + num_t * h) * width)
        if bits == 8:
            lanes = flat_c[span].view(num_t, blocks, 8, h, 4).permute(0, 3, 1, 2, 4)
            codes_out.append(lanes.reshape(num_t * h, num_c))
        else:
            lanes = flat_c[span].view(num_t, blocks, 4, h, 4).permute(0, 3, 1, 2, 4)
            lo, hi = (lanes & 15).reshape(num_t * h, blocks, 16), (lanes >> 4).reshape(num_t * h, blocks, 16)
            codes_out.append(torch.cat([lo, hi], dim=-1).reshape(num_t * h, num_c))
        span = slice(first * num_g, (first + num_t * h) * num_g)
        for src, out in ((flat_s, scale_out), (flat_z, zero_out)):
            out.append(src[span].view(num_t, num_g, h).transpose(1, 2).reshape(num_t * h, num_g))
    return torch.cat(codes_out), torch.cat(scale_out), torch.cat(zero_out)


def quantize_activations(x_NC: Tensor) -> tuple[Tensor, Tensor]:
    """llama.cpp's q8_0 activation quantization: ``(xq [N, B, 32] float32 integers, d [N, B])``.

    The same float32 operations as the kernel (``d = amax / 127``, ``xq = round(x * (1 / d))``,
    round half to even), so both give the same integers.
    """
    num_n, num_c = x_NC.shape
    x_NBb = x_NC.float().reshape(num_n, num_c // QBLOCK, QBLOCK)
    d_NB = x_NBb.abs().amax(-1) / 127
    inv_NB = torch.where(d_NB != 0, 1 / d_NB, torch.zeros_like(d_NB))
    return torch.round(x_NBb * inv_NB[..., None]), d_NB


def q_linear_reference(
    x_NC: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_zero: Tensor,
    bits: int,
    group_size: int,
    dtype=torch.float32,
) -> Tensor:
    """The kernel's math in PyTorch on a kernel-layout matrix, summed in ``dtype`` (float64 for
    oracle tests): ``[N, R]``."""
    xq_NBb, d_NB = quantize_activations(x_NC)
    q_RC, scale_RG, zero_RG = stored_matrix(k_codes, k_scale, k_zero, bits)
    num_r, num_c = q_RC.shape
    blocks = num_c // QBLOCK
    dot_NRB = torch.einsum("nbk,rbk->nrb", xq_NBb, q_RC.view(num_r, blocks, QBLOCK).float())
    s_RB = scale_RG.float().repeat_interleave(group_size // QBLOCK, dim=1)
    z_RB = zero_RG.float().repeat_interleave(group_size // QBLOCK, dim=1)
    inner = dot_NRB.to(dtype) - z_RB.to(dtype) * xq_NBb.sum(-1).to(dtype)[:, None, :]
    return (inner * s_RB.to(dtype) * d_NB.to(dtype)[:, None, :]).sum(-1)


def _ops():
    # One indirection, so tests can count native calls.
    return torch.ops.moekit


def q_linear(
    x_NC: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, bits: int, group_size: int
) -> Tensor:
    """``x [N, C] -> float32 [N, R]`` over one quantized matrix in kernel layout
    (:func:`kernel_matrix`); the native op when it loaded, else :func:`q_linear_reference`."""
    if native_available():
        return _ops().q_linear(x_NC.float(), k_codes, k_scale, k_zero, bits, group_size)
    return q_linear_reference(x_NC, k_codes, k_scale, k_zero, bits, group_size)


def _act(h_NH: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_NH)


def q_experts_token_reference(
    x_1D: Tensor, weights_K: Tensor, experts: list, activation: str, dtype=torch.float32
):
    """The fused op's math in PyTorch: ``sum_k weights[k] * down_k(act(in_k(x)))``, ``[1, D]``.

    ``experts``: per slot ``(in_codes, in_scale, in_zero, out_codes, out_scale, out_zero, bits)``
    with the groups given as ``(in_group, out_group)`` in the last two fields.
    """
    out = None
    for slot, (ic, isc, iz, oc, osc, oz, bits, gi, go) in enumerate(experts):
        h = q_linear_reference(x_1D, ic, isc, iz, bits, gi, dtype)
        a = _act(h.float(), activation)
        y = q_linear_reference(a, oc, osc, oz, bits, go, dtype) * weights_K[slot].to(dtype)
        out = y if out is None else out + y
    return out


def q_experts_token(x_1D: Tensor, weights_K: Tensor, experts: list, activation: str) -> Tensor:
    """One token's K routed experts in one native call (see :func:`q_experts_token_reference`
    for ``experts``); float32 ``[1, D]``. Every expert must share the groups of the first."""
    if not native_available():
        return q_experts_token_reference(x_1D, weights_K, experts, activation)
    cols = list(zip(*experts, strict=True))
    return _ops().q_experts_token(
        x_1D.float(),
        weights_K.float(),
        list(cols[0]),
        list(cols[1]),
        list(cols[2]),
        list(cols[3]),
        list(cols[4]),
        list(cols[5]),
        list(cols[6]),
        experts[0][7],
        experts[0][8],
        ACTIVATIONS[activation],
    )
