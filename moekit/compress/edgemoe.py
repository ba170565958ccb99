"""EdgeMoE (Yi et al. 2023, arXiv 2308.14352): expert-wise bit-width search by accuracy tolerance,
an expert predictor conditioned on the previous layers' choices, and a cache-eviction priority.

Shape legend: L = MoE layers, E = experts per layer, T = tokens, K = slots per token.

Everything here is rebuilt from second-hand summaries of the paper ([paper]+[recon] in
``../shared/notes/papers-inference-and-surgery.md``; the paper's text was not checked), so the
choices below are parameters, each one's docstring says what is assumed:

* :func:`bitwidth_search` (beside the MILP of :mod:`moekit.compress.mixed`): an expert's
  importance is the score drop when only it is quantized to the lowest width; experts are lowered
  least-important first, one width at a time, keeping each step whose total score drop stays within
  the tolerance P. Widths default to EdgeMoE's {2, 4, 8, 32}; 32 means "left in float".
* :class:`SecondOrderTransitions`: ``P(e_{l+1} = j | e_l = a, e_{l-1} = b)`` counted on routing
  traces (first choices), backing off to ``P(j | a)`` for unseen pairs and for the first layer;
  :func:`edgemoe_predictor` is an offload ``Predictor`` that remembers the previous layer's choices
  within a forward.
* :func:`eviction_priority`: victims are low-frequency experts in the layers that run furthest in
  the future (the layer just executed comes back only on the next token).

This module imports no offload code (``moekit.offload`` sits on a higher floor and uses it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.compress.calibrate import moe_layers
from moekit.compress.quant import quantize_rtn
from moekit.config import JsonConfig

FLOAT_BITS = 32


@dataclass(kw_only=True)
class BitwidthSearchConfig(JsonConfig):
    """EdgeMoE's expert-wise bit-width adaptation.

    Attributes:
        tolerance: P, the largest allowed drop of the score (in the score's units; for accuracy
            1-5 points in EdgeMoE's framing, i.e. 0.01-0.05).
        bits: candidate widths, highest first after sorting; 32 = float (not quantized).
        group_size: RTN group size used while searching (EdgeMoE's INT2 is channel-wise; a group
            of the whole row is that).
    """

    tolerance: float = 0.01
    bits: tuple[int, ...] = (2, 4, 8, 32)
    group_size: int = 128

    def __post_init__(self) -> None:
        self.bits = tuple(sorted(set(self.bits), reverse=True))
        if len(self.bits) < 2:
            raise ValueError(f"BitwidthSearchConfig.bits needs at least two widths, got {self.bits}")
        if self.tolerance < 0:
            raise ValueError(f"BitwidthSearchConfig.tolerance={self.tolerance} must be >= 0")
        bad = [b for b in self.bits if b != FLOAT_BITS and b not in (1, 2, 3, 4, 8)]
        if bad:
            raise ValueError(
                f"BitwidthSearchConfig.bits {bad} are not quantizable widths (1, 2, 3, 4, 8 or 32)"
            )


@dataclass
class BitwidthResult:
    """Result of :func:`bitwidth_search`.

    Attributes:
        bits: ``[L][E]`` chosen width per expert (32 = float).
        score: the score of that configuration; ``baseline``: the all-float score.
        importance: ``[L][E]`` score drop with only that expert at the lowest width.
        evaluations: how many configurations were scored.
    """

    bits: list[list[int]]
    score: float
    baseline: float
    importance: list[list[float]]
    evaluations: int


def bitwidth_search(
    evaluate: Callable[[list[list[int]]], float], num_experts: Sequence[int], config: BitwidthSearchConfig
) -> BitwidthResult:
    """EdgeMoE's search by accuracy tolerance over any scorer.

    Args:
        evaluate: ``bits [L][E] -> score`` (higher is better, e.g. accuracy or minus the loss).
        num_experts: E per MoE layer.
        config: :class:`BitwidthSearchConfig`.

    Procedure (the order is [recon]): baseline = all experts at the highest width; importance of
    expert (l, e) = baseline - score with only it at the lowest width; then for each lower width in
    turn, experts are visited least important first and lowered one step when the configuration's
    drop stays ``<= tolerance`` (an expert that fails keeps its width; more important experts are
    still tried, since drops need not be monotone).
    """
    widths = list(config.bits)
    top, low = widths[0], widths[-1]
    current = [[top] * n for n in num_experts]
    baseline = evaluate(copy.deepcopy(current))
    count = 1
    importance: list[list[float]] = []
    for li, n in enumerate(num_experts):
        row = []
        for e in range(n):
            probe = copy.deepcopy(current)
            probe[li][e] = low
            row.append(baseline - evaluate(probe))
            count += 1
        importance.append(row)
    order = sorted(((importance[li][e], li, e) for li, n in enumerate(num_experts) for e in range(n)))
    score = baseline
    for step in widths[1:]:
        for _, li, e in order:
            if current[li][e] <= step:
                continue
            trial = copy.deepcopy(current)
            trial[li][e] = step
            got = evaluate(trial)
            count += 1
            if baseline - got <= config.tolerance:
                current, score = trial, got
    return BitwidthResult(current, score, baseline, importance, count)


def fake_quantized(model: nn.Module, bits: list[list[int]], group_size: int) -> nn.Module:
    """A deep copy of ``model`` whose expert weights are replaced by their RTN-dequantized values at
    ``bits[l][e]`` (32: unchanged), for scoring a configuration without packing it."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer, row in zip(moe_layers(out), bits):
            for e, b in enumerate(row):
                if b == FLOAT_BITS:
                    continue
                for w in layer.experts.expert_tensors(e):
                    w.copy_(quantize_rtn(w.detach().float(), b, group_size).dequantize().to(w.dtype))
    return out


def search_model_bits(
    model: nn.Module, score_fn: Callable[[nn.Module], float], config: BitwidthSearchConfig
) -> BitwidthResult:
    """:func:`bitwidth_search` on a model: each configuration is scored as
    ``score_fn(fake_quantized(model, bits))``. Experts left at 32 stay float; quantize the others
    with :func:`~moekit.compress.quantize_model` (``expert_bits`` needs a stored width for every
    expert, so map 32 to 8 there, or keep the model float)."""
    counts = [layer.config.num_experts for layer in moe_layers(model)]
    return bitwidth_search(
        lambda bits: score_fn(fake_quantized(model, bits, config.group_size)), counts, config
    )


class SecondOrderTransitions:
    """``P(e_{l+1} = j | e_l = a, e_{l-1} = b)`` from first choices on routing traces.

    Attributes:
        first: per layer pair ``l -> l+1``, counts ``[E_l, E_{l+1}]`` (next experts, all slots).
        second: per ``l >= 1``, counts ``[E_{l-1}, E_l, E_{l+1}]``.
    """

    def __init__(self, first: list[Tensor], second: list[Tensor | None]) -> None:
        self.first, self.second = first, second

    @classmethod
    def fit(cls, expert_ids: Sequence[Tensor], num_experts: Sequence[int]) -> SecondOrderTransitions:
        """Counts transitions on per-layer ``[T, K]`` expert ids of the same T tokens (a
        :class:`~moekit.analysis.RoutingTrace`'s ``expert_ids``)."""
        first, second = [], [None]
        num_l = len(expert_ids)
        for li in range(num_l - 1):
            a = expert_ids[li][:, 0]
            nxt = expert_ids[li + 1]
            c1 = torch.zeros(num_experts[li], num_experts[li + 1], dtype=torch.float64)
            c2 = (
                torch.zeros(num_experts[li - 1], num_experts[li], num_experts[li + 1], dtype=torch.float64)
                if li >= 1
                else None
            )
            b = expert_ids[li - 1][:, 0] if li >= 1 else None
            for slot in range(nxt.shape[1]):
                ok = (a >= 0) & (nxt[:, slot] >= 0)
                ones = torch.ones(int(ok.sum()), dtype=torch.float64)
                c1.index_put_((a[ok], nxt[ok, slot]), ones, accumulate=True)
                if c2 is not None:
                    ok2 = ok & (b >= 0)
                    c2.index_put_(
                        (b[ok2], a[ok2], nxt[ok2, slot]),
                        torch.ones(int(ok2.sum()), dtype=torch.float64),
                        accumulate=True,
                    )
            first.append(c1)
            if li >= 1:
                second.append(c2)
        return cls(first, second[: max(num_l - 1, 0)])

    def probabilities(self, layer: int, a: int, b: int | None = None) -> Tensor:
        """``[E_{layer+1}]``: the next-layer distribution after expert ``a`` at ``layer`` and ``b``
        at ``layer - 1``; falls back to ``P(j | a)`` when the pair was never seen (or b is None)."""
        if b is not None and layer >= 1 and self.second[layer] is not None:
            row = self.second[layer][b, a]
            if float(row.sum()) > 0:
                return row / row.sum()
        row = self.first[layer][a]
        return row / row.sum() if float(row.sum()) > 0 else torch.full_like(row, 1.0 / row.numel())

    def predict(self, layer: int, a: int, b: int | None = None, top_n: int = 2) -> list[int]:
        """The ``top_n`` most likely experts of ``layer + 1`` (ties to the lower id)."""
        probs = self.probabilities(layer, a, b)
        order = sorted(range(probs.numel()), key=lambda j: (-float(probs[j]), j))
        return order[:top_n]


def edgemoe_predictor(
    transitions: SecondOrderTransitions, top_n: int = 2
) -> Callable[[int, Tensor, Tensor], list[int]]:
    """An offload ``Predictor`` (``(layer, x_TD, expert_ids_TK) -> experts of layer + 1``) that
    conditions on this layer's and the previous layer's first choices of each token: the union over
    tokens of :meth:`SecondOrderTransitions.predict`. It remembers the previous MoE layer's ids
    for the tokens of the forward in progress (layers run in order; a layer-0 call starts anew)."""
    memory: dict[int, Tensor] = {}

    def predict(index: int, x_TD: Tensor, expert_ids_TK: Tensor) -> list[int]:
        if index == 0:
            memory.clear()
        memory[index] = expert_ids_TK[:, 0].detach().clone()
        if index >= len(transitions.first):
            return []
        prev = memory.get(index - 1)
        if prev is not None and prev.shape[0] != expert_ids_TK.shape[0]:
            prev = None
        out: set[int] = set()
        for t, a in enumerate(expert_ids_TK[:, 0].tolist()):
            if a < 0:
                continue
            b = int(prev[t]) if prev is not None and int(prev[t]) >= 0 else None
            out.update(transitions.predict(index, int(a), b, top_n))
        return sorted(out)

    return predict


def layer_distance(layer: int, current: int, num_layers: int) -> int:
    """How many MoE layers run before ``layer`` runs again after ``current`` finished:
    0 for the next layer, ``num_layers - 1`` for ``current`` itself (it returns on the next token)."""
    return (layer - current - 1) % num_layers


def eviction_priority(freq: float, layer: int, current: int, num_layers: int) -> float:
    """EdgeMoE-style keep-priority of a cached expert (lowest is evicted first): its activation
    frequency weighted by how soon its layer runs, ``freq * (L - distance) / L``. The product form is
    [recon]: the notes only say the score combines frequency with how soon the layer runs next."""
    return freq * (num_layers - layer_distance(layer, current, num_layers)) / num_layers
