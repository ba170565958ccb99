"""Expert weights and the dense FFN.

Shape legend: E = FFN experts, D = model width, F = expert hidden width, H = input-projection
rows (2F for SwiGLU, gate rows first then up rows; F for GELU), N = tokens given to one call.

Storage only: this module knows nothing of routing or dispatch (``dispatch.py`` imports it,
never the reverse). The layer reaches expert weights only through :class:`ExpertWeights`. The
default, :class:`StackedExpertWeights`, holds two stacked parameters ``w_in [E, H, D]`` and
``w_out [E, D, F]`` so a grouped matmul can run over them; the layout matches transformers 5's
fused ``gate_up_proj``/``down_proj``. Other storages (a per-expert offload cache, quantized
experts with per-expert bit widths, an expert-parallel shard) subclass :class:`ExpertWeights`
and override :meth:`ExpertWeights.expert_forward` / :meth:`ExpertWeights.forward_sorted` (and
:meth:`ExpertWeights.stacked` when they can offer stacked tensors). How rows reach the experts
(locally, over all-to-all, with prefetch) is the layer's ``dispatcher``, not the storage's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.kernels import gemm
from moekit.kernels.linear import moe_decode, uses_native_moe
from moekit.layers.config import FFNConfig

# OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x).
QUICK_GELU_ALPHA = 1.702
# GPT-OSS's clamped SwiGLU defaults (transformers' ``swiglu_alpha``/``swiglu_limit``).
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def activate(
    h_NH: Tensor, activation: str, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> Tensor:
    """Applies the FFN nonlinearity to the input projection: ``[N, H] -> [N, F]``.

    ``"swiglu_clamped"`` (GPT-OSS) clamps the gate from above and the up projection on both sides
    at ``limit``, then gives ``(up + 1) * gate * sigmoid(alpha * gate)``; ``alpha``/``limit`` are
    read by it alone.
    """
    if activation == "swiglu":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        return F.silu(gate_NF) * up_NF
    if activation == "swiglu_clamped":
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        gate_NF = gate_NF.clamp(max=limit)
        up_NF = up_NF.clamp(min=-limit, max=limit)
        return (up_NF + 1) * (gate_NF * torch.sigmoid(alpha * gate_NF))
    if activation == "quick_gelu":
        return h_NH * torch.sigmoid(QUICK_GELU_ALPHA * h_NH)
    if activation == "gelu_tanh":
        return F.gelu(h_NH, approximate="tanh")
    return F.gelu(h_NH)


def in_rows(ffn_dim: int, activation: str) -> int:
    """H: rows of the input projection for this activation."""
    return 2 * ffn_dim if activation in ("swiglu", "swiglu_clamped") else ffn_dim


class ExpertWeights(nn.Module):
    """Interface through which the MoE layer computes its FFN experts.

    Attributes:
        num_experts: E, the number of FFN experts.
        dim: D.
        ffn_dim: F.
        activation: ``"swiglu"``, ``"swiglu_clamped"``, ``"gelu"`` or ``"quick_gelu"``.
        sorted_name: the backend name of this storage's :meth:`forward_sorted` (``"sorted"``;
            LoRA experts: ``"lora_sorted"``).
        swiglu_alpha, swiglu_limit: the clamped SwiGLU's constants (read by it alone).
    """

    num_experts: int
    dim: int
    ffn_dim: int
    activation: str
    # What a dispatcher reports when :meth:`forward_sorted` runs (``MoEOutput.backend``).
    sorted_name: str = "sorted"
    swiglu_alpha: float = SWIGLU_ALPHA
    swiglu_limit: float = SWIGLU_LIMIT

    def routed_parameters(self) -> list[nn.Parameter]:
        """The parameters that belong to single experts (active only when routed to): all of them
        here; LoRA experts leave out their shared base, which every token uses."""
        return list(self.parameters())

    def act(self, h_NH: Tensor) -> Tensor:
        """This storage's nonlinearity (:func:`activate` with its clamped-SwiGLU constants)."""
        return activate(h_NH, self.activation, self.swiglu_alpha, self.swiglu_limit)

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Runs expert ``expert`` on ``x_ND [N, D]``; returns ``[N, D]``."""
        w_in_HD, w_out_DF = self.expert_tensors(expert)
        return F.linear(self.act(F.linear(x_ND, w_in_HD)), w_out_DF)

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

    @property
    def supports_decode_token(self) -> bool:
        """Whether the decode fast path may call :meth:`decode_token` (and :meth:`expert_forward`
        on small row groups) instead of going through the dispatcher; stacked storages can."""
        return self.stacked() is not None

    def decode_token(self, x_1D: Tensor, ids: list[int], weights_1K: Tensor) -> Tensor:
        """The routed experts of one decoding token: ``sum_k weights_1K[:, k] * expert_{ids[k]}(x_1D)``.

        ``x_1D [1, D]``; ``ids``: the K chosen experts as ints, in slot order; ``weights_1K [1, K]``
        their gate weights. Returns ``[1, D]``, summed in slot order (what the general path does
        for one token). Storages with a faster one-token kernel override this.
        """
        out_1D = None
        for slot, expert in enumerate(ids):
            y_1D = self.expert_forward(expert, x_1D) * weights_1K[:, slot : slot + 1]
            out_1D = y_1D if out_1D is None else out_1D + y_1D
        return out_1D

    def stacked(self) -> tuple[Tensor, Tensor] | None:
        """Returns ``(w_in [E, H, D], w_out [E, D, F])``, or None when not held stacked."""
        return None

    def native_step_matrices(self) -> tuple[list, list] | None:
        """Each expert's ``w_in [H, D]`` and ``w_out [D, F]`` in the form the whole-step decode
        kernel reads (:mod:`moekit.models.native_step`): two lists of E tuples ``(codes or
        float32 weight, scale, zero, bits, group)``, bits 32 for float32. None (the default)
        when this storage has no such form; stacked float32 storages are passed whole instead."""
        return None


class StackedExpertWeights(ExpertWeights):
    """All experts' weights in two stacked parameters (the default storage).

    Parameters:
        w_in: ``[E, H, D]``; for SwiGLU rows ``[:F]`` are the gate and ``[F:]`` the up projection.
        w_out: ``[E, D, F]``, the down projection.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        ffn_dim: int,
        activation: str = "swiglu",
        swiglu_alpha: float = SWIGLU_ALPHA,
        swiglu_limit: float = SWIGLU_LIMIT,
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim, self.activation = num_experts, dim, ffn_dim, activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
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

    def stacked(self) -> tuple[Tensor, Tensor] | None:
        """Returns the stacked parameters themselves; None for the clamped SwiGLU, whose constants
        the stacked fast paths (grouped matmul, fast decode) do not carry."""
        if self.activation == "swiglu_clamped":
            return None
        return self.w_in, self.w_out

    def decode_token(self, x_1D: Tensor, ids: list[int], weights_1K: Tensor) -> Tensor:
        """One decoding token's experts with the fused native kernel (``moekit.kernels.linear``:
        gate+up in one pass, activation, down projection, gate weights, slot sum) for CPU
        float32 stacks, about 2x the per-expert matmuls' bandwidth at batch 1; otherwise (and
        under ``MOEKIT_KERNELS=0``) the per-expert loop of :meth:`ExpertWeights.decode_token`."""
        stacks = self.stacked()
        if stacks is not None and uses_native_moe(x_1D, *stacks, self.activation):
            return moe_decode(x_1D, *stacks, ids, weights_1K, self.activation)
        return ExpertWeights.decode_token(self, x_1D, ids, weights_1K)

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """Loop of matmuls over contiguous slices (see :meth:`ExpertWeights.forward_sorted`)."""
        if self.activation == "swiglu_clamped":  # autograd loop: the hand backward has no clamp
            return ExpertWeights.forward_sorted(self, x_ND, counts)
        bucket = expert_row_bucket(x_ND, self.w_in, counts)
        if not bucket:
            return SortedExpertsFunction.apply(x_ND, self.w_in, self.w_out, counts, self.activation)
        # Each expert's rows padded with zero rows to a multiple of the bucket: oneDNN builds a
        # primitive per product shape, and exact row counts change every step. Zero rows give
        # zero outputs and, as no loss reads them, zero gradient terms: the result is exact.
        padded, dest_N = padded_layout(counts, bucket, x_ND.device)
        x_PD = x_ND.new_zeros(sum(padded), x_ND.shape[1]).index_copy(0, dest_N, x_ND)
        y_PD = SortedExpertsFunction.apply(x_PD, self.w_in, self.w_out, padded, self.activation)
        return y_PD.index_select(0, dest_N)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, activation={self.activation}"


