"""Quantizing a built model, and saving/loading quantized folders.

A quantized folder is a moekit model folder whose ``config.json`` has a ``"quantization"``
section (:class:`QuantConfig`, with the per-expert widths filled in) and whose
``model.safetensors`` holds, for every quantized matrix, ``<name>.qweight`` (packed uint8),
``<name>.scale`` (float16) and ``<name>.zero`` (uint8) in place of its float weight. The rest of
the model (embedding, norms, routers, anything not quantized) is stored as usual. Never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import collect_layer_inputs, moe_layers
from moekit.compress.config import QuantConfig
from moekit.compress.experts import QuantizedExperts
from moekit.compress.kernels import PackedLinear
from moekit.compress.quant import QuantizedTensor, quantize_gptq, quantize_rtn, resolve_group
from moekit.layers import MoELayer, Router, require_plain_expert_math
from moekit.layers.experts import activate

QUANT_KEY = "quantization"


def _expert_bits(config: QuantConfig, layer: int, num_experts: int) -> list[int]:
    if config.expert_bits is None:
        return [config.bits] * num_experts
    if layer >= len(config.expert_bits) or len(config.expert_bits[layer]) != num_experts:
        raise ValueError(
            f"QuantConfig.expert_bits must give {num_experts} widths for MoE layer {layer}; got "
            f"{config.expert_bits[layer] if layer < len(config.expert_bits) else 'nothing'}"
        )
    return list(config.expert_bits[layer])


def _quantize(w: Tensor, bits: int, group: int, hessian: Tensor | None, damp: float) -> QuantizedTensor:
    if hessian is None:
        return quantize_rtn(w, bits, group)
    return quantize_gptq(w, hessian, bits, group, damp)


def quantize_experts(layer: MoELayer, bits: list[int], config: QuantConfig, inputs=None) -> QuantizedExperts:
    """Quantizes one MoE layer's experts; GPTQ when ``inputs`` (:class:`LayerInputs`) is given.

    GPTQ runs expert by expert: ``w_in``'s Hessian comes from the tokens routed to the expert,
    then ``w_out``'s from the activations those tokens produce through the *quantized* ``w_in``.
    """
    experts = layer.experts
    act = experts.activation
    w_in_list, w_out_list = [], []
    for e in range(experts.num_experts):
        w_in, w_out = (t.detach().float() for t in experts.expert_tensors(e))
        h_in = h_out = None
        if inputs is not None:
            x_ND, _ = inputs.routed(e)
            if x_ND.shape[0] > 0:
                x_ND = x_ND.double()
                h_in = x_ND.t() @ x_ND
        q_in = _quantize(w_in, bits[e], config.group_size, h_in, config.gptq_damp)
        if h_in is not None:
            a_NF = activate(x_ND.float() @ q_in.dequantize().t(), act).double()
            h_out = a_NF.t() @ a_NF
        q_out = _quantize(w_out, bits[e], config.group_size, h_out, config.gptq_damp)
        w_in_list.append(PackedLinear(q_in, kernel=config.kernel))
        w_out_list.append(PackedLinear(q_out, kernel=config.kernel))
    return QuantizedExperts(w_in_list, w_out_list, act)


def _non_expert_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every ``nn.Linear`` outside routers and experts."""
    found = []
    tied = None
    if getattr(model, "config", None) is not None and getattr(model.config, "tie_word_embeddings", False):
        tied = getattr(model, "lm_head", None)
    for parent in model.modules():
        if isinstance(parent, Router):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child is not tied:
                if isinstance(parent, MoELayer) and name in ("shared_gate", "residual_coef"):
                    continue  # scalar gates: tiny and sensitive
                found.append((parent, name, child))
    return found


@torch.no_grad()
def _linear_hessians(model: nn.Module, linears: list[nn.Linear], batches: list[Tensor]) -> dict[int, Tensor]:
    """``sum x x^T`` ``[C, C]`` (float64) of each linear's inputs over one pass on ``batches``."""
    sums: dict[int, Tensor] = {}

    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        h = x.t() @ x
        sums[id(module)] = sums[id(module)] + h if id(module) in sums else h

    handles = [lin.register_forward_pre_hook(hook) for lin in linears]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


