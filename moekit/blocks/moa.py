"""Mixture of attention heads (MoA, JetMoE): the MoE idea inside attention.

Shape legend: B = batch, S = new tokens, K = experts per token (top-k), G = key/value heads,
Dh = head width, D = model width, T = B * S tokens, E = attention experts, P = (token, slot) rows.

Each token routes to K attention experts (a :class:`~moekit.layers.Router`, softmax over the
chosen logits). Expert ``e``'s query projection ``w_q[e] [G*Dh, D]`` gives the token G query heads
per chosen expert, K * G in all; the keys and values come from one shared ``kv_proj``, so the KV
cache is that of G heads. Query head ``(g, k)`` attends with key head ``g`` (GQA with K query
heads per key head). Each expert's heads go through its output projection ``w_o[e] [D, G*Dh]``,
weighted by the routing weight, summed, plus one output bias ``[D]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.blocks.cache import KVCache
from moekit.blocks.config import MoAConfig
from moekit.blocks.rope import apply_rotary
from moekit.layers import MoEConfig, Router


class MixtureOfAttentionHeads(nn.Module):
    """JetMoE's MoA attention (see the module docstring).

    Parameters:
        router: :class:`~moekit.layers.Router` ``weight [E, D]``.
        w_q: ``[E, G*Dh, D]`` per-expert query projections.
        w_o: ``[E, D, G*Dh]`` per-expert output projections.
        kv_proj: ``Linear(D, 2*G*Dh)``, key rows first.
        out_bias: ``[D]``.

    Args:
        config: the :class:`~moekit.blocks.MoAConfig`.
        layer_idx: this layer's slot in a shared :class:`~moekit.blocks.KVCache`.
    """

    def __init__(self, config: MoAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        width = config.num_kv_heads * config.head_dim
        self.router = Router(
            MoEConfig(
                dim=config.dim,
                ffn_dim=width,
                num_experts=config.num_experts,
                top_k=config.top_k,
                softmax_order="after_topk",
            )
        )
        self.w_q = nn.Parameter(torch.empty(config.num_experts, width, config.dim))
        self.w_o = nn.Parameter(torch.empty(config.num_experts, config.dim, width))
        self.kv_proj = nn.Linear(config.dim, 2 * width, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(config.dim))
        self.reset_parameters(1 / math.sqrt(config.dim), 1 / math.sqrt(width))

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        """Normal init of the router and expert projections (``out_std`` for ``w_o``), zero bias."""
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w_q, std=std)
        nn.init.normal_(self.w_o, std=out_std)
        nn.init.normal_(self.kv_proj.weight, std=std)
        nn.init.zeros_(self.out_bias)

    def forward(
        self,
        x_BSD: Tensor,
        cos_B1Sd: Tensor,
        sin_B1Sd: Tensor,
        mask_B1SK: Tensor | None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attends S new tokens through their routed attention experts: ``[B, S, D] -> [B, S, D]``
        (the arguments of :class:`~moekit.blocks.Attention`)."""
        cfg = self.config
        b, s, dim = x_BSD.shape
        num_k, num_g, head = cfg.top_k, cfg.num_kv_heads, cfg.head_dim
        x_TD = x_BSD.reshape(-1, dim)
        route = self.router(x_TD)
        ids_TK, weights_TK = route.expert_ids_TK, route.weights_TK.to(x_BSD.dtype)
        slots = [(e, torch.nonzero(ids_TK == e, as_tuple=True)) for e in range(cfg.num_experts)]
        slots = [(e, t, k) for e, (t, k) in slots if t.numel()]

        q_TKW = x_TD.new_zeros(b * s, num_k, num_g * head)
        for e, t_P, k_P in slots:
            q_TKW[t_P, k_P] = F.linear(x_TD[t_P], self.w_q[e])
        # Query heads ordered (g, k): key head g serves its K query heads, as GQA expects.
        q_BHSd = (
            q_TKW.view(b, s, num_k, num_g, head).permute(0, 3, 2, 1, 4).reshape(b, num_g * num_k, s, head)
        )
        k_BSW, v_BSW = self.kv_proj(x_BSD).chunk(2, dim=-1)
        k_BGSd = k_BSW.view(b, s, num_g, head).transpose(1, 2)
        v_BGSd = v_BSW.view(b, s, num_g, head).transpose(1, 2)
        q_BHSd, k_BGSd = apply_rotary(q_BHSd, cos_B1Sd, sin_B1Sd), apply_rotary(k_BGSd, cos_B1Sd, sin_B1Sd)
        if cache is not None:
            k_BGSd, v_BGSd = cache.update(self.layer_idx, k_BGSd, v_BGSd)
        out_BHSd = F.scaled_dot_product_attention(
            q_BHSd, k_BGSd, v_BGSd, attn_mask=mask_B1SK, is_causal=mask_B1SK is None, enable_gqa=num_k > 1
        )
        a_TKW = out_BHSd.view(b, num_g, num_k, s, head).permute(0, 3, 2, 1, 4).reshape(b * s, num_k, -1)
        out_TD = x_TD.new_zeros(b * s, dim)
        for e, t_P, k_P in slots:
            y_PD = F.linear(a_TKW[t_P, k_P], self.w_o[e]) * weights_TK[t_P, k_P].unsqueeze(-1)
            out_TD.index_add_(0, t_P, y_PD)
        return (out_TD + self.out_bias).view(b, s, dim)
