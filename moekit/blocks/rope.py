"""Rotary position embeddings: float32 tables (with linear/YaRN/llama3 scaling) and the rotation.

Shape legend: B = batch, S = positions asked for, N = positions in the tables, H = heads,
Dh = rotated width, F = Dh / 2 frequencies.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.blocks.config import RopeConfig


class RotaryEmbedding(nn.Module):
    """RoPE tables (rotate-half layout), precomputed in float32 and grown on demand.

    Buffers (not saved): ``cos``/``sin`` ``[N, Dh]`` for positions ``0..N-1``, already multiplied
    by the rope-scaling attention factor (YaRN).
    """

    def __init__(self, config: RopeConfig) -> None:
        super().__init__()
        # Kept as Python floats, not a buffer, so model.to(bfloat16) cannot round them.
        self.inv_freq, self.attention_factor = config.inv_freq_and_scale()
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(config.max_position_embeddings, torch.device("cpu"))

    def _build(self, num_positions: int, device: torch.device) -> None:
        # float64 angles: position * freq loses digits in float32 at long positions.
        pos_N = torch.arange(num_positions, dtype=torch.float64, device=device)
        inv_freq_F = torch.tensor(self.inv_freq, dtype=torch.float64, device=device)
        angles_NF = pos_N[:, None] * inv_freq_F[None, :]
        angles_ND = torch.cat([angles_NF, angles_NF], dim=-1)
        self.cos = (angles_ND.cos() * self.attention_factor).to(torch.float32)
        self.sin = (angles_ND.sin() * self.attention_factor).to(torch.float32)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the tables; rebuild them in float32 on the new device.
        super()._apply(fn, recurse)
        self._build(self.cos.shape[0], self.cos.device)
        return self

    def forward(self, position_ids_BS: Tensor, num_positions: int | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(cos, sin)``, each float32 ``[B, 1, S, Dh]``, for integer positions ``[B, S]``.

        ``num_positions`` is an upper bound on ``max(position_ids) + 1`` when the caller knows
        one; it saves a device sync.
        """
        if num_positions is None:
            num_positions = int(position_ids_BS.max()) + 1 if position_ids_BS.numel() else 0
        if num_positions > self.cos.shape[0]:
            self._build(max(num_positions, 2 * self.cos.shape[0]), self.cos.device)
        return self.cos[position_ids_BS].unsqueeze(1), self.sin[position_ids_BS].unsqueeze(1)


def apply_rotary(x_BHSd: Tensor, cos_B1Sd: Tensor, sin_B1Sd: Tensor) -> Tensor:
    """Rotates ``[B, H, S, Dh]`` by the position tables (rotate-half convention), in float32.

    Partial RoPE: when the tables are narrower than ``Dh`` (``[..., Dr]``, Dr < Dh), only the first
    Dr dims rotate and the rest pass through (GLM-4 ``partial_rotary_factor``).
    """
    rot = cos_B1Sd.shape[-1]
    if rot < x_BHSd.shape[-1]:
        rotated = apply_rotary(x_BHSd[..., :rot], cos_B1Sd, sin_B1Sd)
        return torch.cat([rotated, x_BHSd[..., rot:]], dim=-1)
    x32 = x_BHSd.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos_B1Sd + rotated * sin_B1Sd).to(x_BHSd.dtype)


def deinterleave(x: Tensor) -> Tensor:
    """``(x0, x1), (x2, x3), ...`` -> ``(x0, x2, ..., x1, x3, ...)`` over the last dim."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