@torch.no_grad()
def quantize_model(
    model: nn.Module, config: QuantConfig, calib_batches: list[Tensor] | None = None
) -> nn.Module:
    """Quantizes a moekit model in place (and returns it).

    Args:
        model: a model with resident stacked experts (``MoEForCausalLM``).
        config: what to quantize and how. ``method="gptq"`` needs ``calib_batches``.
        calib_batches: token-id batches ``[B, S]`` for GPTQ. Layers are quantized in order and
            each layer's calibration inputs are recorded after the earlier layers were quantized
            (GPTQ's sequential scheme), so later layers compensate earlier layers' error.

    Returns:
        The model, with each MoE layer's ``experts`` a :class:`QuantizedExperts` and (with
        ``include_non_experts``) non-expert linears replaced by :class:`PackedLinear` (with GPTQ,
        their Hessians come from one calibration pass after the experts were quantized).
        ``model.quant_config`` holds the config with the widths used.
    """
    if config.method == "gptq" and not calib_batches:
        raise ValueError("QuantConfig.method='gptq' needs calibration batches (pass calib_batches / --calib)")
    layers = moe_layers(model)
    require_plain_expert_math(layers, "quantize")  # QuantizedExperts are two bias-free matrices
    targets = _non_expert_linears(model) if config.include_non_experts else []
    names = {id(m): n for n, m in model.named_modules()}
    for _, _, lin in targets:
        # Checked before anything is replaced, so a refusal leaves the model as it was.
        if lin.in_features % 8:
            raise ValueError(
                f"QuantConfig.include_non_experts: {names[id(lin)]} has {lin.in_features} input columns, not a "
                "multiple of 8 (the code packing unit); quantize the experts only"
            )
    all_bits = []
    for index, layer in enumerate(layers):
        bits = _expert_bits(config, index, layer.config.num_experts)
        resolve_group(layer.config.dim, config.group_size)
        resolve_group(layer.config.ffn_dim, config.group_size)
        inputs = None
        if config.method == "gptq":
            inputs = collect_layer_inputs(model, calib_batches, [index])[index]
        layer.experts = quantize_experts(layer, bits, config, inputs)
        all_bits.append(bits)
    if config.include_non_experts:
        nb = config.non_expert_bits or config.bits
        hessians = (
            _linear_hessians(model, [lin for _, _, lin in targets], calib_batches)
            if config.method == "gptq"
            else {}
        )
        for parent, name, lin in targets:
            qt = _quantize(
                lin.weight.detach().float(), nb, config.group_size, hessians.get(id(lin)), config.gptq_damp
            )
            setattr(parent, name, PackedLinear(qt, lin.bias, kernel=config.kernel))
    model.quant_config = config.replace(expert_bits=all_bits)
    return model


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Writes a quantized folder: a moekit model folder (:func:`moekit.models.io.write_model_folder`)
    whose ``config.json`` carries the ``"quantization"`` section. Non-persistent kernel buffers are
    not written; they are rebuilt on load."""
    from moekit.models.io import model_tensors, write_model_folder

    qconfig = getattr(model, "quant_config", None)
    if qconfig is None:
        raise ValueError(
            "save_quantized: the model was not quantized (no quant_config); use quantize_model first"
        )
    write_model_folder(
        model,
        path,
        tensors=model_tensors(model),
        extra_config={QUANT_KEY: qconfig.to_dict()},
        metadata={"quantized": "1"},
    )


def is_quantized_folder(path: str | Path) -> bool:
    """True when ``path/config.json`` has a ``"quantization"`` section."""
    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and QUANT_KEY in data


def _packed_from(
    tensors: dict[str, Tensor], prefix: str, bits: int, group: int, shape, bias_key: str | None, kernel: str
) -> PackedLinear:
    qt = QuantizedTensor.from_state(tensors, prefix, bits, resolve_group(shape[1], group), shape)
    bias = tensors.get(bias_key) if bias_key else None
    return PackedLinear(qt, bias, kernel=kernel)


def load_quantized(
    path: str | Path, dtype: torch.dtype | None = None, kernel: str | None = None
) -> nn.Module:
    """Loads a folder written by :func:`save_quantized` as a ready-to-run ``MoEForCausalLM``.

    Args:
        path: the folder.
        dtype: dtype of the float parts (None: float32).
        kernel: override the saved ``QuantConfig.kernel`` (``"auto"`` or ``"dequant"``).

    Raises:
        ValueError: naming the file or tensor when something is missing or mis-shaped.
    """
    from moekit.models.io import CONFIG_NAME, WEIGHTS_NAME, read_config, read_config_dict
    from moekit.models.safetensors_io import load_safetensors

    folder = Path(path)
    data = read_config_dict(folder)
    if QUANT_KEY not in data:
        raise ValueError(f"{folder / CONFIG_NAME} has no {QUANT_KEY!r} section: not a quantized folder")
    try:
        qconfig = QuantConfig.from_dict(data[QUANT_KEY])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_NAME}: invalid {QUANT_KEY!r} section: {err}") from None
    if kernel is not None:
        qconfig = qconfig.replace(kernel=kernel)
    family, config = read_config(folder, ignore=(QUANT_KEY,))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{weights} not found: the folder has a config but no weights")
    tensors = load_safetensors(weights)
    model = family.build(config)
    for index, layer in enumerate(moe_layers(model)):
        prefix = next(n for n, m in model.named_modules() if m is layer) + ".experts"
        bits = _expert_bits(qconfig, index, layer.config.num_experts)
        old = layer.experts
        h = old.w_in.shape[1]
        w_in = [
            _packed_from(
                tensors, f"{prefix}.w_in.{e}", bits[e], qconfig.group_size, (h, old.dim), None, qconfig.kernel
            )
            for e in range(old.num_experts)
        ]
        w_out = [
            _packed_from(
                tensors,
                f"{prefix}.w_out.{e}",
                bits[e],
                qconfig.group_size,
                (old.dim, old.ffn_dim),
                None,
                qconfig.kernel,
            )
            for e in range(old.num_experts)
        ]
        layer.experts = QuantizedExperts(w_in, w_out, old.activation)
    if qconfig.include_non_experts:
        nb = qconfig.non_expert_bits or qconfig.bits
        names = {id(m): n for n, m in model.named_modules()}
        for parent, name, lin in _non_expert_linears(model):
            prefix = f"{names[id(parent)]}.{name}".lstrip(".")
            bias_key = f"{prefix}.bias" if lin.bias is not None else None
            setattr(
                parent,
                name,
                _packed_from(
                    tensors, prefix, nb, qconfig.group_size, tuple(lin.weight.shape), bias_key, qconfig.kernel
                ),
            )
    expected = model.state_dict()
    for name in model.tied_weight_names():
        expected.pop(name, None)
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise ValueError(f"{weights}: missing tensor(s) {missing[:10]}, unknown tensor(s) {unknown[:10]}")
    model.load_state_dict(tensors, strict=not model.tied_weight_names())
    if dtype is not None:
        _to_dtype(model, dtype)
    model.quant_config = qconfig
    model.eval()
    return model


def _to_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts float parameters and buffers to ``dtype``, except inside :class:`PackedLinear`
    (its scales keep their stored precision; kernels cast activations themselves)."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(dtype)


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a model: ``stored`` (what a save writes: parameters + persistent buffers) and
    ``resident`` (everything in memory, kernel forms included)."""
    seen: set[int] = set()
    stored = resident = 0
    state = model.state_dict()
    for t in state.values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        stored += t.numel() * t.element_size()
    seen_all: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen_all:
            continue
        seen_all.add(t.data_ptr())
        resident += t.numel() * t.element_size()
    return {"stored": stored, "resident": resident}
