"""Calibration: what each MoE layer sees on calibration text, and per-expert statistics.

Shape legend: T = calibration tokens, D = model width, K = slots per token, E = FFN experts,
N = tokens routed to one expert, B = candidate bit widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.compress.quant import quantize_rtn
from moekit.layers import MoELayer
from moekit.layers.experts import activate


@dataclass
class LayerInputs:
    """One MoE layer's inputs and routing over the calibration batches.

    Attributes:
        x_TD: the layer's input token states (float32).
        expert_ids_TK: chosen experts, -1 in unused slots.
        weights_TK: combine weights.
    """

    x_TD: Tensor
    expert_ids_TK: Tensor
    weights_TK: Tensor

    def routed(self, expert: int) -> tuple[Tensor, Tensor]:
        """``(x_ND, w_N)``: the inputs routed to ``expert`` and their routing weights."""
        token, slot = torch.nonzero(self.expert_ids_TK == expert, as_tuple=True)
        return self.x_TD[token], self.weights_TK[token, slot].float()


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def collect_layer_inputs(
    model: nn.Module, batches: list[Tensor], layers: list[int] | None = None
) -> dict[int, LayerInputs]:
    """Runs ``model`` on ``batches`` (each ``[B, S]`` token ids) and records MoE layer inputs.

    Args:
        model: a causal LM whose forward takes token ids.
        batches: calibration batches.
        layers: MoE layer indices to record (None: all).

    Returns:
        ``{layer index: LayerInputs}`` with all batches' tokens concatenated.
    """
    mls = moe_layers(model)
    wanted = range(len(mls)) if layers is None else layers
    records: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {i: [] for i in wanted}

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            r = output.routing
            records[index].append(
                (
                    x.reshape(-1, x.shape[-1]).float(),
                    r.expert_ids.reshape(-1, r.expert_ids.shape[-1]),
                    r.weights.reshape(-1, r.weights.shape[-1]),
                )
            )

        return hook

    handles = [mls[i].register_forward_hook(make_hook(i), with_kwargs=True) for i in wanted]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        i: LayerInputs(
            torch.cat([r[0] for r in rec]), torch.cat([r[1] for r in rec]), torch.cat([r[2] for r in rec])
        )
        for i, rec in records.items()
    }


@dataclass
class ExpertStats:
    """Per-expert calibration statistics of one model, for mixed-precision allocation.

    Attributes:
        freq: ``[L][E]`` share of the layer's assignments each expert got (sums to 1 per layer).
        mass: ``[L][E]`` share of the layer's routing-weight mass.
        error: ``[L][E][B]`` mean squared output error (per routed token and output channel) of the
            expert quantized by RTN at ``bits[b]``, on its routed calibration tokens.
        params: ``[L][E]`` parameters per expert.
        bits: the candidate widths B.
    """

    freq: list[list[float]]
    mass: list[list[float]]
    error: list[list[list[float]]]
    params: list[list[int]]
    bits: list[int]


def _expert_weights(layer: MoELayer, expert: int) -> tuple[Tensor, Tensor]:
    w_in, w_out = layer.experts.expert_tensors(expert)
    return w_in.detach().float(), w_out.detach().float()


@torch.no_grad()
def expert_stats(
    model: nn.Module, batches: list[Tensor], bits: tuple[int, ...], group_size: int, max_tokens: int = 4096
) -> ExpertStats:
    """Frequency, routing mass and RTN quantization error per expert and candidate width.

    The error of expert e at width b is ``mean ||f_e(x) - f_e^b(x)||^2 / D`` over the (at most
    ``max_tokens``) calibration tokens routed to e, where ``f_e^b`` has both projections
    quantized to b bits. Experts that got no tokens have error 0 (and frequency 0).
    """
    inputs = collect_layer_inputs(model, batches)
    freq, mass, error, params = [], [], [], []
    for index, layer in enumerate(moe_layers(model)):
        rec = inputs[index]
        num_e = layer.config.num_experts
        ids = rec.expert_ids_TK
        counts = torch.stack([(ids == e).sum() for e in range(num_e)]).float()
        masses = torch.stack([rec.weights_TK[ids == e].float().sum() for e in range(num_e)])
        freq.append((counts / counts.sum().clamp_min(1)).tolist())
        mass.append((masses / masses.sum().clamp_min(1e-12)).tolist())
        layer_err, layer_params = [], []
        for e in range(num_e):
            w_in, w_out = _expert_weights(layer, e)
            layer_params.append(w_in.numel() + w_out.numel())
            x_ND, _ = rec.routed(e)
            x_ND = x_ND[:max_tokens]
            if x_ND.shape[0] == 0:
                layer_err.append([0.0] * len(bits))
                continue
            act = layer.config.activation
            ref = activate(x_ND @ w_in.t(), act) @ w_out.t()
            errs = []
            for b in bits:
                q_in = quantize_rtn(w_in, b, group_size).dequantize()
                q_out = quantize_rtn(w_out, b, group_size).dequantize()
                out = activate(x_ND @ q_in.t(), act) @ q_out.t()
                errs.append(float(((out - ref) ** 2).mean()))
            layer_err.append(errs)
        error.append(layer_err)
        params.append(layer_params)
    return ExpertStats(freq, mass, error, params, list(bits))
