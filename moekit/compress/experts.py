"""Quantized experts: :class:`QuantizedExperts`, an :class:`~moekit.layers.ExpertWeights` whose
experts are :class:`~moekit.compress.kernels.PackedLinear` pairs, one bit width per expert.

Shape legend: E = experts, D = model width, F = expert hidden width, H = input-projection rows
(2F for SwiGLU), N = rows given to one expert.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.compress.kernels import PackedLinear
from moekit.kernels import qlinear
from moekit.layers import ExpertWeights
from moekit.layers.experts import activate


class QuantizedExperts(ExpertWeights):
    """E experts, each ``w_out(act(w_in(x)))`` with quantized ``w_in [H, D]`` and ``w_out [D, F]``.

    Submodules: ``w_in`` and ``w_out``, ``nn.ModuleList`` of E :class:`PackedLinear` each (state
    keys ``w_in.{e}.qweight`` etc.). ``stacked()`` stays None, so dispatch uses the sorted path;
    the decode fast path is supported (:meth:`decode_token`): with native kernels one token's K
    experts run as one fused native call (``moekit::q_experts_token``).

    Args:
        w_in, w_out: the per-expert quantized projections.
        activation: ``"swiglu"`` or ``"gelu"``.
    """

    def __init__(self, w_in: list[PackedLinear], w_out: list[PackedLinear], activation: str) -> None:
        super().__init__()
        if len(w_in) != len(w_out) or not w_in:
            raise ValueError(f"QuantizedExperts: got {len(w_in)} w_in and {len(w_out)} w_out projections")
        self.w_in, self.w_out = nn.ModuleList(w_in), nn.ModuleList(w_out)
        self.num_experts = len(w_in)
        self.dim = w_in[0].in_features
        self.ffn_dim = w_out[0].in_features
        self.activation = activation

    @property
    def bits(self) -> list[int]:
        """Bit width of each expert (its ``w_in``; both projections share it)."""
        return [m.bits for m in self.w_in]

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Runs expert ``expert`` with its quantized kernels: ``[N, D] -> [N, D]``."""
        return self.w_out[expert](activate(self.w_in[expert](x_ND), self.activation))

    @property
    def supports_decode_token(self) -> bool:
        """Always: :meth:`decode_token` and :meth:`expert_forward` work for every kernel."""
        return True

    def native_token_ready(self, ids: list[int]) -> bool:
        """Whether :meth:`decode_token` on experts ``ids`` takes the fused native op."""
        if self.activation not in qlinear.ACTIVATIONS or not qlinear.native_available():
            return False
        first = self.w_in[ids[0]], self.w_out[ids[0]]
        return all(
            lin.kernel == "native" and lin.group_size == ref.group_size
            for e in ids
            for lin, ref in ((self.w_in[e], first[0]), (self.w_out[e], first[1]))
        )

    def native_step_matrices(self) -> tuple[list, list] | None:
        """Every expert's two projections on the native int8/int4 kernel layout, for the
        whole-step decode kernel; None when any of them is on another kernel or has a bias."""
        ins = [m.native_matrix() for m in self.w_in]
        outs = [m.native_matrix() for m in self.w_out]
        if any(m is None for m in ins + outs) or any(m.bias is not None for m in [*self.w_in, *self.w_out]):
            return None
        return ins, outs

    def decode_token(self, x_1D: Tensor, ids: list[int], weights_1K: Tensor) -> Tensor:
        """One token's routed experts ``[1, D]`` (summed in slot order): the fused native op when
        :meth:`native_token_ready`, else one :meth:`expert_forward` per expert."""
        if not self.native_token_ready(ids):
            return super().decode_token(x_1D, ids, weights_1K)
        experts = []
        for e in ids:
            ic, isc, iz, bits, gi = self.w_in[e].native_matrix()
            oc, osc, oz, _, go = self.w_out[e].native_matrix()
            experts.append((ic, isc, iz, oc, osc, oz, bits, gi, go))
        return qlinear.q_experts_token(x_1D, weights_1K[0], experts, self.activation).to(x_1D.dtype)

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Expert e on the e-th contiguous slice (``counts[e]`` rows): ``[N, D] -> [N, D]``."""
        y_ND = x_ND.new_empty(x_ND.shape[0], self.dim)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                y_ND[start : start + count] = self.expert_forward(expert, x_ND[start : start + count])
                start += count
        return y_ND

    def expert_tensors(self, expert: int) -> tuple[Tensor, Tensor]:
        """Dequantized ``(w_in [H, D], w_out [D, F])`` in the dtype of the kernel buffers' scales."""
        dtype = torch.float32
        return self.w_in[expert].dequantized_weight(dtype), self.w_out[expert].dequantized_weight(dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, bits={self.bits}"