#: Rows each expert's segment is padded to a multiple of on the oneDNN path (see
#: :func:`expert_row_bucket`). Measured on one moe-small MoE layer's forward + backward (8192
#: rows, 8 experts, counts varying per step): 124-141 ms exact, 102-108 ms at 32, 64 or 128; on
#: a D=1024, F=2816 layer (fixed counts, so no padding is needed there) 32 cost least: 1.05x a
#: dense FFN of the same FLOPs against 1.08x at 64 and 1.10x unpadded.
EXPERT_ROW_BUCKET = 32


def expert_row_bucket(x_ND: Tensor, w_in_EHD: Tensor, counts: list[int]) -> int:
    """:data:`EXPERT_ROW_BUCKET` when the sorted experts' products run on oneDNN (float32 CPU,
    products above its size floor; see :func:`moekit.kernels.gemm.uses_onednn`), else 0 (exact
    row counts: MKL has no per-shape setup cost)."""
    if not counts or not gemm.onednn_enabled() or x_ND.dtype != torch.float32 or x_ND.device.type != "cpu":
        return 0
    mean_rows = x_ND.shape[0] / max(1, sum(1 for c in counts if c))
    macs = mean_rows * w_in_EHD.shape[1] * w_in_EHD.shape[2]
    return EXPERT_ROW_BUCKET if macs >= gemm.MIN_MACS else 0


