"""MXFP4, the expert-weight format of the released GPT-OSS checkpoints: dequantized on import.

Shape legend: R = rows (any leading dims), G = 32-value blocks per row, C = G * 32 columns.

OCP microscaling FP4: each block of 32 values shares one 8-bit power-of-two scale (E8M0, bias
127) and each value is a 4-bit E2M1 float, two per byte, the low nibble first. A checkpoint
stores ``<name>_blocks`` (uint8 ``[..., G, 16]``) and ``<name>_scales`` (uint8 ``[..., G]``) in place
of ``<name>``; the dequantized ``[..., G * 32]`` rows are the weight's rows as GPT-OSS lays them out
before its transpose (``gate_up_proj``: ``[E, 2F, D]``, ``down_proj``: ``[E, D, F]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# E2M1 code -> value: sign bit 3, exponent bits 2-1, mantissa bit 0.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize_mxfp4(blocks_RG16: Tensor, scales_RG: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """MXFP4 blocks and scales -> ``[..., G * 32]`` values in ``dtype``.

    Args:
        blocks_RG16: uint8 ``[..., G, 16]``, two E2M1 codes per byte (low nibble = even column).
        scales_RG: uint8 ``[..., G]``, the exponent of each block plus 127.

    Raises:
        ValueError: the shapes do not pair up (naming both).
    """
    if blocks_RG16.shape[-1] != 16 or tuple(blocks_RG16.shape[:-1]) != tuple(scales_RG.shape):
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks_RG16.shape)} and scales {tuple(scales_RG.shape)} do not pair up "
            "(blocks must be [..., G, 16] with scales [..., G])"
        )
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks_RG16.device)
    codes = blocks_RG16.to(torch.int64)
    lo_RG16, hi_RG16 = lut[codes & 0x0F], lut[codes >> 4]
    values_RG32 = torch.stack([lo_RG16, hi_RG16], dim=-1).flatten(-2)
    exponent_RG1 = (scales_RG.to(torch.int32) - SCALE_BIAS).unsqueeze(-1)
    values_RG32 = torch.ldexp(values_RG32, exponent_RG1.to(torch.float32))
    return values_RG32.flatten(-2).to(dtype)
