"""The LM head and its cross-entropy in one pass over row chunks, never holding the logits.

Shape legend: N = scored positions (batch x sequence, flattened), D = model width, V = vocabulary,
c = rows of one chunk.

Why: a training step of an LM computes ``logits [N, V]``, a log-softmax of the same size, a
zero-filled gradient and the log-softmax's gradient, each written once and read once or twice.
At N = 4096, V = 4096 these are four 67 MB tensors; on the moe-small benchmark they cost about
a quarter of the step (``torch.profiler``: log-softmax forward and backward, fill, copies),
mostly memory traffic and first-touch page faults, not arithmetic. Here the head's product
runs on ``c`` rows at a time (``c * V`` about 2^21 floats): each chunk's logits give their
loss terms and, when a gradient is wanted, their gradient ``softmax - onehot`` at once, which is
multiplied back into ``grad_h [N, D]`` and ``grad_W [V, D]`` before the next chunk. The backward
then only scales those by the upstream gradient (the loss is linear in it). Liger-Kernel's
fused linear cross-entropy does the same on GPUs.

The math is the unfused path's: ``loss = sum_n valid_n (logsumexp(z_n) - z_n[t_n]) / count``
with ``z = (h W^T + b) / scaling``, in at least float32 (float64 for a float64 model), targets of
``ignore_index`` skipped; tests/test_linear_ce.py checks loss and all three gradients against
``F.linear`` + ``F.cross_entropy`` in float64.

Floor 0: imports only :mod:`moekit.kernels.gemm`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.kernels.gemm import mm  # oneDNN where it pays, else torch.mm

#: floats of one chunk's logits (8 MB in float32): big enough for full-rate products, small
#: enough to stay in malloc's reused heap instead of fresh page-faulted mappings.
CHUNK_ELEMENTS = 1 << 21
MIN_CHUNK_ROWS = 16


def chunk_rows(num_n: int, num_v: int) -> int:
    """Rows per chunk for ``N`` positions over a ``V``-word vocabulary."""
    return max(1, min(num_n, max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(num_v, 1))))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, b_V, targets_N, scaling, ignore_index, rows, want_grad):
        num_n = h_ND.shape[0]
        loss_dtype = torch.promote_types(h_ND.dtype, torch.float32)
        valid_N = targets_N != ignore_index
        count = valid_N.sum().clamp_min(1).to(loss_dtype)
        need_h, need_w, need_b = (want_grad and need for need in ctx.needs_input_grad[:3])
        need_any = need_h or need_w or need_b
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = torch.zeros(w_VD.shape, dtype=loss_dtype, device=w_VD.device) if need_w else None
        grad_b = torch.zeros(w_VD.shape[0], dtype=loss_dtype, device=w_VD.device) if need_b else None
        w_DV = w_VD.t()
        total = torch.zeros((), dtype=loss_dtype, device=h_ND.device)
        for start in range(0, num_n, rows):
            h_cD = h_ND[start : start + rows]
            t_c = targets_N[start : start + rows]
            valid_c = valid_N[start : start + rows]
            z_cV = mm(h_cD, w_DV)
            if b_V is not None:
                z_cV += b_V
            z_cV = z_cV.to(loss_dtype)
            if scaling != 1.0:
                z_cV /= scaling
            lse_c = torch.logsumexp(z_cV, dim=-1)
            picked_c = z_cV.gather(1, t_c.clamp_min(0)[:, None])[:, 0]
            total += torch.where(valid_c, lse_c - picked_c, 0).sum()
            if not need_any:
                continue
            # d(loss) / dz = (softmax(z) - onehot(t)) * valid / count, then through "/ scaling".
            g_cV = z_cV.sub_(lse_c[:, None]).exp_()
            g_cV[torch.arange(g_cV.shape[0], device=g_cV.device), t_c.clamp_min(0)] -= 1
            g_cV *= (valid_c.to(loss_dtype) / (count * scaling))[:, None]
            if need_b:
                grad_b += g_cV.sum(0)
            g_cV = g_cV.to(h_ND.dtype)
            if need_h:
                grad_h[start : start + rows] = mm(g_cV, w_VD)
            if need_w:
                grad_w += mm(g_cV.t(), h_cD)
        ctx.save_for_backward(
            *(g for g in (grad_h, grad_w, grad_b) if g is not None),
        )
        ctx.present = (need_h, need_w, need_b)
        ctx.dtypes = (h_ND.dtype, w_VD.dtype, None if b_V is None else b_V.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        out = []
        for present, dtype in zip(ctx.present, ctx.dtypes, strict=True):
            out.append((next(saved) * grad_loss).to(dtype) if present else None)
        return (*out, None, None, None, None, None)


def linear_cross_entropy(
    h_ND: Tensor,
    weight_VD: Tensor,
    bias_V: Tensor | None,
    targets_N: Tensor,
    scaling: float = 1.0,
    ignore_index: int = -100,
    rows: int | None = None,
) -> Tensor:
    """Mean cross-entropy of ``(h @ weight.T + bias) / scaling`` against ``targets`` (scalar, in
    at least float32), without materializing the ``[N, V]`` logits.

    Args:
        h_ND: final hidden states ``[N, D]`` (after the final norm).
        weight_VD: the LM head ``[V, D]`` (may be tied to the embedding: autograd adds both).
        bias_V: optional ``[V]``.
        targets_N: int64 ``[N]``; ``ignore_index`` entries are skipped. A batch with none gives 0.
        scaling: logits are divided by it (``ModelConfig.logits_scaling``).
        rows: rows per chunk (default :func:`chunk_rows`).
    """
    if h_ND.dim() != 2 or weight_VD.dim() != 2 or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: h must be [N, D] and weight [V, D], got {tuple(h_ND.shape)} and "
            f"{tuple(weight_VD.shape)}"
        )
    if targets_N.shape != (h_ND.shape[0],):
        raise ValueError(
            f"linear_cross_entropy: targets must be [{h_ND.shape[0]}], got {tuple(targets_N.shape)}"
        )
    num_rows = rows or chunk_rows(h_ND.shape[0], weight_VD.shape[0])
    # Without autograd (evaluation) only the loss is computed, not the gradients.
    want_grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(
        h_ND.contiguous(),
        weight_VD,
        bias_V,
        targets_N.to(h_ND.device),
        float(scaling),
        ignore_index,
        num_rows,
        want_grad,
    )
