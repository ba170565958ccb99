"""Expert weights and the dense FFN.

Shape legend: E = FFN experts, D = model width, F = expert hidden width, H = input-projection
rows (2F for SwiGLU, gate rows first then up rows; F for GELU), N = tokens given to one call.

The layer reaches expert weights only through :class:`ExpertWeights`. The default,
:class:`StackedExpertWeights`, holds two stacked parameters ``w_in [E, H, D]`` and
``w_out [E, D, F]`` so a grouped matmul can run over them; the layout matches transformers 5's
fused ``gate_up_proj``/``down_proj``. Offloading (a per-expert cache), quantization (per-expert
bit widths) and expert parallelism (a shard of experts) each subclass :class:`ExpertWeights`
and override :meth:`ExpertWeights.expert_forward` (and :meth:`ExpertWeights.stacked` when they
can offer stacked tensors); the layer code does not change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import FFNConfig


def activate(h_NH: Tensor, activation: str) -> Tensor:
    """Applies the FFN nonlinearity to the input projection: ``[N, H] -> [N, F]``."""
    if activation == "swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        return F.silu(gate_NF) * up_NF
    return F.gelu(h_NH)


def in_rows(ffn_dim: int, activation: str) -> int:
    """H: rows of the input projection for this activation."""
    return 2 * ffn_dim if activation == "swiglu" else ffn_dim


class ExpertWeights(nn.Module):
    """Interface through which the MoE layer computes its FFN experts.

    Attributes:
        num_experts: E, the number of FFN experts.
        dim: D.
        ffn_dim: F.
        activation: ``"swiglu"`` or ``"gelu"``.
    """

    num_experts: int
    dim: int
    ffn_dim: int
    activation: str

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Runs expert ``expert`` on ``x_ND [N, D]``; returns ``[N, D]``."""
        w_in_HD, w_out_DF = self.expert_tensors(expert)
        return F.linear(activate(F.linear(x_ND, w_in_HD), self.activation), w_out_DF)

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Runs expert e on the e-th contiguous slice of ``x_ND`` (``counts[e]`` rows): ``[N, D]``."""
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count:
                outputs.append(self.expert_forward(expert, x_ND[start : start + count]))
                start += count
        if not outputs:
            return x_ND.new_zeros(0, self.dim)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """Returns ``(w_in [H, D], w_out [D, F])`` of one expert, in compute precision."""
        raise NotImplementedError

    def stacked(self) -> tuple[Tensor, Tensor] | None:
        """Returns ``(w_in [E, H, D], w_out [E, D, F])``, or None when not held stacked."""
        return None


class StackedExpertWeights(ExpertWeights):
    """All experts' weights in two stacked parameters (the default storage).

    Parameters:
        w_in: ``[E, H, D]``; for SwiGLU rows ``[:F]`` are the gate and ``[F:]`` the up projection.
        w_out: ``[E, D, F]``, the down projection.
    """

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim, self.activation = num_experts, dim, ffn_dim, activation
        self.w_in = nn.Parameter(torch.empty(num_experts, in_rows(ffn_dim, activation), dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises each expert like a pair of ``nn.Linear`` layers (uniform, fan-in bound)."""
        with torch.no_grad():
            self.w_in.uniform_(-1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
            self.w_out.uniform_(-1 / math.sqrt(self.ffn_dim), 1 / math.sqrt(self.ffn_dim))

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """Returns views ``(w_in[e] [H, D], w_out[e] [D, F])``."""
        return self.w_in[expert], self.w_out[expert]

    def stacked(self) -> tuple[Tensor, Tensor]:
        """Returns the stacked parameters themselves."""
        return self.w_in, self.w_out

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Loop of ``F.linear`` pairs over contiguous slices (see :meth:`ExpertWeights.forward_sorted`)."""
        # unbind once: indexing w_in[e] per expert would make autograd build a full [E, H, D]
        # zero gradient for every expert; unbind's backward stacks them in one allocation.
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count:
                x = x_ND[start : start + count]
                outputs.append(F.linear(activate(F.linear(x, w_in[expert]), self.activation), w_out[expert]))
                start += count
        if not outputs:
            return x_ND.new_zeros(0, self.dim)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, activation={self.activation}"


class FeedForward(nn.Module):
    """Dense FFN: ``w_out(act(w_in(x)))``; the same math as one expert.

    Parameters:
        w_in: ``nn.Linear(D, H)``; for SwiGLU, output rows ``[:F]`` are the gate.
        w_out: ``nn.Linear(F, D)``.
    """

    def __init__(self, config: FFNConfig) -> None:
        super().__init__()
        self.config = config
        self.w_in = nn.Linear(config.dim, in_rows(config.ffn_dim, config.activation), bias=config.bias)
        self.w_out = nn.Linear(config.ffn_dim, config.dim, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D] -> [..., D]``."""
        return self.w_out(activate(self.w_in(x), self.config.activation))
