"""Group-wise asymmetric weight quantization: round-to-nearest and GPTQ, bit packing.

Shape legend: R = output rows of a weight matrix, C = input columns, G = groups per row
(``C / g``), g = group size, N = calibration rows.

A matrix ``w [R, C]`` is split along C into groups of g columns. Each (row, group) has a scale
``s`` (stored float16) and an integer zero point ``z`` (stored uint8); codes ``q`` in
``[0, 2^b - 1]`` dequantize to ``(q - z) * s``. The range always contains 0 (``min <= 0 <= max``),
so ``z`` fits the code range and round-to-nearest is within ``s / 2`` of every weight.

Codes are packed 8 at a time into ``b`` bytes (any width 2..8, 3 included), so the stored size is
exactly ``R * C * b / 8`` bytes plus ``R * G * 3`` bytes of scales and zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.compress.config import check_bits

SCALE_BITS = 16  # float16 scale per group
ZERO_BITS = 8  # uint8 zero point per group
_MIN_SCALE = 2.0**-14  # smallest normal float16: keeps scales out of float16 subnormals


def overhead_bits(group_size: int) -> float:
    """Bits per weight spent on scales and zero points: ``(16 + 8) / g``."""
    return (SCALE_BITS + ZERO_BITS) / group_size


def effective_bits(bits: int, group_size: int) -> float:
    """Stored bits per weight including the scale/zero overhead."""
    return bits + overhead_bits(group_size)


def resolve_group(num_cols: int, group_size: int) -> int:
    """The group size used for a row of ``num_cols``: ``min(group_size, C)``; must divide C."""
    g = min(group_size, num_cols)
    if num_cols % g:
        raise ValueError(
            f"group_size={group_size} does not divide the input width {num_cols}; choose a group size that "
            f"divides every quantized matrix's input width (e.g. a power of two <= {num_cols})"
        )
    return g


def pack_codes(q_RC: Tensor, bits: int) -> Tensor:
    """Packs codes ``q [R, C]`` (values < 2^bits, C % 8 == 0) into uint8 ``[R, C * bits / 8]``.

    Eight codes form one ``8 * bits``-bit little-endian integer written as ``bits`` bytes.
    """
    num_r, num_c = q_RC.shape
    if num_c % 8:
        raise ValueError(f"pack_codes: the column count {num_c} must be a multiple of 8")
    if bits == 8:
        return q_RC.to(torch.uint8).contiguous()
    v = q_RC.to(torch.int64).view(num_r, num_c // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (v << shifts).sum(-1)  # [R, C/8], at most 24 bits for bits <= 3, 32 for 4
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).view(num_r, num_c * bits // 8)


def unpack_codes(packed: Tensor, bits: int, num_cols: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[R, C * bits / 8] -> uint8 [R, C]``."""
    if bits == 8:
        return packed
    num_r = packed.shape[0]
    if bits in (2, 4):  # whole codes per byte, lowest bits first: plain uint8 shifts
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(num_r, num_cols)
    wide = torch.int32 if bits * 8 < 32 else torch.int64  # 8 codes of 3 bits: a 24-bit word
    b = packed.to(wide).view(num_r, num_cols // 8, bits)
    byte_shifts = torch.arange(bits, dtype=wide) * 8
    word = (b << byte_shifts).sum(-1, dtype=wide)
    shifts = torch.arange(8, dtype=wide) * bits
    return ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).view(num_r, num_cols)


