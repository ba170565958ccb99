"""CPU compute for quantized matrices: :class:`PackedLinear`, ``y = x @ dq(W).T (+ b)``.

Shape legend: R = output features, C = input features, G = groups per row, g = group size,
N = rows of the input (all leading dims flattened).

Kernels (measured in docs/compression.md, ``benchmarks/bench_compress.py kernels``):
    ``int4pack``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (group-wise asymmetric 4-bit,
        bfloat16 activations). Also serves 3- and 2-bit codes, which fit in a nibble: the codes
        and the zero point are unchanged, only the kernel form is 4 bits wide. Needs
        g in {32, 64, 128, 256}.
    ``int8group``: ``torch.ops.aten._weight_int8pack_mm`` once per group (it has one scale per
        output row), codes shifted to int8 and the zero point folded into one small
        ``[N, G] @ [G, R]`` correction. bfloat16 activations.
    ``dequant``: dequantize the stored codes, then a float matmul. Works for every width and
        every dtype, and is slow (it rebuilds the float matrix on each call).

The stored form (``qweight``/``scale``/``zero`` buffers, see :class:`~moekit.compress.quant.
QuantizedTensor`) is what gets saved; the kernel form is rebuilt from it when the module is
constructed, in non-persistent buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.compress.quant import QuantizedTensor

INT4_GROUPS = (32, 64, 128, 256)


def int4_kernel_available() -> bool:
    """True when this torch build has the CPU int4 matmul."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int8_kernel_available() -> bool:
    """True when this torch build has the int8 weight-only matmul."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def choose_kernel(bits: int, group_size: int, requested: str = "auto") -> str:
    """The kernel for a width: ``int4pack`` for <= 4 bits, ``int8group`` for 8, else ``dequant``."""
    if requested == "dequant":
        return "dequant"
    if bits <= 4 and group_size in INT4_GROUPS and int4_kernel_available():
        return "int4pack"
    if bits == 8 and int8_kernel_available():
        return "int8group"
    return "dequant"


class PackedLinear(nn.Module):
    """A linear layer with a quantized weight.

    Buffers (saved): ``qweight`` uint8 ``[R, C*b/8]``, ``scale`` float16 ``[R, G]``, ``zero`` uint8
    ``[R, G]``, optional ``bias`` ``[R]``. Kernel buffers (not saved) depend on :attr:`kernel`.

    Args:
        qt: the quantized weight.
        bias: optional ``[R]``.
        kernel: ``"auto"`` or ``"dequant"`` (see :func:`choose_kernel`).
    """

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None, kernel: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits, self.group_size = qt.bits, qt.group_size
        self.register_buffer("qweight", qt.packed)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero", qt.zero)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel = choose_kernel(qt.bits, qt.group_size, kernel)
        self._build_kernel_form(qt)

    def quantized(self) -> QuantizedTensor:
        """The stored form as a :class:`QuantizedTensor` (shares memory with the buffers)."""
        return QuantizedTensor(
            self.qweight,
            self.scale,
            self.zero,
            self.bits,
            self.group_size,
            (self.out_features, self.in_features),
        )

    def _build_kernel_form(self, qt: QuantizedTensor) -> None:
        num_r, num_c, g = self.out_features, self.in_features, self.group_size
        scale_RG = qt.scale.to(torch.float32)
        zero_RG = qt.zero.to(torch.float32)
        if self.kernel == "int4pack":
            # Centre narrower codes on 8 (the kernel's implicit offset): zf = (8 - z) * s stays
            # small, so its bfloat16 rounding does not cost 2- and 3-bit weights accuracy.
            shift = 8 - 2 ** (self.bits - 1)
            codes = qt.codes().to(torch.int32) + shift
            zero_RG = zero_RG + shift
            self.register_buffer(
                "k_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), persistent=False
            )
            # tinygemm convention: w = (q - 8) * s + zf, so zf = (8 - z) * s.
            sz_GR2 = torch.stack([scale_RG, (8 - zero_RG) * scale_RG], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("k_scale_zero", sz_GR2.to(torch.bfloat16), persistent=False)
        elif self.kernel == "int8group":
            codes = qt.codes().view(num_r, num_c // g, g)
            q_GRg = (codes.to(torch.int16) - 128).to(torch.int8).transpose(0, 1).contiguous()
            self.register_buffer("k_weight", q_GRg, persistent=False)
            self.register_buffer("k_scale", scale_RG.t().contiguous().to(torch.bfloat16), persistent=False)
            # sum_k s (q - z) x = sum_k s (q - 128) x - s (z - 128) sum_k x
            self.register_buffer(
                "k_zero_scale", ((zero_RG - 128) * scale_RG).to(torch.float32).contiguous(), persistent=False
            )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``[R, C]`` as the stored codes say, in ``dtype``."""
        return self.quantized().dequantize(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., C] -> [..., R]`` in ``x.dtype``."""
        lead = x.shape[:-1]
        x_NC = x.reshape(-1, self.in_features)
        if self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x_NC.to(torch.bfloat16), self.k_weight, self.group_size, self.k_scale_zero
            ).to(x.dtype)
        elif self.kernel == "int8group":
            y = self._int8_forward(x_NC).to(x.dtype)
        else:
            y = F.linear(x_NC, self.dequantized_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def _int8_forward(self, x_NC: Tensor) -> Tensor:
        g = self.group_size
        num_groups = self.in_features // g
        xb_NGg = x_NC.to(torch.bfloat16).view(-1, num_groups, g)
        y = torch.ops.aten._weight_int8pack_mm(xb_NGg[:, 0], self.k_weight[0], self.k_scale[0]).float()
        for i in range(1, num_groups):
            y += torch.ops.aten._weight_int8pack_mm(xb_NGg[:, i], self.k_weight[i], self.k_scale[i])
        return y - x_NC.float().view(-1, num_groups, g).sum(-1) @ self.k_zero_scale.t()

    @property
    def resident_bytes(self) -> int:
        """Bytes held in memory: stored form plus kernel form."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.kernel}"
        )
