"""moekit.kernels.linear_ce: the chunked LM-head cross-entropy against F.linear + F.cross_entropy
(float64: loss and the gradients of hidden states, weight and bias), and through the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.kernels import linear_ce
from moekit.models import MoEForCausalLM, get_preset
from moekit.models.objectives import CausalLMObjective, LossWeights


def _reference(h, w, b, t, scaling):
    z = F.linear(h, w, b) / scaling
    return F.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), t, ignore_index=-100)


def _grads(fn, *leaves):
    for x in leaves:
        x.grad = None
    loss = fn()
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss.detach(), [x.grad.clone() for x in leaves]


@pytest.mark.parametrize("rows", [1, 7, 64, None])  # ragged chunks, one chunk
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_matches_unfused_loss_and_gradients_float64(rows, bias, scaling):
    torch.manual_seed(0)
    num_n, num_d, num_v = 50, 24, 97
    h = torch.randn(num_n, num_d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(num_v, num_d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(num_v, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, num_v, (num_n,))
    t[::5] = -100  # ignored positions
    leaves = [h, w] + ([b] if bias else [])
    ref_loss, ref_grads = _grads(lambda: _reference(h, w, b, t, scaling), *leaves)
    loss, grads = _grads(lambda: linear_ce.linear_cross_entropy(h, w, b, t, scaling, rows=rows), *leaves)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_float32_on_the_onednn_sizes_and_no_grad():
    torch.manual_seed(0)
    h = torch.randn(600, 256, requires_grad=True)
    w = (torch.randn(4096, 256) * 0.05).requires_grad_()
    t = torch.randint(0, 4096, (600,))
    ref_loss, (rh, rw) = _grads(lambda: _reference(h, w, None, t, 1.0), h, w)
    loss, (gh, gw) = _grads(lambda: linear_ce.linear_cross_entropy(h, w, None, t), h, w)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(
            linear_ce.linear_cross_entropy(h, w, None, t), ref_loss, rtol=1e-5, atol=1e-5
        )


def test_all_ignored_gives_zero_and_bad_shapes_name_the_problem():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_ce.linear_cross_entropy(h, w, None, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0
    with pytest.raises(ValueError, match=r"weight \[V, D\]"):
        linear_ce.linear_cross_entropy(h, torch.randn(11, 9), None, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        linear_ce.linear_cross_entropy(h, w, None, torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_without_logits_matches_the_logits_path(tied):
    torch.manual_seed(0)
    cfg = get_preset("moe-tiny").replace(tie_word_embeddings=tied, logits_scaling=1.5)
    model = MoEForCausalLM(cfg).double().train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run()
    fused, fused_grads = run(return_logits=False)
    assert fused.logits is None and full.logits is not None
    torch.testing.assert_close(fused.lm_loss, full.lm_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-12, atol=1e-12)
    assert full_grads.keys() == fused_grads.keys()
    for name, g in full_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-9, atol=1e-12, msg=name)
    # shift_labels: targets already aligned with the positions (the training objective's form).
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    again = model(ids, shift_labels=shifted, return_logits=False)
    torch.testing.assert_close(again.lm_loss, full.lm_loss, rtol=1e-12, atol=1e-12)


def test_objective_trains_through_the_fused_loss(monkeypatch):
    torch.manual_seed(0)
    model = MoEForCausalLM(get_preset("moe-tiny")).train()
    batch = torch.randint(0, 512, (2, 17))
    objective = CausalLMObjective(LossWeights())
    calls = []
    real = linear_ce.linear_cross_entropy
    monkeypatch.setattr(linear_ce, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = objective.loss(objective.forward(model, batch), batch)
    assert calls == [1]
    logits = model(batch[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(out.metrics["lm_loss"], ref, rtol=1e-5, atol=1e-6)
    eval_loss, count = objective.eval_loss(objective.forward(model, batch), batch)
    torch.testing.assert_close(eval_loss, ref, rtol=1e-5, atol=1e-6)
    assert count == 32
