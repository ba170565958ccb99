"""Dispatch stages: permute -> expert compute -> combine, and the named compute backends.

Shape legend: T = tokens, D = model width, K = slots per token, E = FFN experts,
N = (token, expert) assignments that reach an FFN expert, H/F as in ``experts.py``.

A :class:`Dispatcher` moves rows between tokens and expert storage; the MoE layer holds one
(``layer.dispatcher``) next to its storage (``layer.experts``). :class:`LocalDispatcher` runs the
three stages on one device with a named backend. Expert parallelism
(``moekit.parallel.AllToAllDispatcher``) puts its all-to-alls between :func:`permute` and
:func:`expert_compute` (and again before :func:`combine`); offloading
(``moekit.offload.OffloadDispatcher``) prefetches the next layer's experts around them. To add a
dispatcher: subclass :class:`Dispatcher`, implement :meth:`Dispatcher.dispatch` returning the
output and the name of the compute path that ran, and assign it to ``layer.dispatcher``.

Backends (all match ``eager`` forward and backward; see ``tests/test_layers_oracle.py``):
    ``eager``: a loop over experts with boolean masks. The readable oracle.
    ``sorted``: tokens sorted by expert, then one matmul pair per non-empty expert on a
        contiguous slice, with a hand-written backward (``experts.SortedExpertsFunction``).
        Fastest on CPU for prefill and training (``benchmarks/bench_layer.py``).
    ``grouped_mm``: tokens sorted by expert, then ``torch._grouped_mm`` over the stacked weights.
        Falls back to ``sorted`` where the op is missing or rejects the dtype (float64 on CPU).
    ``auto``: ``grouped_mm`` on CUDA in bf16/fp16 and for decode-size batches on CPU,
        ``sorted`` otherwise (see :func:`resolve_backend`).

At decode sizes (at most ``SMALL_BATCH_ASSIGNMENTS`` slots) :func:`permute` groups the ids on the
host; the oracle tests cover both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.layers.experts import ExpertWeights, activate

# Up to this many (token, slot) pairs, permute groups ids on the host instead of sorting on device.
SMALL_BATCH_ASSIGNMENTS = 64


@dataclass
class DispatchPlan:
    """How assignments were permuted, so :func:`combine` can undo it.

    Attributes:
        token_idx_N: source token of each permuted row, ``[N]``.
        weights_N: combine weight of each permuted row, ``[N]``.
        counts: rows per expert, a Python list of length E (host-side split sizes).
    """

    token_idx_N: Tensor
    weights_N: Tensor
    counts: list[int]


def permute(
    x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, num_experts: int
) -> tuple[Tensor, DispatchPlan]:
    """Gathers token rows grouped by expert.

    Slots with id -1 or id >= ``num_experts`` (zero-computation experts) are skipped. This syncs
    once to read the per-expert counts, as every dropless dispatcher does for its split sizes.

    Returns:
        ``(x_ND, plan)``: rows sorted by expert (stable, so ties keep token order).
    """
    num_k = expert_ids_TK.shape[-1]
    ids_N = expert_ids_TK.reshape(-1)
    if ids_N.numel() <= SMALL_BATCH_ASSIGNMENTS:
        return _permute_on_host(x_TD, ids_N, weights_TK, num_experts, num_k)
    bucket_N = torch.where((ids_N < 0) | (ids_N >= num_experts), num_experts, ids_N)
    counts_B = torch.bincount(bucket_N, minlength=num_experts + 1)
    counts = counts_B[:num_experts].tolist()
    num_rows = sum(counts)
    order_N = bucket_N.argsort(stable=True)[:num_rows]
    token_idx_N = order_N // num_k
    plan = DispatchPlan(token_idx_N, weights_TK.reshape(-1)[order_N], counts)
    return x_TD.index_select(0, token_idx_N), plan


def _permute_on_host(
    x_TD: Tensor, ids_N: Tensor, weights_TK: Tensor, num_experts: int, num_k: int
) -> tuple[Tensor, DispatchPlan]:
    # At decode sizes a Python grouping of a few ids beats the sort/bincount kernels, whose fixed
    # per-op cost dominates when each expert sees one or two rows.
    groups: list[list[int]] = [[] for _ in range(num_experts)]
    for flat, expert in enumerate(ids_N.tolist()):
        if 0 <= expert < num_experts:
            groups[expert].append(flat)
    order = [flat for group in groups for flat in group]
    order_N = torch.tensor(order, dtype=torch.long, device=x_TD.device)
    token_idx_N = order_N // num_k
    plan = DispatchPlan(
        token_idx_N, weights_TK.reshape(-1).index_select(0, order_N), [len(g) for g in groups]
    )
    return x_TD.index_select(0, token_idx_N), plan


def combine(y_ND: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Weights expert outputs and sums them back per token: ``[N, D] -> [T, D]``."""
    out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[-1])
    weighted_ND = y_ND * plan.weights_N.to(y_ND.dtype).unsqueeze(-1)
    return out_TD.index_add_(0, plan.token_idx_N, weighted_ND)


def _sorted_compute(x_ND: Tensor, counts: list[int], weights: ExpertWeights) -> Tensor:
    return weights.forward_sorted(x_ND, counts)


