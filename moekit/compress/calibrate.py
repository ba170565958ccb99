"""Calibration: what each MoE layer sees on calibration text, and per-expert statistics.

Shape legend: T = calibration tokens, D = model width, K = slots per token, E = FFN experts,
N = tokens routed to one expert, B = candidate bit widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.compress.quant import quantize_rtn, resolve_group
from moekit.layers import MoELayer
from moekit.layers.experts import activate


@dataclass
class LayerInputs:
    """One MoE layer's inputs and routing over the calibration batches.

    Attributes:
        x_TD: the layer's input token states (float32).
        expert_ids_TK: chosen experts, -1 in unused slots.
        weights_TK: combine weights.
        batch_T: int64 index of the calibration batch each token came from (None: one batch).
    """

    x_TD: Tensor
    expert_ids_TK: Tensor
    weights_TK: Tensor
    batch_T: Tensor | None = None

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
            torch.cat([r[0] for r in rec]),
            torch.cat([r[1] for r in rec]),
            torch.cat([r[2] for r in rec]),
            torch.cat([torch.full((r[0].shape[0],), b, dtype=torch.int64) for b, r in enumerate(rec)]),
        )
        for i, rec in records.items()
    }


@dataclass
class ExpertStats:
    """Per-expert calibration statistics of one model, for mixed-precision allocation.

    Attributes:
        freq: ``[L][E]`` share of the layer's assignments each expert got (sums to 1 per layer).
        mass: ``[L][E]`` share of the layer's routing-weight mass.
        error: ``[L][E][B]`` the error of the expert quantized at ``bits[b]`` (see ``objective``).
        params: ``[L][E]`` parameters per expert.
        bits: the candidate widths B.
        objective: ``"expert_mse"`` (mean squared output error of the expert itself, per routed
            token and output channel) or ``"block_output"`` (MC-MoE: ``sum_batches ||Y - Y_e^b||_F``,
            the MoE block's output change when only expert e is quantized).
    """

    freq: list[list[float]]
    mass: list[list[float]]
    error: list[list[list[float]]]
    params: list[list[int]]
    bits: list[int]
    objective: str = "expert_mse"


def _expert_weights(layer: MoELayer, expert: int) -> tuple[Tensor, Tensor]:
    w_in, w_out = layer.experts.expert_tensors(expert)
    return w_in.detach().float(), w_out.detach().float()


def binarize(w_RC: Tensor, group_size: int) -> Tensor:
    """MC-MoE's 1-bit quantizer for the error table: ``sign(w) * mean|w|`` per group of
    ``group_size`` columns (dequantized, ``[R, C]`` float). Not a stored format."""
    num_r, num_c = w_RC.shape
    g = resolve_group(num_c, group_size)
    w_RGg = w_RC.reshape(num_r, num_c // g, g)
    return (torch.sign(w_RGg) * w_RGg.abs().mean(-1, keepdim=True)).reshape(num_r, num_c)


def _dequantized(w_RC: Tensor, bits: int, group_size: int, one_bit: str) -> Tensor:
    if bits == 1 and one_bit == "binarize":
        return binarize(w_RC, group_size)
    return quantize_rtn(w_RC, bits, group_size).dequantize()


@torch.no_grad()
def expert_stats(
    model: nn.Module,
    batches: list[Tensor],
    bits: tuple[int, ...],
    group_size: int,
    max_tokens: int = 4096,
    objective: str = "expert_mse",
    one_bit: str = "stored",
) -> ExpertStats:
    """Frequency, routing mass and quantization error per expert and candidate width.

    ``objective="expert_mse"``: the error of expert e at width b is ``mean ||f_e(x) - f_e^b(x)||^2 / D``
    over the (at most ``max_tokens``) calibration tokens routed to e, where ``f_e^b`` has both
    projections quantized to b bits by RTN.

    ``objective="block_output"`` (MC-MoE): ``sum over calibration batches of ||Y - Y'||_F``, Y the
    MoE block's ``[T_batch, D]`` output and Y' the same with only expert e quantized. The router
    and the other experts are unchanged, so ``Y - Y'`` is ``w_te (f_e(x_t) - f_e^b(x_t))`` on the
    tokens routed to e and 0 elsewhere, computed that way (all routed tokens, no ``max_tokens``).

    ``one_bit``: ``"stored"`` measures 1 bit with the stored RTN codes, ``"binarize"`` with
    MC-MoE's ``sign(w) * mean|w|`` (:func:`binarize`). Experts that got no tokens have error 0
    (and frequency 0).
    """
    if objective not in ("expert_mse", "block_output"):
        raise ValueError(f"expert_stats: objective={objective!r} must be 'expert_mse' or 'block_output'")
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
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if objective == "expert_mse":
                token = token[:max_tokens]
                slot = slot[:max_tokens]
            if token.numel() == 0:
                layer_err.append([0.0] * len(bits))
                continue
            x_ND = rec.x_TD[token]
            act = layer.config.activation
            ref = activate(x_ND @ w_in.t(), act) @ w_out.t()
            errs = []
            for b in bits:
                q_in = _dequantized(w_in, b, group_size, one_bit)
                q_out = _dequantized(w_out, b, group_size, one_bit)
                diff_ND = activate(x_ND @ q_in.t(), act) @ q_out.t() - ref
                if objective == "expert_mse":
                    errs.append(float((diff_ND**2).mean()))
                    continue
                gate_N1 = rec.weights_TK[token, slot].float().unsqueeze(-1)
                sq_N = ((gate_N1 * diff_ND) ** 2).sum(-1)
                batch_N = rec.batch_T[token] if rec.batch_T is not None else torch.zeros_like(token)
                per_batch = torch.zeros(int(batch_N.max()) + 1).index_add_(0, batch_N, sq_N)
                errs.append(float(per_batch.sqrt().sum()))
            layer_err.append(errs)
        error.append(layer_err)
        params.append(layer_params)
    return ExpertStats(freq, mass, error, params, list(bits), objective)
