"""Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited").

Shapes: N tokens (rows, the same tokens on both sides), P and Q feature widths, T tokens fed to a
MoE layer, D its model width, E its number of experts.

``linear_cka(x, y) = ||yᵀx||_F² / (||xᵀx||_F · ||yᵀy||_F)`` on column-centred ``x``, ``y``. It is 1
for representations equal up to an orthogonal transform and an isotropic scale, and near 0 for
unrelated ones. Pure functions: no state, the layer is only read.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_cka(x_NP: Tensor, y_NQ: Tensor) -> float:
    """Linear CKA of two representations of the same N rows.

    Args:
        x_NP: ``[N, P]`` features; y_NQ: ``[N, Q]`` features of the same rows (P may differ from Q).
    Returns:
        CKA in [0, 1], computed in float64. 0.0 when either side is constant over the rows (its
        centred features are all zero, so there is nothing to compare).
    Raises:
        ValueError: inputs not 2-D, or with different row counts, or fewer than 2 rows.
    """
    if x_NP.dim() != 2 or y_NQ.dim() != 2:
        raise ValueError(
            f"linear_cka: x and y must be 2-D [N, features], got {tuple(x_NP.shape)} and {tuple(y_NQ.shape)}"
        )
    if x_NP.shape[0] != y_NQ.shape[0] or x_NP.shape[0] < 2:
        raise ValueError(
            f"linear_cka: x and y need the same number (>= 2) of rows, got {x_NP.shape[0]} and {y_NQ.shape[0]}"
        )
    # float64: the Frobenius norms square the features, and float32 loses the 1 of CKA(X, X).
    x = x_NP.detach().to(torch.float64)
    y = y_NQ.detach().to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    # The feature-space form (P x Q Gram products) costs O(N·P·Q), not the O(N²) of the kernel form.
    cross = torch.linalg.matrix_norm(y.t() @ x) ** 2
    norm = torch.linalg.matrix_norm(x.t() @ x) * torch.linalg.matrix_norm(y.t() @ y)
    if norm == 0:
        return 0.0
    return float(cross / norm)


@torch.no_grad()
def expert_cka_matrix(layer: torch.nn.Module, x_TD: Tensor) -> Tensor:
    """Pairwise linear CKA of a MoE layer's experts' outputs on the same tokens.

    Every expert runs on every token (no routing), through the layer's own
    ``layer.experts.expert_forward`` (so biases, LoRA and activations are the layer's).

    Args:
        layer: a ``moekit.layers.MoELayer`` (anything with ``.experts.num_experts`` and
            ``.experts.expert_forward(e, x_ND)``).
        x_TD: ``[T, D]`` tokens (or ``[..., D]``, flattened to rows), e.g. a layer's held-out inputs.
    Returns:
        ``[E, E]`` float64, symmetric, ones on the diagonal for non-constant experts.
    """
    experts = layer.experts
    x = x_TD.reshape(-1, x_TD.shape[-1])
    outs = [experts.expert_forward(e, x) for e in range(experts.num_experts)]
    num_e = len(outs)
    cka_EE = torch.ones(num_e, num_e, dtype=torch.float64)
    for i in range(num_e):
        for j in range(i + 1, num_e):
            cka_EE[i, j] = cka_EE[j, i] = linear_cka(outs[i], outs[j])
    return cka_EE


def mean_off_diagonal(m_EE: Tensor) -> float:
    """Mean of the off-diagonal entries of a square ``[E, E]`` matrix (E >= 2)."""
    num_e = m_EE.shape[0]
    if m_EE.dim() != 2 or m_EE.shape[1] != num_e or num_e < 2:
        raise ValueError(
            f"mean_off_diagonal: need a square [E, E] matrix with E >= 2, got {tuple(m_EE.shape)}"
        )
    return float((m_EE.sum() - m_EE.diagonal().sum()) / (num_e * (num_e - 1)))