def _grouped_mm_available(x_ND: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x_ND.device.type == "cpu":
        return x_ND.dtype in (torch.float32, torch.bfloat16)
    return x_ND.dtype in (torch.bfloat16, torch.float32)


def grouped_mm_runs(x_ND: Tensor, weights: ExpertWeights) -> bool:
    """Whether the ``grouped_mm`` backend really runs for these rows and this storage (it falls
    back to ``sorted`` without stacked weights, without the op, or for a dtype it rejects)."""
    return x_ND.shape[0] > 0 and _grouped_mm_available(x_ND) and weights.stacked() is not None


def _grouped_compute(x_ND: Tensor, counts: list[int], weights: ExpertWeights) -> Tensor:
    w_in_EHD, w_out_EDF = weights.stacked()
    offs_E = torch.tensor(counts, device=x_ND.device).cumsum(0).to(torch.int32)
    h_NH = torch._grouped_mm(x_ND, w_in_EHD.transpose(-2, -1), offs=offs_E)
    return torch._grouped_mm(activate(h_NH, weights.activation), w_out_EDF.transpose(-2, -1), offs=offs_E)


def resolve_backend(backend: str, x: Tensor, num_assignments: int) -> str:
    """Maps ``"auto"`` to a concrete backend for this input's device, dtype and size.

    Measured on CPU (benchmarks/bench_layer.py): ``grouped_mm`` is a few percent faster at decode
    sizes, the hand-written ``sorted`` loop is faster for prefill and for training.
    """
    if backend != "auto":
        return backend
    if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
        return "grouped_mm"
    if num_assignments <= SMALL_BATCH_ASSIGNMENTS and _grouped_mm_available(x):
        return "grouped_mm"
    return "sorted"


def expert_compute(x_ND: Tensor, counts: list[int], weights: ExpertWeights, backend: str) -> Tensor:
    """Runs each expert on its contiguous slice of permuted rows: ``[N, D] -> [N, D]``."""
    return expert_compute_ran(x_ND, counts, weights, backend)[0]


def expert_compute_ran(
    x_ND: Tensor, counts: list[int], weights: ExpertWeights, backend: str
) -> tuple[Tensor, str]:
    """As :func:`expert_compute`, plus the backend that actually ran (``"grouped_mm"``, or the
    storage's ``sorted_name``: ``"sorted"``, ``"lora_sorted"``)."""
    if backend == "grouped_mm" and grouped_mm_runs(x_ND, weights):
        return _grouped_compute(x_ND, counts, weights), "grouped_mm"
    return _sorted_compute(x_ND, counts, weights), weights.sorted_name


def eager_experts(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, weights: ExpertWeights) -> Tensor:
    """The oracle: for each expert, pick its tokens with a mask, run it, add weighted outputs."""
    out_TD = torch.zeros_like(x_TD)
    for expert in range(weights.num_experts):
        token_idx, slot_idx = torch.nonzero(expert_ids_TK == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        y_ND = weights.expert_forward(expert, x_TD[token_idx])
        out_TD.index_add_(0, token_idx, y_ND * weights_TK[token_idx, slot_idx].to(y_ND.dtype).unsqueeze(-1))
    return out_TD


def routed_experts(
    x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, weights: ExpertWeights, backend: str
) -> Tensor:
    """All three stages for a single device: ``[T, D] -> [T, D]``."""
    return LocalDispatcher().dispatch(weights, x_TD, expert_ids_TK, weights_TK, backend)[0]


class Dispatcher:
    """How a layer's routed rows reach its expert storage and come back.

    A dispatcher holds no parameters (the storage does) and no per-call state; the layer keeps
    one in its declared ``dispatcher`` field.

    Attributes:
        supports_fast_decode: the decode fast path may bypass this dispatcher and read the
            storage's stacked weights directly (true only for local, resident dispatch).
    """

    supports_fast_decode: bool = False

    def dispatch(
        self, experts: ExpertWeights, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str
    ) -> tuple[Tensor, str]:
        """``[T, D] -> ([T, D] weighted sum of expert outputs, name of the compute path that ran)``.

        Args:
            experts: the layer's storage.
            x_TD: token states.
            expert_ids_TK: ``[T, K]`` FFN expert ids; -1 and ids >= E (zero experts) are skipped.
            weights_TK: ``[T, K]`` combine weights.
            backend: the config's backend choice (a dispatcher may ignore it).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LocalDispatcher(Dispatcher):
    """Single-device dispatch: permute -> expert compute -> combine, with a named backend
    (``eager``/``sorted``/``grouped_mm``/``auto``, see the module docstring)."""

    supports_fast_decode = True

    def dispatch(
        self, experts: ExpertWeights, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, backend: str
    ) -> tuple[Tensor, str]:
        """See :meth:`Dispatcher.dispatch`; the name is the backend that really ran."""
        backend = resolve_backend(backend, x_TD, expert_ids_TK.numel())
        if backend == "eager":
            return eager_experts(x_TD, expert_ids_TK, weights_TK, experts), "eager"
        x_ND, plan = permute(x_TD, expert_ids_TK, weights_TK, experts.num_experts)
        y_ND, ran = expert_compute_ran(x_ND, plan.counts, experts, backend)
        return combine(y_ND, plan, x_TD.shape[0]), ran
