"""Causal GQA self-attention with optional q/k RMSNorm, qkv bias and a KV cache; the SDPA mask.

Shape legend: B = batch, S = new tokens in this call, P = tokens already in the KV cache,
K = P + S keys, D = model width, H = query heads, G = key/value heads, Dh = head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.blocks.cache import KVCache
from moekit.blocks.config import AttentionConfig
from moekit.blocks.norm import RMSNorm
from moekit.blocks.rope import apply_rotary, deinterleave
from moekit.kernels.gemm import apply_linear


class Attention(nn.Module):
    """Causal self-attention with GQA, optional q/k RMSNorm, qkv bias and a KV cache.

    Parameters:
        q_proj ``[H*Dh, D]``, k_proj/v_proj ``[G*Dh, D]`` (biases when ``config.bias``),
        o_proj ``[D, H*Dh]``; q_norm/k_norm over ``Dh`` (per_head) or ``H*Dh``/``G*Dh`` (full);
        ``sinks [H]`` with ``config.sinks`` (None otherwise).

    Args:
        config: the :class:`~moekit.blocks.AttentionConfig`.
        layer_idx: which slot of a shared :class:`~moekit.blocks.KVCache` this layer uses.
    """

    def __init__(self, config: AttentionConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.qk_norm = config.qk_norm
        self.softmax_scale, self.clip_qkv = config.softmax_scale, config.clip_qkv
        self.rope_interleave = config.rope_interleave
        self.qk_norm_after_rope = config.qk_norm_after_rope
        self.rope = config.rope
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.dim, q_width, bias=config.bias)
        self.k_proj = nn.Linear(config.dim, kv_width, bias=config.bias)
        self.v_proj = nn.Linear(config.dim, kv_width, bias=config.bias)
        self.o_proj = nn.Linear(q_width, config.dim, bias=config.out_bias)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if config.sinks else None
        self.temperature_scale, self.temperature_floor = config.temperature_scale, config.temperature_floor
        self.norm_eps = config.norm_eps
        if config.qk_norm == "per_head":
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(q_width, config.norm_eps)
            self.k_norm = RMSNorm(kv_width, config.norm_eps)

    def forward(
        self,
        x_BSD: Tensor,
        cos_B1Sd: Tensor,
        sin_B1Sd: Tensor,
        mask_B1SK: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attends S new tokens to the cached and new keys.

        Args:
            x_BSD: ``[B, S, D]`` normed hidden states.
            cos_B1Sd, sin_B1Sd: RoPE tables for the new tokens' positions (unused without ``rope``).
            mask_B1SK: bool ``[B, 1, S, K]`` (True = may attend, see :func:`build_attention_mask`),
                or None for plain causal attention without a cache.
            cache: the KV cache to append to and read from.

        Returns:
            ``[B, S, D]``.
        """
        b, s, _ = x_BSD.shape
        q, k, v = (apply_linear(p, x_BSD) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHSd = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGSd = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSd = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "per_head" and not self.qk_norm_after_rope:
            q_BHSd, k_BGSd = self.q_norm(q_BHSd), self.k_norm(k_BGSd)
        if self.rope:
            if self.rope_interleave:
                q_BHSd, k_BGSd = deinterleave(q_BHSd), deinterleave(k_BGSd)
            q_BHSd = apply_rotary(q_BHSd, cos_B1Sd, sin_B1Sd)
            k_BGSd = apply_rotary(k_BGSd, cos_B1Sd, sin_B1Sd)
        if self.qk_norm_after_rope:
            q_BHSd, k_BGSd = self.q_norm(q_BHSd), self.k_norm(k_BGSd)
        if self.qk_norm == "l2":
            q_BHSd, k_BGSd = l2_norm(q_BHSd, self.norm_eps), l2_norm(k_BGSd, self.norm_eps)
        if self.temperature_scale is not None:
            past = cache.lengths[self.layer_idx] if cache is not None else 0
            q_BHSd = q_BHSd * self.temperature(past, s, q_BHSd.device).to(q_BHSd.dtype)
        if cache is not None:
            k_BGSd, v_BGSd = cache.update(self.layer_idx, k_BGSd, v_BGSd)
        gqa = self.num_kv_heads != self.num_heads
        if self.sinks is not None:
            out_BHSd = attend_with_sinks(q_BHSd, k_BGSd, v_BGSd, mask_B1SK, self.sinks, self.softmax_scale)
        else:
            out_BHSd = F.scaled_dot_product_attention(
                q_BHSd,
                k_BGSd,
                v_BGSd,
                attn_mask=mask_B1SK,
                is_causal=mask_B1SK is None,
                enable_gqa=gqa,
                scale=self.softmax_scale,
            )
        return apply_linear(
            self.o_proj, out_BHSd.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        )

    def temperature(self, num_past: int, num_new: int, device: torch.device) -> Tensor:
        """Llama 4's per-query temperature ``[S, 1]`` for cache slots ``num_past ..`` (see
        :class:`~moekit.blocks.AttentionConfig`)."""
        slots_S = torch.arange(num_past, num_past + num_new, device=device, dtype=torch.float32)
        scale_S = (
            torch.log1p(torch.floor((slots_S + 1.0) / self.temperature_floor)) * self.temperature_scale + 1.0
        )
        return scale_S[:, None]


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """Weightless RMS normalisation over the last dim, in float32 (Llama 4's q/k norm): ``[..., Dh]``."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def attend_with_sinks(
    q_BHSd: Tensor,
    k_BGKd: Tensor,
    v_BGKd: Tensor,
    mask_B1SK: Tensor | None,
    sinks_H: Tensor,
    scale: float | None = None,
) -> Tensor:
    """SDPA whose softmax denominators also hold a per-head sink logit: ``[B, H, S, Dh]``.

    ``softmax([q.k_1 * scale, ..., q.k_K * scale, sink_h])`` with the sink's column dropped
    afterwards, as GPT-OSS defines it. Done inside SDPA by appending one key of zeros (logit 0)
    whose additive mask entry is ``sink_h`` and whose value is zero, so the fused kernel still
    runs. ``mask_B1SK`` is bool (True = may attend) or None for causal attention with S == K.
    """
    b, h, s, d = q_BHSd.shape
    num_keys = k_BGKd.shape[2]
    if mask_B1SK is None:
        q_S1 = torch.arange(num_keys - s, num_keys, device=q_BHSd.device)[:, None]
        mask_B1SK = (torch.arange(num_keys, device=q_BHSd.device)[None, :] <= q_S1)[None, None]
    bias_BHSK = torch.zeros(mask_B1SK.shape, dtype=q_BHSd.dtype, device=q_BHSd.device)
    bias_BHSK = bias_BHSK.masked_fill(~mask_B1SK, float("-inf")).expand(b, h, s, num_keys)
    sink_BHS1 = sinks_H.to(q_BHSd.dtype).view(1, h, 1, 1).expand(b, h, s, 1)
    bias_BHSK = torch.cat([bias_BHSK, sink_BHS1], dim=-1)
    zero_BG1d = k_BGKd.new_zeros(k_BGKd.shape[0], k_BGKd.shape[1], 1, d)
    return F.scaled_dot_product_attention(
        q_BHSd,
        torch.cat([k_BGKd, zero_BG1d], dim=2),
        torch.cat([v_BGKd, zero_BG1d], dim=2),
        attn_mask=bias_BHSK,
        enable_gqa=k_BGKd.shape[1] != h,
        scale=scale,
    )


def build_attention_mask(
    attention_mask_BK: Tensor | None,
    batch: int,
    num_new: int,
    num_past: int,
    sliding_window: int | None,
    device: torch.device,
    chunk_size: int | None = None,
) -> Tensor | None:
    """The boolean SDPA mask ``[B, 1, S, K]`` (True = may attend), or None for plain causal.

    Causal over cache slots, minus padded keys (``attention_mask_BK`` ``[B, K]``, 1 = real),
    minus keys outside the sliding window (each token sees itself and the previous
    ``sliding_window - 1``), minus keys outside the query's chunk (``chunk_size``: slots
    ``[c * chunk_size, (c + 1) * chunk_size)`` attend only within their chunk, Llama 4). Each query may always see itself, so rows of padding queries are
    never fully masked (SDPA would return NaN for them); their outputs are unused.
    """
    if attention_mask_BK is None and num_past == 0 and sliding_window is None and chunk_size is None:
        return None
    num_keys = num_past + num_new
    q_S1 = torch.arange(num_past, num_keys, device=device)[:, None]
    k_1K = torch.arange(num_keys, device=device)[None, :]
    allowed_SK = k_1K <= q_S1
    if sliding_window is not None:
        allowed_SK = allowed_SK & (q_S1 - k_1K < sliding_window)
    if chunk_size is not None and attention_mask_BK is None:
        allowed_SK = allowed_SK & (q_S1 // chunk_size == k_1K // chunk_size)
    allowed_BSK = allowed_SK.expand(batch, num_new, num_keys)
    if chunk_size is not None and attention_mask_BK is not None:
        # Chunks count real tokens: a left-padded row chunks exactly like the row alone.
        pos_BK = (attention_mask_BK.long().cumsum(-1) - 1).clamp_min(0)
        chunk_BK = pos_BK // chunk_size
        allowed_BSK = allowed_BSK & (chunk_BK[:, num_past:, None] == chunk_BK[:, None, :])
    if attention_mask_BK is not None:
        allowed_BSK = allowed_BSK & attention_mask_BK.to(torch.bool)[:, None, :]
        allowed_BSK = allowed_BSK | (k_1K == q_S1)
    return allowed_BSK.unsqueeze(1)
