"""Lightning attention (MiniMax): linear attention with a per-head exponential decay.

Shape legend: B = batch, H = heads, S = new tokens, Dh = head width, D = model width,
b = tokens in one block.

With ``q, k, v = silu(qkv_proj(x))`` per head and a decay ``lambda = exp(-s_h)``, token t reads

    o_t = q_t . S_t,    S_t = lambda * S_{t-1} + k_t^T v_t    (S_0 = 0, a [Dh, Dh] state per head)

so the layer carries a constant-size state instead of a KV cache. :func:`lightning_scan` computes
it in blocks (inside a block with the decay-masked ``q k^T``, across blocks through the state),
which is exact whatever the block size; a decode step is the same formula with one-token blocks.
The output is RMS-normed over all heads, gated by ``sigmoid(output_gate(x))`` and projected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.blocks.cache import KVCache
from moekit.blocks.config import LightningConfig
from moekit.blocks.norm import RMSNorm


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> Tensor:
    """MiniMax's decay rates ``s_h`` ``[H, 1, 1]``: ``2^(-8 h / H)`` for heads h = 1..H, scaled down
    linearly with depth (``1 - i / (L - 1)``, plus 1e-5 so the last layer still decays)."""
    base = 1 / (2 ** (8 / num_heads))
    exponent = torch.arange(num_heads) + 1
    factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return (base**exponent * factor)[:, None, None]


def lightning_scan(
    q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, slope_H11: Tensor, state_BHdd: Tensor, block_size: int
) -> tuple[Tensor, Tensor]:
    """The decayed linear attention of S tokens after ``state_BHdd``: ``(o [B, H, S, Dh], new state)``.

    Block by block: ``o = ((q k^T) * M) v + (q * exp(-s (i + 1))) S`` with ``M[i, j] = exp(-s (i - j))``
    for ``i >= j`` (0 above the diagonal), then ``S = exp(-s b) S + (k * exp(-s (b - 1 - j)))^T v``.
    """
    outputs = []
    state = state_BHdd
    num_new = q_BHSd.shape[2]
    for start in range(0, num_new, block_size):
        end = min(start + block_size, num_new)
        b = end - start
        q, k, v = q_BHSd[:, :, start:end], k_BHSd[:, :, start:end], v_BHSd[:, :, start:end]
        idx_b1 = torch.arange(1, b + 1, device=q.device, dtype=slope_H11.dtype)[:, None]
        q_decay_Hb1 = torch.exp(-slope_H11 * idx_b1)
        k_decay_Hb1 = torch.exp(-slope_H11 * (b - idx_b1))
        dist_bb = idx_b1 - idx_b1.T
        mask_Hbb = torch.exp(torch.where(dist_bb >= 0, -slope_H11 * dist_bb, float("-inf")))
        intra = ((q @ k.transpose(-1, -2)) * mask_Hbb.to(q.dtype)) @ v
        inter = (q * q_decay_Hb1.to(q.dtype)) @ state
        outputs.append(intra + inter)
        block_decay_H11 = torch.exp(-slope_H11 * b).to(q.dtype)
        state = state * block_decay_H11 + (k * k_decay_Hb1.to(q.dtype)).transpose(-1, -2) @ v
    return torch.cat(outputs, dim=2), state


class LightningAttention(nn.Module):
    """MiniMax's lightning attention layer (see the module docstring).

    Parameters:
        qkv_proj ``[3*H*Dh, D]`` (per head: q, k, v rows), output_gate ``[H*Dh, D]``,
        out_proj ``[D, H*Dh]``, norm ``[H*Dh]``; buffer ``slope_rate [H, 1, 1]`` (persistent, as
        checkpoints store it).

    Args:
        config: the :class:`~moekit.blocks.LightningConfig`.
        layer_idx: this layer's index (its decay rate and its state slot in a :class:`KVCache`).
    """

    def __init__(self, config: LightningConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        width = config.num_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.dim, 3 * width, bias=False)
        self.output_gate = nn.Linear(config.dim, width, bias=False)
        self.out_proj = nn.Linear(width, config.dim, bias=False)
        self.norm = RMSNorm(width, config.norm_eps)
        self.register_buffer(
            "slope_rate", lightning_slopes(config.num_heads, layer_idx, config.num_layers), persistent=True
        )

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recomputes ``slope_rate`` (``materialize`` calls this after giving the model real memory)."""
        cfg = self.config
        self.slope_rate.copy_(lightning_slopes(cfg.num_heads, self.layer_idx, cfg.num_layers))

    def forward(
        self, x_BSD: Tensor, token_mask_BS: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """``[B, S, D] -> [B, S, D]``; padding tokens (``token_mask_BS`` False) add nothing to the state."""
        cfg = self.config
        b, s, _ = x_BSD.shape
        qkv = F.silu(self.qkv_proj(x_BSD))
        if token_mask_BS is not None:
            qkv = qkv * token_mask_BS[:, :, None].to(qkv.dtype)
        qkv_BHSd3 = qkv.view(b, s, cfg.num_heads, 3 * cfg.head_dim).transpose(1, 2)
        q_BHSd, k_BHSd, v_BHSd = qkv_BHSd3.split(cfg.head_dim, dim=-1)
        state = cache.recurrent_state(self.layer_idx) if cache is not None else None
        if state is None:
            state = x_BSD.new_zeros(b, cfg.num_heads, cfg.head_dim, cfg.head_dim)
        out_BHSd, state = lightning_scan(q_BHSd, k_BHSd, v_BHSd, self.slope_rate, state, cfg.block_size)
        if cache is not None:
            cache.set_recurrent_state(self.layer_idx, state, s)
        out_BSW = self.norm(out_BHSd.transpose(1, 2).reshape(b, s, -1))
        return self.out_proj(torch.sigmoid(self.output_gate(x_BSD)) * out_BSW)
