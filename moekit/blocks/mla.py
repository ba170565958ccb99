"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a compressed KV cache.

Shape legend: B = batch, S = new tokens, P = cached tokens, K = P + S keys, D = model width,
H = heads, R = ``kv_lora_rank`` (latent width), Dn = ``qk_nope_head_dim``, Dr = ``qk_rope_head_dim``,
Dv = ``v_head_dim``, Q = ``q_lora_rank``.

Queries are ``q_b_proj(norm(q_a_proj(x)))`` (or ``q_proj(x)`` without a query rank), split into a
no-RoPE part ``[.., Dn]`` and a RoPE part ``[.., Dr]``. Keys and values come from one latent:
``kv_a_proj(x) -> [R | Dr]``; the ``R`` part is normed and expanded per head by ``kv_b_proj`` into
``[k_nope Dn | v Dv]``, the ``Dr`` part is a single rotary key shared by all heads. The cache stores
only the normed latent ``[B, 1, K, R]`` and the rotated shared key ``[B, 1, K, Dr]`` (what
transformers 5 caches too), and expands them on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.blocks.cache import KVCache
from moekit.blocks.config import MLAConfig
from moekit.blocks.norm import RMSNorm
from moekit.blocks.rope import apply_rotary, deinterleave

# transformers builds the q_a/kv_a norms with its RMSNorm default eps, not config.rms_norm_eps.
MLA_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Causal multi-head latent attention with a latent KV cache.

    Parameters:
        q_a_proj ``[Q, D]``, q_a_norm ``[Q]``, q_b_proj ``[H*(Dn+Dr), Q]`` (or q_proj ``[H*(Dn+Dr), D]``
        when ``q_lora_rank`` is None), kv_a_proj ``[R+Dr, D]``, kv_a_norm ``[R]``,
        kv_b_proj ``[H*(Dn+Dv), R]``, o_proj ``[D, H*Dv]``. No biases.

    Args:
        config: the :class:`~moekit.blocks.MLAConfig`.
        layer_idx: which slot of a shared :class:`~moekit.blocks.KVCache` this layer uses.
    """

    def __init__(self, config: MLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.rope_interleave = config.rope_interleave
        self.scale = (
            config.softmax_scale
            if config.softmax_scale is not None
            else (self.nope_dim + self.rope_dim) ** -0.5
        )
        qk_dim = self.nope_dim + self.rope_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.dim, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.dim, config.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(config.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj = nn.Linear(config.dim, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_rank, MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, config.dim, bias=False)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.rope_interleave:
            x = deinterleave(x)
        return apply_rotary(x, cos, sin)

    def forward(
        self,
        x_BSD: Tensor,
        cos_B1Sr: Tensor,
        sin_B1Sr: Tensor,
        mask_B1SK: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Same contract as :meth:`moekit.blocks.Attention.forward`: ``[B, S, D] -> [B, S, D]``.

        The RoPE tables cover ``Dr`` dims. ``cache`` (a :class:`~moekit.blocks.KVCache`)
        stores the latent as "keys" ``[B, 1, K, R]`` and the shared rotary key as "values" ``[B, 1, K, Dr]``.
        """
        b, s, _ = x_BSD.shape
        h = self.num_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        q_BHSq = q.view(b, s, h, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q_BHSq.split([self.nope_dim, self.rope_dim], dim=-1)
        latent_BSR, k_rope_BSr = self.kv_a_proj(x_BSD).split([self.kv_rank, self.rope_dim], dim=-1)
        latent_B1SR = self.kv_a_norm(latent_BSR).unsqueeze(1)
        k_rope_B1Sr = self._rotate(k_rope_BSr.unsqueeze(1), cos_B1Sr, sin_B1Sr)
        q_rope = self._rotate(q_rope, cos_B1Sr, sin_B1Sr)
        if cache is not None:
            latent_B1SR, k_rope_B1Sr = cache.update(self.layer_idx, latent_B1SR, k_rope_B1Sr)
        num_k = latent_B1SR.shape[2]
        kv_BKHx = self.kv_b_proj(latent_B1SR.squeeze(1)).view(b, num_k, h, self.nope_dim + self.v_dim)
        k_nope_BHKn, v_BHKv = kv_BKHx.transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)
        k_BHKq = torch.cat([k_nope_BHKn, k_rope_B1Sr.expand(b, h, num_k, self.rope_dim)], dim=-1)
        q_BHSq = torch.cat([q_nope, q_rope], dim=-1)
        qk_dim = self.nope_dim + self.rope_dim
        if self.v_dim < qk_dim:
            # SDPA's fused CPU/GPU kernels need equal q/k/v head widths; with Dv != Dq it falls back to
            # the math path (6x slower at 512 tokens). Zero-padding v is exact: the padded columns
            # come out zero and are cut off.
            v_BHKv = F.pad(v_BHKv, (0, qk_dim - self.v_dim))
        out_BHSv = F.scaled_dot_product_attention(
            q_BHSq, k_BHKq, v_BHKv, attn_mask=mask_B1SK, is_causal=mask_B1SK is None, scale=self.scale
        )[..., : self.v_dim]
        return self.o_proj(out_BHSv.transpose(1, 2).reshape(b, s, h * self.v_dim))
