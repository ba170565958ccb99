"""moekit.compress: expert quantization, mixed precision, dynamic pruning and GGUF export, as pure
functions over built models.

Contract:
    ``quantize_model(model, QuantConfig, calib_batches=None) -> model`` replaces each MoE layer's
    ``experts`` with :class:`QuantizedExperts` (an :class:`~moekit.layers.ExpertWeights`; the layer
    code is unchanged) and, with ``include_non_experts``, other ``nn.Linear`` modules (attention,
    dense/shared FFNs, ``lm_head``; never routers or the embedding) with :class:`PackedLinear`.
    Quantization is weight-only, group-wise asymmetric: codes in ``[0, 2^b-1]``, float16 scale and
    uint8 zero point per group of ``group_size`` input columns (overhead 24/g bits per weight).
    ``save_quantized(model, dir)`` / ``load_quantized(dir)`` use safetensors only (packed uint8
    codes + scales + zeros) and a ``"quantization"`` section in ``config.json``;
    ``moekit.cli.common.load_model_and_tokenizer`` routes such folders here.
    ``expert_stats`` + ``allocate_bits`` give one width per expert from a MILP (HiGHS) under an
    average stored-bits budget. ``dynamic_prune(model, PruneConfig, calibration=None) -> model`` drops
    low-weight second experts per token (MC-MoE ODP). ``export_gguf(model, file, type)`` writes llama.cpp files.
    ``moekit.offload.offload_quantized_model`` offloads a quantized model with packed experts in the store; any
    ``QuantizedExperts`` can also be ``offload_model``'s low-bit miss ``fallback`` (HOBBIT).

Layout:
    config.py      QuantConfig, MixedPrecisionConfig, PruneConfig (validated, JSON round-trip)
    quant.py       group-wise RTN and GPTQ, bit packing, QuantizedTensor (the stored form)
    kernels.py     PackedLinear: CPU kernels (int4pack for <= 4 bits, int8group for 8, dequant)
    experts.py     QuantizedExperts (per-expert widths)
    calibrate.py   MoE layer inputs and per-expert frequency / mass / error on calibration text
    mixed.py       MILP allocation, brute force (tests), uniform baseline
    model.py       quantize_model, save_quantized, load_quantized, model_bytes
    prune.py       PrunedRouter, dynamic_prune (MC-MoE ODP: per-layer thresholds, layer ranking,
                   token protection), rank_layers_by_pruning_loss, expert_calls_saved
    gguf_export.py GGUF writer (qwen3moe, qwen2moe, llama/Mixtral)
    edgemoe.py     EdgeMoE: bit-width search by accuracy tolerance, second-order expert predictor,
                   cache-eviction priority (used by moekit.offload's ``policy="edgemoe"``)

To add a bit width: add it to ``config.VALID_BITS``, make :func:`quant.pack_codes` handle it (any
width up to 8 already packs), and map it to a kernel in :func:`kernels.choose_kernel` (a width
without a kernel runs the ``dequant`` path). To add a method: add its name to ``config.METHODS``
and a ``quantize_<name>(w_RC, ..., bits, group_size) -> QuantizedTensor`` in ``quant.py``, and
dispatch to it in ``model._quantize``; the stored form, kernels and checkpoints stay the same.
"""

from moekit.compress.calibrate import ExpertStats, LayerInputs, binarize, collect_layer_inputs, expert_stats
from moekit.compress.config import METHODS, VALID_BITS, MixedPrecisionConfig, PruneConfig, QuantConfig
from moekit.compress.experts import QuantizedExperts
from moekit.compress.kernels import PackedLinear, choose_kernel
from moekit.compress.mixed import (
    Allocation,
    allocate_bits,
    brute_force_allocation,
    mixed_precision_stats,
    solve_allocation,
    uniform_allocation,
)
from moekit.compress.model import (
    is_quantized_folder,
    load_quantized,
    model_bytes,
    quantize_experts,
    quantize_model,
    save_quantized,
)
from moekit.compress.prune import (
    PrunedRouter,
    attention_received,
    dynamic_prune,
    expert_calls_saved,
    rank_layers_by_pruning_loss,
)
from moekit.compress.quant import QuantizedTensor, quantize_gptq, quantize_rtn

__all__ = [
    "METHODS",
    "VALID_BITS",
    "Allocation",
    "ExpertStats",
    "LayerInputs",
    "MixedPrecisionConfig",
    "PackedLinear",
    "PruneConfig",
    "PrunedRouter",
    "QuantConfig",
    "QuantizedExperts",
    "QuantizedTensor",
    "allocate_bits",
    "attention_received",
    "binarize",
    "brute_force_allocation",
    "choose_kernel",
    "collect_layer_inputs",
    "dynamic_prune",
    "expert_calls_saved",
    "expert_stats",
    "is_quantized_folder",
    "load_quantized",
    "mixed_precision_stats",
    "model_bytes",
    "quantize_experts",
    "quantize_gptq",
    "quantize_model",
    "quantize_rtn",
    "rank_layers_by_pruning_loss",
    "save_quantized",
    "solve_allocation",
    "uniform_allocation",
]
