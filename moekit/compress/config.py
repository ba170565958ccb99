"""Configs of the compression functions: :class:`QuantConfig`, :class:`MixedPrecisionConfig`,
:class:`PruneConfig`. Each validates itself and round-trips through JSON (``config.json`` of a
quantized folder stores a :class:`QuantConfig` under ``"quantization"``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.config import JsonConfig, check_choice

VALID_BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq")
KERNELS = ("auto", "exact", "dequant")


def check_bits(bits: int, where: str = "QuantConfig.bits") -> None:
    """ValueError naming ``bits`` and the valid choices unless it is a supported width."""
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise ValueError(f"{where}={bits!r} is not a supported bit width; choose one of {list(VALID_BITS)}")


def check_method(method: str, where: str = "QuantConfig.method") -> None:
    """ValueError naming ``method`` and the valid choices unless it is a supported method."""
    if method not in METHODS:
        raise ValueError(
            f"{where}={method!r} is not a supported quantization method; choose one of {list(METHODS)}"
        )


@dataclass(kw_only=True)
class QuantConfig(JsonConfig):
    """Weight-only group-wise asymmetric quantization of a model.

    Attributes:
        bits: default bit width of every quantized matrix (2, 3, 4 or 8).
        method: ``"rtn"`` (round to nearest) or ``"gptq"`` (error compensation with per-expert
            Hessians from routed calibration inputs).
        group_size: input columns sharing one scale and zero point (clipped to the row length).
        include_non_experts: also quantize attention projections, dense/shared FFNs and ``lm_head``
            (routers, norms and the embedding stay in floating point).
        non_expert_bits: bit width of those linears (None: ``bits``).
        expert_bits: per MoE layer, one bit width per expert (mixed precision); None: ``bits``.
        kernel: ``"auto"`` (fastest measured CPU kernel per width: int4pack for <= 4 bits,
            fbgemm's dynamic int8 linear on a per-channel re-quantization for 8 bits, see
            docs/compression.md), ``"exact"`` (kernels that execute the stored codes; 8 bits then
            runs at about fp32 speed) or ``"dequant"`` (dequantize, then a float matmul).
        gptq_damp: GPTQ's dampening, as a fraction of the Hessian's mean diagonal.
    """

    bits: int = 4
    method: str = "rtn"
    group_size: int = 128
    include_non_experts: bool = False
    non_expert_bits: int | None = None
    expert_bits: list[list[int]] | None = None
    kernel: str = "auto"
    gptq_damp: float = 0.01

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_method(self.method)
        check_choice("QuantConfig", "kernel", self.kernel, KERNELS)
        if self.non_expert_bits is not None:
            check_bits(self.non_expert_bits, "QuantConfig.non_expert_bits")
        if self.group_size < 8 or self.group_size % 8:
            raise ValueError(f"QuantConfig.group_size={self.group_size} must be a positive multiple of 8")
        if self.expert_bits is not None:
            self.expert_bits = [list(row) for row in self.expert_bits]
            for layer, row in enumerate(self.expert_bits):
                for expert, b in enumerate(row):
                    check_bits(b, f"QuantConfig.expert_bits[{layer}][{expert}]")
        if not 0 <= self.gptq_damp < 1:
            raise ValueError(f"QuantConfig.gptq_damp={self.gptq_damp} must be in [0, 1)")


@dataclass(kw_only=True)
class MixedPrecisionConfig(JsonConfig):
    """Per-expert bit allocation (MC-MoE PMQ) solved as a MILP under an average-bits budget.

    Attributes:
        avg_bits: budget: parameter-weighted average stored bits per expert weight, *including*
            the scale/zero-point overhead (16 + 8 bits per group).
        candidate_bits: widths an expert may get.
        group_size: as :class:`QuantConfig`.
        alpha, beta: importance = frequency**alpha * routing_mass**beta (both normalised per layer).
        per_layer_budget: one budget per layer (MC-MoE) instead of one for the whole model.
        min_bits_each: MC-MoE's constraint that each layer has at least one expert at each of the
            two lowest candidate widths (off by default).
    """

    avg_bits: float = 2.5
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 128
    alpha: float = 1.0
    beta: float = 1.0
    per_layer_budget: bool = False
    min_bits_each: bool = False

    def __post_init__(self) -> None:
        self.candidate_bits = tuple(sorted(set(self.candidate_bits)))
        if not self.candidate_bits:
            raise ValueError("MixedPrecisionConfig.candidate_bits must not be empty")
        for b in self.candidate_bits:
            check_bits(b, "MixedPrecisionConfig.candidate_bits")
        if self.avg_bits <= 0:
            raise ValueError(f"MixedPrecisionConfig.avg_bits={self.avg_bits} must be positive")
        if self.group_size < 8 or self.group_size % 8:
            raise ValueError(
                f"MixedPrecisionConfig.group_size={self.group_size} must be a positive multiple of 8"
            )


@dataclass(kw_only=True)
class PruneConfig(JsonConfig):
    """Online dynamic pruning (MC-MoE ODP): a token drops a non-first expert whose weight is small.

    Attributes:
        threshold: slot j > 0 is dropped when ``w_j < threshold * w_0`` (w_0 the top weight);
            0 disables pruning (a no-op).
        renormalize: rescale surviving weights to the original weight sum.
        layers: MoE layer indices to prune (None: all).
    """

    threshold: float = 0.5
    renormalize: bool = True
    layers: list[int] | None = field(default=None)

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"PruneConfig.threshold={self.threshold} must be in [0, 1]")
