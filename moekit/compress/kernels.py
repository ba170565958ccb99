"""CPU compute for quantized matrices: :class:`PackedLinear`, ``y = x @ dq(W).T (+ b)``.

Shape legend: R = output features, C = input features, G = groups per row, g = group size,
N = rows of the input (all leading dims flattened).

Kernels (measured in docs/compression.md, ``benchmarks/bench_compress.py kernels``):
    ``int4pack``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (group-wise asymmetric 4-bit,
        bfloat16 activations). Also serves 3- and 2-bit codes, which fit in a nibble: the codes
        and the zero point are unchanged, only the kernel form is 4 bits wide. Needs
        g in {32, 64, 128, 256}.
    ``int4x2``: 8-bit codes as two nibble planes (``q = 16 hi + lo``) through the same int4
        kernel; the zero point splits into nibbles too, so the math is the stored codes' exactly
        (up to bfloat16 scales). The ``"exact"`` choice for 8 bits; about fp32 speed.
    ``int8group``: ``torch.ops.aten._weight_int8pack_mm`` once per group (it has one scale per
        output row), codes shifted to int8 and the zero point folded into one small
        ``[N, G] @ [G, R]`` correction. bfloat16 activations.
    ``fbgemm`` (8 bits, the default there): ``torch.ops.quantized.linear_dynamic`` on the
        weight re-quantized per output channel (symmetric int8); activations are quantized to
        8 bits per tensor on the fly. The fastest 8-bit kernel measured, but an approximation
        of the stored codes (the saved checkpoint keeps the group-wise codes).
    ``native`` (the ``"auto"`` choice where it fits): moekit's own kernel
        (:mod:`moekit.kernels.qlinear`, ``csrc/quant_gemv.cpp``) for 8-bit codes and for codes of
        1..4 bits held as nibbles. Activations are quantized to int8 in blocks of 32 on the fly
        (llama.cpp's q8_0 scheme) and the block dots run in int32 with AVX-512 VNNI; the weights
        are the stored codes exactly. Every row count runs it (decode and prefill: 2-4x a
        dequantize-then-matmul at 16-512 rows); an input that needs a gradient dequantizes and
        runs a float matmul instead (the op has no backward). Needs C and g multiples of 32.
    ``dequant``: dequantize the stored codes, then a float matmul. Works for every width and
        every dtype, and is slow (it rebuilds the float matrix on each call).

The stored form (``qweight``/``scale``/``zero`` buffers, see :class:`~moekit.compress.quant.
QuantizedTensor`) is what gets saved; the kernel form is rebuilt from it when the module is
constructed, in non-persistent buffers.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.compress.quant import QuantizedTensor, pack_codes
from moekit.kernels import qlinear

INT4_GROUPS = (32, 64, 128, 256)
KERNEL_NAMES = ("native", "int4pack", "int4x2", "int8group", "fbgemm", "dequant")


def int4_kernel_available() -> bool:
    """True when this torch build has the CPU int4 matmul."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int8_kernel_available() -> bool:
    """True when this torch build has the int8 weight-only matmul."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def fbgemm_available() -> bool:
    """True when this build has the x86 dynamic int8 linear (fbgemm / x86 engine)."""
    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines or "x86" in engines) and hasattr(torch.ops.quantized, "linear_dynamic")


def choose_kernel(bits: int, group_size: int, requested: str = "auto", num_cols: int | None = None) -> str:
    """The kernel for a matrix of ``bits``-bit codes (``num_cols``: its input width, when known).

    ``requested``:
        ``"auto"``: the fastest measured kernel: ``native`` when its ops loaded and the shape fits
            (``num_cols`` given), else ``int4pack`` for <= 4 bits, ``fbgemm`` for 8 (an
            approximation of the codes; see :class:`PackedLinear`), else ``dequant``.
        ``"exact"``: kernels that execute the stored codes (up to bfloat16 activations and
            scales): ``int4pack`` for <= 4 bits, ``int4x2`` for 8.
        ``"dequant"``: always dequantize-then-matmul.
        a name from :data:`KERNEL_NAMES`: that kernel (ValueError when it cannot run ``bits``).
    """
    if requested not in ("auto", "exact", *KERNEL_NAMES):
        raise ValueError(
            f"kernel={requested!r} is not valid; choose one of {['auto', 'exact', *KERNEL_NAMES]}"
        )
    int4_ok = group_size in INT4_GROUPS and int4_kernel_available()
    # _weight_int8pack_mm segfaults (torch 2.x CPU) on an inner width that is not a multiple of 16.
    int8_ok = group_size % 16 == 0 and int8_kernel_available()
    native_fits = num_cols is not None and qlinear.fits(bits, group_size, num_cols)
    if requested == "dequant":
        return "dequant"
    if requested == "native":
        if num_cols is not None and not native_fits:
            raise ValueError(
                f"kernel='native' needs 8 or 1..4 bits, an input width that is a multiple of 32 and a group "
                f"size that is a multiple of 32 dividing it; got bits={bits}, group={group_size}, width={num_cols}"
            )
        return "native"
    if requested == "auto" and native_fits and qlinear.native_available():
        return "native"
    if requested in ("auto", "exact"):
        if bits <= 4 and int4_ok:
            return "int4pack"
        if bits == 8 and requested == "auto" and fbgemm_available():
            return "fbgemm"
        if bits == 8 and int4_ok:
            return "int4x2"
        if bits == 8 and int8_ok:
            return "int8group"
        return "dequant"
    fits = {"int4pack": bits <= 4, "int4x2": bits == 8, "int8group": bits == 8, "fbgemm": bits == 8}[
        requested
    ]
    if not fits:
        raise ValueError(f"kernel={requested!r} does not run {bits}-bit codes")
    if requested == "int8group" and group_size % 16:
        raise ValueError(f"kernel='int8group' needs a group size that is a multiple of 16, got {group_size}")
    return requested


class PackedLinear(nn.Module):
    """A linear layer with a quantized weight.

    Buffers (saved): ``qweight`` uint8 ``[R, C*b/8]``, ``scale`` float16 ``[R, G]``, ``zero`` uint8
    ``[R, G]``, optional ``bias`` ``[R]``. Kernel buffers (not saved) depend on :attr:`kernel`.

    Args:
        qt: the quantized weight.
        bias: optional ``[R]``.
        kernel: ``"auto"``, ``"exact"``, ``"dequant"`` or a kernel name (see :func:`choose_kernel`).
    """

    def __init__(self, qt: QuantizedTensor, bias: Tensor | None = None, kernel: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits, self.group_size = qt.bits, qt.group_size
        self.register_buffer("qweight", qt.packed)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero", qt.zero)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel = choose_kernel(qt.bits, qt.group_size, kernel, self.in_features)
        self._build_kernel_form(qt)
        if self.kernel in ("int4pack", "native"):
            # The kernel layout holds the codes too (native: the scales and zeros as well), so the
            # stored copy is dropped (half the resident bytes of a 4-bit matrix). state_dict()
            # recovers it exactly from the kernel form (see _recover_stored); loading rebuilds
            # the kernel form from it.
            self.qweight = None
            if self.kernel == "native":
                self.scale = self.zero = None
        self._register_state_dict_hook(PackedLinear._add_codes_to_state)
        self._register_load_state_dict_pre_hook(PackedLinear._load_codes, with_module=True)

    def quantized(self) -> QuantizedTensor:
        """The stored form as a :class:`QuantizedTensor` (recovered from the kernel form when the
        stored copy was dropped)."""
        packed, scale, zero = self._recover_stored()
        return QuantizedTensor(
            packed, scale, zero, self.bits, self.group_size, (self.out_features, self.in_features)
        )

    @torch.no_grad()
    def _recover_stored(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(qweight, scale, zero)`` in the stored form, read back from the kernel form where the
        stored copy was dropped (native: the tiles reordered; int4pack: see below)."""
        if self.qweight is not None:
            return self.qweight, self.scale, self.zero
        if self.kernel == "native":
            codes, scale, zero = qlinear.stored_matrix(self.k_weight, self.k_scale, self.k_zero, self.bits)
            return pack_codes(codes, self.bits), scale, zero
        return pack_codes(self._recover_int4pack_codes(), self.bits), self.scale, self.zero

    @torch.no_grad()
    def _recover_int4pack_codes(self) -> Tensor:
        """Codes ``[R, C]`` uint8 read back from the int4 kernel form by multiplying it with the
        identity: the kernel returns ``(q' - 8) s + zf`` (bfloat16), and ``|q' - 8| <= 8`` keeps
        the rounding error far below half a step, so ``round((w - zf) / s) + 8`` is exact."""
        num_c, g = self.in_features, self.group_size
        eye = torch.eye(num_c, dtype=torch.bfloat16)
        w_CR = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.k_weight, g, self.k_scale_zero).float()
        sz = self.k_scale_zero.float()  # [G, R, 2]
        s_RC = sz[..., 0].t().repeat_interleave(g, dim=1)
        zf_RC = sz[..., 1].t().repeat_interleave(g, dim=1)
        shift = 8 - 2 ** (self.bits - 1)
        q = torch.round((w_CR.t() - zf_RC) / s_RC) + 8 - shift
        return q.clamp(0, 2**self.bits - 1).to(torch.uint8)

    @staticmethod
    def _add_codes_to_state(module, state_dict, prefix, local_metadata) -> None:
        if module.qweight is None:
            packed, scale, zero = module._recover_stored()
            state_dict[prefix + "qweight"] = packed
            state_dict[prefix + "scale"] = scale
            state_dict[prefix + "zero"] = zero

    def _load_codes(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self.qweight is not None or prefix + "qweight" not in state_dict:
            return
        # native: the scale/zero buffers are gone, so their keys must be consumed here.
        take = state_dict.pop if self.scale is None else state_dict.get
        scale, zero = take(prefix + "scale", None), take(prefix + "zero", None)
        if scale is None or zero is None:  # a partial state dict keeps the current ones
            _, old_scale, old_zero = self._recover_stored()
            scale = old_scale if scale is None else scale
            zero = old_zero if zero is None else zero
        qt = QuantizedTensor(
            state_dict.pop(prefix + "qweight"),
            scale,
            zero,
            self.bits,
            self.group_size,
            (self.out_features, self.in_features),
        )
        self._build_kernel_form(qt)

    def _build_kernel_form(self, qt: QuantizedTensor) -> None:
        num_r, num_c, g = self.out_features, self.in_features, self.group_size
        scale_RG = qt.scale.to(torch.float32)
        zero_RG = qt.zero.to(torch.float32)
        if self.kernel == "native":
            # Codes, scales and zeros in the kernel's row tiles (qlinear.kernel_matrix).
            k_weight, k_scale, k_zero = qlinear.kernel_matrix(qt.codes(), qt.scale, qt.zero, self.bits)
            self.register_buffer("k_weight", k_weight, persistent=False)
            self.register_buffer("k_scale", k_scale, persistent=False)
            self.register_buffer("k_zero", k_zero, persistent=False)
        elif self.kernel == "int4pack":
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
        elif self.kernel == "int4x2":
            # q - z = 16 (hi - z_hi) + (lo - z_lo) with nibbles of q and of z: two int4 planes,
            # each centred near the kernel's offset 8 when z is near 128 (symmetric weights).
            codes = qt.codes().to(torch.int32)
            z = qt.zero.to(torch.int32)
            planes, sz = [], []
            for plane_codes, plane_zero, mult in ((codes >> 4, z >> 4, 16.0), (codes & 15, z & 15, 1.0)):
                s_RG = scale_RG * mult
                planes.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane_codes, 1))
                sz.append(torch.stack([s_RG, (8 - plane_zero.float()) * s_RG], dim=-1).transpose(0, 1))
            self.register_buffer("k_weight", torch.stack(planes), persistent=False)
            self.register_buffer(
                "k_scale_zero", torch.stack(sz).to(torch.bfloat16).contiguous(), persistent=False
            )
        elif self.kernel == "fbgemm":
            # Approximate: the group-wise weight is re-quantized per output channel (symmetric
            # int8) and fbgemm also quantizes activations per tensor on the fly. Not saved.
            w = qt.dequantize()
            s_R = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # quantized-tensor deprecation notice
                qw = torch.quantize_per_channel(w, s_R, torch.zeros(num_r, dtype=torch.long), 0, torch.qint8)
            self._fbgemm_packed = torch.ops.quantized.linear_prepack(qw, None)
        elif self.kernel == "int8group":
            codes = qt.codes().view(num_r, num_c // g, g)
            q_GRg = (codes.to(torch.int16) - 128).to(torch.int8).transpose(0, 1).contiguous()
            self.register_buffer("k_weight", q_GRg, persistent=False)
            self.register_buffer("k_scale", scale_RG.t().contiguous().to(torch.bfloat16), persistent=False)
            # sum_k s (q - z) x = sum_k s (q - 128) x - s (z - 128) sum_k x
            self.register_buffer(
                "k_zero_scale", ((zero_RG - 128) * scale_RG).to(torch.float32).contiguous(), persistent=False
            )

    def native_matrix(self) -> tuple[Tensor, Tensor, Tensor, int, int] | None:
        """``(codes, scale [R, G] float16, zero [R, G] uint8, bits, group)`` in the native kernel
        layout (:func:`moekit.kernels.qlinear.kernel_matrix`), for the native ops and the
        whole-step decode (:mod:`moekit.models.native_step`); None on any other kernel."""
        if self.kernel != "native" or not qlinear.fits(self.bits, self.group_size, self.in_features):
            return None
        return self.k_weight, self.k_scale, self.k_zero, self.bits, self.group_size

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``[R, C]`` as the stored codes say, in ``dtype``."""
        return self.quantized().dequantize(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., C] -> [..., R]`` in ``x.dtype``."""
        lead = x.shape[:-1]
        x_NC = x.reshape(-1, self.in_features)
        if self.kernel == "native" and not (x_NC.requires_grad and torch.is_grad_enabled()):
            y = qlinear.q_linear(x_NC, self.k_weight, self.k_scale, self.k_zero, self.bits, self.group_size)
            y = y.to(x.dtype)
        elif self.kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x_NC.to(torch.bfloat16), self.k_weight, self.group_size, self.k_scale_zero
            ).to(x.dtype)
        elif self.kernel == "int4x2":
            xb = x_NC.to(torch.bfloat16)
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(xb, self.k_weight[0], self.group_size, self.k_scale_zero[0]).float()
            y = (y + mm(xb, self.k_weight[1], self.group_size, self.k_scale_zero[1])).to(x.dtype)
        elif self.kernel == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x_NC.float().contiguous(), self._fbgemm_packed).to(x.dtype)
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