@dataclass
class QuantizedTensor:
    """One quantized matrix in its stored form.

    Attributes:
        packed: uint8 ``[R, C * bits / 8]`` packed codes (see :func:`pack_codes`).
        scale: float16 ``[R, G]``.
        zero: uint8 ``[R, G]`` integer zero points.
        bits: code width.
        group_size: g (divides C).
        shape: ``(R, C)``.
    """

    packed: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]

    def codes(self) -> Tensor:
        """Unpacked codes, uint8 ``[R, C]``."""
        return unpack_codes(self.packed, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q - z) * s`` as ``[R, C]`` in ``dtype`` (computed in float32)."""
        num_r, num_c = self.shape
        q_RGg = self.codes().view(num_r, -1, self.group_size).to(torch.float32)
        w = q_RGg.sub_(self.zero.to(torch.float32).unsqueeze(-1)).mul_(
            self.scale.to(torch.float32).unsqueeze(-1)
        )
        return w.view(num_r, num_c).to(dtype)

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """The tensors to save: ``{prefix}.qweight``, ``{prefix}.scale``, ``{prefix}.zero``."""
        return {f"{prefix}.qweight": self.packed, f"{prefix}.scale": self.scale, f"{prefix}.zero": self.zero}

    @classmethod
    def from_state(
        cls, tensors: dict[str, Tensor], prefix: str, bits: int, group_size: int, shape: tuple[int, int]
    ) -> QuantizedTensor:
        """Rebuilds from :meth:`state_dict` tensors; ValueError naming a missing or mis-shaped one."""
        num_r, num_c = shape
        want = {
            "qweight": (num_r, num_c * bits // 8),
            "scale": (num_r, num_c // group_size),
            "zero": (num_r, num_c // group_size),
        }
        parts = {}
        for name, expected in want.items():
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise ValueError(f"quantized checkpoint: missing tensor {key!r}")
            t = tensors[key]
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"quantized checkpoint: tensor {key!r} has shape {tuple(t.shape)}, expected {expected}"
                )
            parts[name] = t
        return cls(parts["qweight"], parts["scale"], parts["zero"], bits, group_size, (num_r, num_c))


def _group_params(w_RGg: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale (float16-representable, float32) and integer zero ``[R, G]`` of each group."""
    qmax = 2**bits - 1
    lo = w_RGg.amin(-1).clamp(max=0)
    hi = w_RGg.amax(-1).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(_MIN_SCALE)
    # Round up into float16 so the rounded scale still covers [lo, hi]: the error bound s/2 then
    # holds for the stored scale itself.
    scale = (scale * (1 + 2.0**-10)).to(torch.float16).to(torch.float32)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_rtn(w_RC: Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Round-to-nearest group-wise asymmetric quantization of ``w [R, C]``.

    Every weight is within ``scale / 2`` of its dequantized value.
    """
    check_bits(bits, "bits")
    num_r, num_c = w_RC.shape
    g = resolve_group(num_c, group_size)
    w_RGg = w_RC.detach().to(torch.float32).reshape(num_r, num_c // g, g)
    scale, zero = _group_params(w_RGg, bits)
    q = (torch.round(w_RGg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 2**bits - 1)
    q_RC = q.to(torch.uint8).view(num_r, num_c)
    return QuantizedTensor(
        pack_codes(q_RC, bits), scale.to(torch.float16), zero.to(torch.uint8), bits, g, (num_r, num_c)
    )


def quantize_gptq(
    w_RC: Tensor, hessian_CC: Tensor, bits: int, group_size: int, damp: float = 0.01
) -> QuantizedTensor:
    """GPTQ (Frantar et al. 2022): quantize columns in order, spreading each column's rounding
    error onto the not-yet-quantized columns through the inverse Hessian.

    Args:
        w_RC: weight ``[R, C]``; the layer computes ``x @ w.T``.
        hessian_CC: ``sum_n x_n x_n^T`` over calibration inputs ``x [N, C]`` (any positive scale).
        bits, group_size: as :func:`quantize_rtn`; group parameters are set from the
            error-updated weights when the first column of a group is reached (GPTQ's static order).
        damp: added to the diagonal, as a fraction of its mean.

    Returns:
        The quantized matrix, in the same stored form as :func:`quantize_rtn`.
    """
    check_bits(bits, "bits")
    num_r, num_c = w_RC.shape
    g = resolve_group(num_c, group_size)
    qmax = 2**bits - 1
    w = w_RC.detach().to(torch.float64).clone()
    h = hessian_CC.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(num_c, dtype=torch.float64) * (damp * torch.diag(h).mean())
    try:
        h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # numerically singular even after damping: fall back to RTN
        return quantize_rtn(w_RC, bits, group_size)
    q_RC = torch.empty(num_r, num_c, dtype=torch.uint8)
    scales = torch.empty(num_r, num_c // g)
    zeros = torch.empty(num_r, num_c // g)
    for i1 in range(0, num_c, g):  # one block per group: group params come from updated weights
        i2 = i1 + g
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = h_inv[i1:i2, i1:i2]
        scale, zero = _group_params(w1.to(torch.float32).unsqueeze(1), bits)
        scale, zero = scale[:, 0].double(), zero[:, 0].double()
        scales[:, i1 // g], zeros[:, i1 // g] = scale.float(), zero.float()
        for i in range(g):
            col = w1[:, i]
            q = (torch.round(col / scale) + zero).clamp(0, qmax)
            q_RC[:, i1 + i] = q.to(torch.uint8)
            err = (col - (q - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return QuantizedTensor(
        pack_codes(q_RC, bits), scales.to(torch.float16), zeros.to(torch.uint8), bits, g, (num_r, num_c)
    )


def stored_bits(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Exact stored bits of an ``[R, C]`` matrix: codes plus scales and zeros."""
    num_r, num_c = shape
    g = resolve_group(num_c, group_size)
    return num_r * num_c * bits + num_r * (num_c // g) * (SCALE_BITS + ZERO_BITS)


def relative_error(w_RC: Tensor, qt: QuantizedTensor) -> float:
    """``||w - dq(q(w))||_F / ||w||_F``."""
    diff = w_RC.float() - qt.dequantize()
    return float(diff.norm() / w_RC.float().norm().clamp_min(1e-12))


__all__ = [
    "QuantizedTensor",
    "effective_bits",
    "overhead_bits",
    "pack_codes",
    "quantize_gptq",
    "quantize_rtn",
    "relative_error",
    "resolve_group",
    "stored_bits",
    "unpack_codes",
]
