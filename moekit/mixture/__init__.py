"""moekit.mixture: MoE², collaborative inference over several whole models (floor 7).

The experts are model folders (anything :func:`moekit.from_pretrained` opens) that share a
tokenizer. A small gate over a prompt embedding weights them; the answer is the gated mixture of
their next-token distributions (or the best-weighted expert alone). Which experts run is chosen
at two levels: per request, the ones whose latency model fits the request's latency class; and
globally, the subset that maximises quality under an energy budget (branch and bound over
subsets, :mod:`moekit.mixture.select`). See ``docs/mixture.md``.

Modules: :mod:`.profiles` (the JSON configs, latency measurement), :mod:`.gate` (the gate, its
training, the masking property), :mod:`.select` (the search methods), :mod:`.fit` (scoring text,
the selection objective), :mod:`.runtime` (loading and decoding a mixture), :mod:`.serve` (the
server engine for ``moekit serve --mixture``).
"""

from moekit.mixture.gate import GateConfig, MixtureGate, masking_gap, mixture_nll, train_gate
from moekit.mixture.profiles import (
    DeviceProfile,
    ExpertProfile,
    HardwareProfile,
    LatencyClass,
    MixtureConfig,
    load_mixture_config,
    measure_latency,
)
from moekit.mixture.runtime import Choice, Mixture, MixtureSession, mix_logprobs
from moekit.mixture.select import (
    Objective,
    SearchResult,
    best_single,
    branch_and_bound,
    exhaustive,
    greedy,
    monotonicity_report,
    random_subset,
)

__all__ = [
    "Choice",
    "DeviceProfile",
    "ExpertProfile",
    "GateConfig",
    "HardwareProfile",
    "LatencyClass",
    "Mixture",
    "MixtureConfig",
    "MixtureGate",
    "MixtureSession",
    "Objective",
    "SearchResult",
    "best_single",
    "branch_and_bound",
    "exhaustive",
    "greedy",
    "load_mixture_config",
    "masking_gap",
    "measure_latency",
    "mix_logprobs",
    "mixture_nll",
    "monotonicity_report",
    "random_subset",
    "train_gate",
]
