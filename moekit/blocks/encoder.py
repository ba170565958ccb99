"""Multi-head self-attention for encoders (ViT, CLIP's towers): biased projections, no RoPE,
bidirectional or causal, with an optional padding mask.

Shape legend: B = batch, S = tokens, D = model width, H = heads, Dh = head width (D / H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """Full-width multi-head self-attention, ``softmax(q k^T / sqrt(Dh)) v`` (ViT, CLIP).

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, each ``[D, D]`` (biases when ``bias``).

    Args:
        dim: model width D.
        num_heads: H (must divide D).
        bias: biases on all four projections (ViT and CLIP have them).
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"SelfAttention: num_heads={num_heads} must divide dim={dim} (both positive)")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x_BSD: Tensor, key_mask_BS: Tensor | None = None, causal: bool = False) -> Tensor:
        """Attends every token to the (earlier, when ``causal``) real tokens.

        Args:
            x_BSD: ``[B, S, D]`` normed hidden states.
            key_mask_BS: bool/0-1 ``[B, S]``, False/0 for padding keys; None = all real.
            causal: each token sees only itself and earlier tokens (CLIP's text tower).

        Returns:
            ``[B, S, D]``.
        """
        b, s, d = x_BSD.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x_BSD)), heads(self.k_proj(x_BSD)), heads(self.v_proj(x_BSD))
        mask = None
        if key_mask_BS is not None:
            allowed_BSS = key_mask_BS.to(torch.bool)[:, None, :].expand(b, s, s)
            if causal:
                allowed_BSS = allowed_BSS & torch.ones(s, s, dtype=torch.bool, device=x_BSD.device).tril()
            # A query with no real key to see (an all-padding row, or left padding under a causal
            # mask) sees itself, so no row is fully masked (SDPA would give NaN). Other padding
            # queries see only real keys, as in transformers (SigLIP pools such a position).
            alone_BS1 = ~allowed_BSS.any(-1, keepdim=True)
            allowed_BSS = allowed_BSS | (torch.eye(s, dtype=torch.bool, device=x_BSD.device) & alone_BS1)
            mask = allowed_BSS.unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))