def padded_layout(counts: list[int], bucket: int, device: torch.device) -> tuple[list[int], Tensor]:
    """``(padded counts, dest_N)``: each count rounded up to a multiple of ``bucket``, and the
    row of the padded layout each of the ``N = sum(counts)`` sorted rows moves to."""
    padded = [-(-c // bucket) * bucket for c in counts]
    dest = []
    start = 0
    for count, size in zip(counts, padded, strict=True):
        dest.append(torch.arange(start, start + count, device=device))
        start += size
    return padded, torch.cat(dest) if dest else torch.zeros(0, dtype=torch.long, device=device)


def _activation_backward(grad_a_NF: Tensor, h_NH: Tensor, activation: str, out_NH: Tensor) -> None:
    """Writes d(loss)/d(h) into ``out_NH`` given d(loss)/d(act(h))."""
    if activation == "swiglu":
        ffn = grad_a_NF.shape[-1]
        gate_NF, up_NF = h_NH[:, :ffn], h_NH[:, ffn:]
        torch.mul(grad_a_NF, F.silu(gate_NF), out=out_NH[:, ffn:])
        torch.ops.aten.silu_backward(grad_a_NF * up_NF, gate_NF, grad_input=out_NH[:, :ffn])
    elif activation == "quick_gelu":
        s_NH = torch.sigmoid(QUICK_GELU_ALPHA * h_NH)
        out_NH.copy_(grad_a_NF * s_NH * (1 + QUICK_GELU_ALPHA * h_NH * (1 - s_NH)))
    elif activation == "gelu_tanh":
        out_NH.copy_(torch.ops.aten.gelu_backward(grad_a_NF, h_NH, approximate="tanh"))
    else:
        out_NH.copy_(torch.ops.aten.gelu_backward(grad_a_NF, h_NH))


class SortedExpertsFunction(torch.autograd.Function):
    """Expert FFNs over rows sorted by expert, with a hand-written backward.

    Autograd through per-expert slices of stacked weights would concatenate per-expert weight
    gradients (and their zero fills) into ``[E, H, D]`` tensors on every step; on CPU that copy
    cost a fifth of the step (see docs/benchmarks.md). Here each expert's gradient is written
    straight into its slice of one preallocated tensor, outputs go straight into one ``[N, D]``
    buffer, and only the input projection ``h`` is saved (the activation is recomputed).

    The products go through :func:`moekit.kernels.gemm.mm` (oneDNN for float32 on CPU: 2-2.5x
    MKL's rate on this machine's AMD EPYC), in the forward and in the backward alike.

    Shapes: x_ND ``[N, D]``, w_in ``[E, H, D]``, w_out ``[E, D, F]`` -> ``[N, D]``.
    """

    @staticmethod
    def forward(
        ctx, x_ND: Tensor, w_in_EHD: Tensor, w_out_EDF: Tensor, counts: list[int], activation: str
    ) -> Tensor:
        num_rows, dim = x_ND.shape
        y_ND = x_ND.new_empty(num_rows, dim)
        h_NH = x_ND.new_empty(num_rows, w_in_EHD.shape[1])
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                gemm.mm(x_ND[rows], w_in_EHD[expert].t(), out=h_NH[rows])
                gemm.mm(activate(h_NH[rows], activation), w_out_EDF[expert].t(), out=y_ND[rows])
                start += count
        ctx.save_for_backward(x_ND, w_in_EHD, w_out_EDF, h_NH)
        ctx.counts, ctx.activation = counts, activation
        return y_ND

    @staticmethod
    def backward(ctx, grad_y_ND: Tensor):
        x_ND, w_in_EHD, w_out_EDF, h_NH = ctx.saved_tensors
        need_x, need_w_in, need_w_out = ctx.needs_input_grad[:3]
        grad_x_ND = torch.empty_like(x_ND) if need_x else None
        # empty, not zeros: every expert's slice is written below, unused experts zeroed alone.
        grad_w_in = torch.empty_like(w_in_EHD) if need_w_in else None
        grad_w_out = torch.empty_like(w_out_EDF) if need_w_out else None
        grad_y_ND = grad_y_ND.contiguous()
        start = 0
        for expert, count in enumerate(ctx.counts):
            if not count:
                for grad in (grad_w_in, grad_w_out):
                    if grad is not None:
                        grad[expert].zero_()
                continue
            rows = slice(start, start + count)
            start += count
            h, g_y = h_NH[rows], grad_y_ND[rows]
            if need_w_out:
                gemm.mm(g_y.t(), activate(h, ctx.activation), out=grad_w_out[expert])
            grad_a = gemm.mm(g_y, w_out_EDF[expert])
            grad_h = torch.empty_like(h)
            _activation_backward(grad_a, h, ctx.activation, grad_h)
            if need_w_in:
                gemm.mm(grad_h.t(), x_ND[rows], out=grad_w_in[expert])
            if need_x:
                gemm.mm(grad_h, w_in_EHD[expert], out=grad_x_ND[rows])
        return grad_x_ND, grad_w_in, grad_w_out, None, None


class BiasedExpertWeights(StackedExpertWeights):
    """Stacked experts with biases on both projections (ViT/CLIP MLPs: ``fc2(act(fc1 x + b1)) + b2``).

    Parameters: ``w_in [E, H, D]``, ``w_out [E, D, F]`` as in :class:`StackedExpertWeights`, plus
    ``b_in [E, H]`` and ``b_out [E, D]``. :meth:`stacked` returns None, so the grouped-matmul and
    fast-decode paths (which have no bias) never run; the per-expert loop runs instead.
    """

    def __init__(
        self, num_experts: int, dim: int, ffn_dim: int, activation: str = "gelu", **swiglu: float
    ) -> None:
        super().__init__(num_experts, dim, ffn_dim, activation, **swiglu)
        self.b_in = nn.Parameter(torch.zeros(num_experts, in_rows(ffn_dim, activation)))
        self.b_out = nn.Parameter(torch.zeros(num_experts, dim))

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """``w_out[e] act(w_in[e] x + b_in[e]) + b_out[e]``: ``[N, D] -> [N, D]``."""
        h_NH = F.linear(x_ND, self.w_in[expert], self.b_in[expert])
        return F.linear(self.act(h_NH), self.w_out[expert], self.b_out[expert])

    def forward_sorted(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        """The per-expert loop of :meth:`ExpertWeights.forward_sorted` (autograd, with biases)."""
        return ExpertWeights.forward_sorted(self, x_ND, counts)

    def stacked(self) -> None:
        """None: the stacked fast paths have no bias term."""
        return None


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
        h = gemm.apply_linear(self.w_in, x)
        if self.config.activation == "swiglu" and torch.is_grad_enabled() and h.requires_grad:
            return gemm.apply_linear(self.w_out, SwiGLUFunction.apply(h))
        return gemm.apply_linear(self.w_out, activate(h, self.config.activation))


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` over the two halves of ``h [..., 2F]``, with a backward that writes
    ``d h`` into one ``[..., 2F]`` tensor.

    Autograd through ``h.chunk(2)`` gives each half's gradient a full-size zero-filled tensor
    and then adds the two (``SliceBackward``): three extra passes over ``[N, 2F]`` per dense FFN
    in every training step. Same values as :func:`activate`; tests/test_layers_oracle.py checks
    it in float64.
    """

    @staticmethod
    def forward(ctx, h_NH: Tensor) -> Tensor:
        ctx.save_for_backward(h_NH)
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        return F.silu(gate_NF) * up_NF

    @staticmethod
    def backward(ctx, grad_a_NF: Tensor) -> Tensor:
        (h_NH,) = ctx.saved_tensors
        shape = h_NH.shape
        h_2d = h_NH.reshape(-1, shape[-1])
        grad_h = torch.empty_like(h_2d)
        _activation_backward(grad_a_NF.reshape(-1, shape[-1] // 2), h_2d, "swiglu", grad_h)
        return grad_h.view(shape)
