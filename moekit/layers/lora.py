"""LoRA experts (Uni-MoE): one frozen dense FFN shared by every expert, plus a low-rank adapter
per expert on each of its projections.

Shape legend: E = experts, D = model width, F = hidden width, P = input projections (2 for
SwiGLU: gate then up; 1 for GELU), H = P * F input-projection rows, r = LoRA rank, N = rows given
to one call.

Expert e is the FFN whose weights are ``W + s B_e A_e`` on every projection, ``s = alpha / r``
(Uni-MoE's ``LlamaMLPLoRA``: a frozen base with its own LoRA on gate, up and down):

    h = x W_in^T + b_in + s [x A_p^T B_p^T]_p      (p over the P input projections, stacked on H)
    y = act(h) W_out^T + b_out + s act(h) A_out^T B_out^T

``B`` starts at zero, so every expert starts equal to the base FFN (an upcycled model equals its
dense parent whatever the router). The sorted path runs the shared base once over all rows and
only the adapters per expert; :meth:`LoRAExpertWeights.expert_tensors` gives the merged weights,
which is what tools that want two plain matrices per expert (the eager oracle, quantization,
offloading, :func:`merge_lora_experts`) read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.experts import (
    SWIGLU_ALPHA,
    SWIGLU_LIMIT,
    BiasedExpertWeights,
    ExpertWeights,
    StackedExpertWeights,
    in_rows,
)


class LoRAExpertWeights(ExpertWeights):
    """Experts that share one frozen base FFN and differ by per-expert low-rank adapters.

    Parameters:
        w_in ``[H, D]``, w_out ``[D, F]``: the shared base (``requires_grad=False``), laid out as
            one expert of :class:`~moekit.layers.StackedExpertWeights`.
        b_in ``[H]``, b_out ``[D]``: the base biases when ``bias`` (frozen too).
        lora_in_A ``[E, P, r, D]``, lora_in_B ``[E, P, F, r]``: adapters of the input projections.
        lora_out_A ``[E, r, F]``, lora_out_B ``[E, D, r]``: adapters of the down projection.
    """

    sorted_name = "lora_sorted"

    def __init__(
        self,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        activation: str = "swiglu",
        rank: int = 8,
        alpha: float = 16.0,
        bias: bool = False,
        swiglu_alpha: float = SWIGLU_ALPHA,
        swiglu_limit: float = SWIGLU_LIMIT,
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim, self.activation = num_experts, dim, ffn_dim, activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        self.rank, self.alpha = rank, alpha
        num_p = in_rows(ffn_dim, activation) // ffn_dim
        self.num_in_proj = num_p
        self.w_in = nn.Parameter(torch.empty(num_p * ffn_dim, dim), requires_grad=False)
        self.w_out = nn.Parameter(torch.empty(dim, ffn_dim), requires_grad=False)
        self.b_in = nn.Parameter(torch.zeros(num_p * ffn_dim), requires_grad=False) if bias else None
        self.b_out = nn.Parameter(torch.zeros(dim), requires_grad=False) if bias else None
        self.lora_in_A = nn.Parameter(torch.empty(num_experts, num_p, rank, dim))
        self.lora_in_B = nn.Parameter(torch.empty(num_experts, num_p, ffn_dim, rank))
        self.lora_out_A = nn.Parameter(torch.empty(num_experts, rank, ffn_dim))
        self.lora_out_B = nn.Parameter(torch.empty(num_experts, dim, rank))
        self.reset_parameters()

    def routed_parameters(self) -> list[nn.Parameter]:
        """The adapters only: the shared base is active for every token."""
        return [self.lora_in_A, self.lora_in_B, self.lora_out_A, self.lora_out_B]

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Base like two ``nn.Linear`` layers; adapters as PEFT does (A uniform with the fan-in
        bound, B zero), so every expert starts equal to the base."""
        self.w_in.uniform_(-1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        self.w_out.uniform_(-1 / math.sqrt(self.ffn_dim), 1 / math.sqrt(self.ffn_dim))
        self.reset_lora()

    def freeze_base(self) -> None:
        """Sets ``requires_grad=False`` on the shared base (what a caller that unfroze every
        parameter calls to restore the design)."""
        for p in (self.w_in, self.w_out, self.b_in, self.b_out):
            if p is not None:
                p.requires_grad_(False)

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0 (the adapters add nothing yet)."""
        self.lora_in_A.uniform_(-1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        self.lora_out_A.uniform_(-1 / math.sqrt(self.ffn_dim), 1 / math.sqrt(self.ffn_dim))
        self.lora_in_B.zero_()
        self.lora_out_B.zero_()

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """The merged ``(W_in + s B A [H, D], W_out + s B A [D, F])`` of one expert."""
        delta_in_HD = torch.bmm(self.lora_in_B[expert], self.lora_in_A[expert]).reshape(-1, self.dim)
        delta_out_DF = self.lora_out_B[expert] @ self.lora_out_A[expert]
        return self.w_in + self.scale * delta_in_HD, self.w_out + self.scale * delta_out_DF

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Expert ``expert`` from its merged weights (the slow path the oracle uses): ``[N, D]``."""
        w_in_HD, w_out_DF = self.expert_tensors(expert)
        h_NH = F.linear(x_ND, w_in_HD, self.b_in)
        return F.linear(self.act(h_NH), w_out_DF, self.b_out)

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Base once over all rows, then each expert's adapters on its slice: ``[N, D]``."""
        h_NH = F.linear(x_ND, self.w_in, self.b_in) + self.scale * self._in_delta(x_ND, counts)
        a_NF = self.act(h_NH)
        return F.linear(a_NF, self.w_out, self.b_out) + self.scale * self._out_delta(a_NF, counts)

    def _in_delta(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        pieces, start = [], 0
        num_p, rank = self.num_in_proj, self.rank
        for expert, count in enumerate(counts):
            if not count:
                continue
            x_nD = x_ND[start : start + count]
            start += count
            u_nPr = F.linear(x_nD, self.lora_in_A[expert].reshape(num_p * rank, self.dim))
            # [P, n, r] @ [P, r, F] -> [P, n, F] -> [n, P*F]: gate rows first, as in w_in.
            v_PnF = torch.bmm(u_nPr.view(count, num_p, rank).transpose(0, 1), self.lora_in_B[expert].mT)
            pieces.append(v_PnF.transpose(0, 1).reshape(count, num_p * self.ffn_dim))
        return _cat_rows(pieces, x_ND, num_p * self.ffn_dim)

    def _out_delta(self, a_NF: Tensor, counts: list[int]) -> Tensor:
        pieces, start = [], 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            a_nF = a_NF[start : start + count]
            start += count
            pieces.append(F.linear(F.linear(a_nF, self.lora_out_A[expert]), self.lora_out_B[expert]))
        return _cat_rows(pieces, a_NF, self.dim)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, "
            f"activation={self.activation}, rank={self.rank}, alpha={self.alpha}"
        )


def _cat_rows(pieces: list[Tensor], like: Tensor, width: int) -> Tensor:
    if not pieces:
        return like.new_zeros(0, width)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


@torch.no_grad()
def merge_lora_experts(weights: LoRAExpertWeights) -> StackedExpertWeights:
    """Full experts holding each LoRA expert's merged weights (same outputs, plain storage):
    a ``StackedExpertWeights`` (``BiasedExpertWeights`` when the base has biases)."""
    storage = BiasedExpertWeights if weights.b_in is not None else StackedExpertWeights
    out = storage(
        weights.num_experts,
        weights.dim,
        weights.ffn_dim,
        weights.activation,
        swiglu_alpha=weights.swiglu_alpha,
        swiglu_limit=weights.swiglu_limit,
    ).to(weights.w_in.dtype)
    for e in range(weights.num_experts):
        w_in_HD, w_out_DF = weights.expert_tensors(e)
        out.w_in[e].copy_(w_in_HD)
        out.w_out[e].copy_(w_out_DF)
        if weights.b_in is not None:
            out.b_in[e].copy_(weights.b_in)
            out.b_out[e].copy_(weights.b_out)
    return out
