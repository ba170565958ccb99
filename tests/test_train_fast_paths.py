"""The training step's fast paths against the plain autograd they replace, in float64: the dense
FFN's SwiGLU backward (``SwiGLUFunction``) and the label-shifting causal-LM loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.layers import FeedForward, FFNConfig
from moekit.layers.experts import SwiGLUFunction
from moekit.models.objectives import causal_lm_loss, token_cross_entropy


def _plain_ffn(ffn: FeedForward, x):
    # The obviously correct path: autograd through chunk, silu and mul.
    gate, up = ffn.w_in(x).chunk(2, dim=-1)
    return ffn.w_out(F.silu(gate) * up)


def test_swiglu_function_gradcheck_float64():
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (h,))


def test_dense_ffn_swiglu_matches_autograd_float64():
    torch.manual_seed(0)
    ffn = FeedForward(FFNConfig(dim=12, ffn_dim=20, activation="swiglu")).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 12, dtype=torch.float64)
    out = ffn(x)
    # The fast path really ran: SwiGLUFunction's node sits under the output projection.
    names = []
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert any("SwiGLUFunction" in n for n in names)
    grads = torch.autograd.grad(out, [x, *ffn.parameters()], g)
    ref = _plain_ffn(ffn, x)
    ref_grads = torch.autograd.grad(ref, [x, *ffn.parameters()], g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # inference takes the plain path, same values
        torch.testing.assert_close(ffn(x), ref, rtol=1e-12, atol=1e-12)


def test_causal_lm_loss_shifts_labels_not_logits_float64():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 2] = -100
    loss = causal_lm_loss(logits, labels)
    ref = token_cross_entropy(logits[:, :-1], labels[:, 1:])  # the old, sliced form
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert torch.all(grad[:, -1] == 0)
    one = causal_lm_loss(logits[:, :1], labels[:, :1])  # a single position has no target
    assert float(one.detach()) == 0.0
