"""Configs of the compression functions: :class:`QuantConfig`, :class:`MixedPrecisionConfig`,
:class:`PruneConfig`. Each validates itself and round-trips through JSON (``config.json`` of a
quantized folder stores a :class:`QuantConfig` under ``"quantization"``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.config import JsonConfig, check_choice

VALID_BITS = (1, 2, 3, 4, 8)
METHODS = ("rtn", "gptq")
KERNELS = ("auto", "native", "exact", "dequant")


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
        kernel: ``"auto"`` (fastest measured CPU kernel per width: moekit's native kernel where
            it builds and fits, else int4pack for <= 4 bits and fbgemm's dynamic int8 linear on a
            per-channel re-quantization for 8 bits, see docs/compression.md), ``"native"``
            (moekit's kernel: block-32 int8 activations, VNNI dots), ``"exact"`` (kernels that execute the stored codes; 8 bits then
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


MIXED_OBJECTIVES = ("block_output", "expert_mse")
ONE_BIT_ERRORS = ("binarize", "stored")


@dataclass(kw_only=True)
class MixedPrecisionConfig(JsonConfig):
    """Per-expert bit allocation (MC-MoE PMQ) solved as a MILP under an average-bits budget.

    Defaults follow the MC-MoE code as the notes read it ([code], Aaronhuang-778/MC-MoE @7aa062c):
    widths {1, 2, 3}, ``alpha = 1``, ``beta = 1.5``, the error exponent equal to ``alpha``, one
    program per layer, at least one expert at each of the two highest widths, and the MoE-block
    output error as the measured loss. The paper's text is said to use different exponents than
    its code (not checked here), so all of them are parameters.

    Attributes:
        avg_bits: budget: parameter-weighted average stored bits per expert weight, *including*
            the scale/zero-point overhead (16 + 8 bits per group). MC-MoE counts code bits only
            (``sum_i b_i <= B`` per layer, B = 12..20 for 8 experts); with equal-size experts and a
            per-layer budget the two agree at ``avg_bits = B / E + 24 / group_size``.
        candidate_bits: widths an expert may get.
        group_size: as :class:`QuantConfig`.
        alpha, beta: importance = frequency**alpha * routing_mass**beta (both normalised per layer;
            MC-MoE also scales them by 1000, which changes no argmin and is left out).
        gamma: exponent on the measured error: cost = importance * error**gamma (the MC-MoE code
            reuses alpha here, so 1.0).
        per_layer_budget: one budget per layer (MC-MoE) instead of one for the whole model.
        min_bits_each: each layer keeps at least one expert at each of the two *highest* candidate
            widths (MC-MoE: one at 3 bits and one at 2 bits of {1, 2, 3}).
        min_use_bits: explicit widths each layer must use at least once (overrides
            ``min_bits_each``); e.g. the two lowest for the earlier moekit reading.
        objective: ``"block_output"`` (MC-MoE: the Frobenius norm of the MoE block's output change
            when only that expert is quantized, summed over calibration batches) or
            ``"expert_mse"`` (the earlier moekit measure: the expert's own mean squared output
            error on its routed tokens, routing weights ignored).
        one_bit_error: how the 1-bit error is measured: ``"binarize"`` (MC-MoE: sign(w) * mean|w|
            per group) or ``"stored"`` (moekit's stored 1-bit codes, asymmetric with 0 in range,
            levels {0, s} or {-s, 0}, which is also what GPTQ's min/max quantizer gives at 1 bit).
            Only ``"stored"`` measures what :func:`~moekit.compress.quantize_model` will store.
    """

    avg_bits: float = 2.5
    candidate_bits: tuple[int, ...] = (1, 2, 3)
    group_size: int = 128
    alpha: float = 1.0
    beta: float = 1.5
    per_layer_budget: bool = True
    min_bits_each: bool = True
    gamma: float = 1.0
    min_use_bits: tuple[int, ...] | None = None
    objective: str = "block_output"
    one_bit_error: str = "binarize"

    def __post_init__(self) -> None:
        check_choice("MixedPrecisionConfig", "objective", self.objective, MIXED_OBJECTIVES)
        check_choice("MixedPrecisionConfig", "one_bit_error", self.one_bit_error, ONE_BIT_ERRORS)
        if self.min_use_bits is not None:
            self.min_use_bits = tuple(self.min_use_bits)
            extra = [b for b in self.min_use_bits if b not in self.candidate_bits]
            if extra:
                raise ValueError(
                    f"MixedPrecisionConfig.min_use_bits {extra} are not in candidate_bits {list(self.candidate_bits)}"
                )
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

    MC-MoE's code [code, per the notes]: per-layer thresholds beta_l of about 0.40-0.62 tuned for
    Mixtral (hard-coded there, parameters here), only the ``block_range = 10`` layers with the
    smallest pruning loss are pruned, and in prefill the top ``tau_h = 2%`` of tokens by
    importance keep all their experts (the bottom ``tau_l = 0`` would lose all).

    Attributes:
        threshold: slot j > 0 is dropped when ``w_j < threshold * w_0`` (w_0 the top weight);
            0 disables pruning (a no-op).
        renormalize: rescale surviving weights to the original weight sum.
        layers: MoE layer indices to prune (None: all).
        thresholds: one threshold per MoE layer (overrides ``threshold``).
        num_layers: prune only this many of the candidate layers, those with the smallest
            pruning loss on calibration data (:func:`~moekit.compress.prune.rank_layers_by_pruning_loss`;
            needs ``calibration`` in :func:`~moekit.compress.dynamic_prune`). None: all candidates.
        protect_top: in prefill, the share of each sequence's tokens with the highest importance
            (attention received x ||h||_1) that keep every expert (MC-MoE: 0.02).
        drop_bottom: the share with the lowest importance that lose every expert (MC-MoE: 0).
    """

    threshold: float = 0.5
    renormalize: bool = True
    layers: list[int] | None = field(default=None)
    thresholds: list[float] | None = None
    num_layers: int | None = None
    protect_top: float = 0.02
    drop_bottom: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"PruneConfig.threshold={self.threshold} must be in [0, 1]")
        if self.thresholds is not None:
            self.thresholds = [float(t) for t in self.thresholds]
            bad = [t for t in self.thresholds if not 0 <= t <= 1]
            if bad:
                raise ValueError(f"PruneConfig.thresholds {bad} must each be in [0, 1]")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"PruneConfig.num_layers={self.num_layers} must be >= 1 (or None for all)")
        for name in ("protect_top", "drop_bottom"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"PruneConfig.{name}={getattr(self, name)} must be in [0, 1)")
        if self.protect_top + self.drop_bottom >= 1:
            raise ValueError("PruneConfig: protect_top + drop_bottom must stay below 1")
