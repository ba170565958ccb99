"""A slow, obviously-correct MoE reference: one token at a time, plain Python loops.

It shares only the parameters with ``MoELayer``; routing and expert math are written again from
the definitions, so a bug in the fast path cannot hide in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moekit.layers import MoELayer


def _ffn(x_D, w_in_HD, w_out_DF, activation):
    h = w_in_HD @ x_D
    if activation == "swiglu":
        f = h.shape[0] // 2
        a = F.silu(h[:f]) * h[f:]
    else:
        a = F.gelu(h)
    return w_out_DF @ a


def reference_route(layer: MoELayer, x_TD, mask_T=None, prev_TE=None, k=None):
    """Returns a list (per token) of [(expert, weight), ...] and the logits [T, E]."""
    cfg = layer.config
    r = layer.router
    k = cfg.top_k if k is None else k
    num_t = x_TD.shape[0]
    num_e = cfg.num_total_experts
    logits = x_TD @ r.weight.T
    if r.bias is not None:
        logits = logits + r.bias
    if r.residual_weight is not None and prev_TE is not None:
        logits = logits + prev_TE @ r.residual_weight.T
    bias = r.expert_bias if r.expert_bias is not None else torch.zeros(num_e, dtype=x_TD.dtype)
    valid = [True] * num_t if mask_T is None else [bool(v) for v in mask_T]
    choices = [[] for _ in range(num_t)]
    if cfg.router_type == "expert_choice":
        probs = torch.softmax(logits, -1)
        num_valid = num_t
        cf = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
        cap = max(1, min(num_valid, math.ceil(cf * num_t * k / num_e)))
        for e in range(num_e):
            scored = sorted(
                ((probs[t, e].item() + bias[e].item(), t) for t in range(num_t) if valid[t]), reverse=True
            )
            for _, t in scored[:cap]:
                choices[t].append((e, probs[t, e] * cfg.routed_scaling_factor))
        return choices, logits
    for t in range(num_t):
        if not valid[t]:
            continue
        lt = logits[t]
        if cfg.router_type == "top_p":
            p = torch.softmax(lt, -1)
            order = sorted(range(num_e), key=lambda e: -(p[e].item() + bias[e].item()))
            kmax = cfg.max_k or num_e
            mass = 0.0
            for rank, e in enumerate(order):
                if rank >= kmax:
                    break
                if mass <= cfg.top_p or rank < cfg.min_k:
                    choices[t].append((e, p[e]))
                mass += p[e].item()
            if cfg.top_p_renormalize:
                s = sum(w for _, w in choices[t])
                choices[t] = [(e, w / s) for e, w in choices[t]]
        elif cfg.router_type == "sparsemixer":
            # Two picks; each keeps the logits within a relative margin of the pick's own logit.
            vals = [lt[e].item() for e in range(num_e)]
            taken = []
            for _ in range(2):
                pick = max((e for e in range(num_e) if e not in taken), key=lambda e: vals[e])
                m = vals[pick]
                kept = [
                    e
                    for e in range(num_e)
                    if e not in taken and (m - vals[e]) / max(abs(vals[e]), m) <= 2 * cfg.sparsemixer_eps
                ]
                w = torch.softmax(torch.stack([lt[e] for e in kept]), -1)[kept.index(pick)]
                choices[t].append((pick, w))
                taken.append(pick)
        elif cfg.router_type == "random_fixed" or cfg.softmax_order == "after_topk":
            order = sorted(range(num_e), key=lambda e: -(lt[e].item() + bias[e].item()))[:k]
            w = torch.softmax(torch.stack([lt[e] for e in order]), -1)
            choices[t] = list(zip(order, w))
        else:
            s = torch.softmax(lt, -1) if cfg.score_func == "softmax" else torch.sigmoid(lt)
            sel = s + bias
            allowed = set(range(num_e))
            if cfg.num_expert_groups > 1:
                gsize = num_e // cfg.num_expert_groups
                gscores = []
                for g in range(cfg.num_expert_groups):
                    vals = sorted((sel[g * gsize + j].item() for j in range(gsize)), reverse=True)
                    gscores.append((sum(vals[:2]) if cfg.group_score == "top2_sum" else vals[0], g))
                keep_groups = [g for _, g in sorted(gscores, reverse=True)[: cfg.num_limited_groups]]
                allowed = {g * gsize + j for g in keep_groups for j in range(gsize)}
            order = sorted(allowed, key=lambda e: -sel[e].item())[:k]
            ws = [s[e] for e in order]
            if cfg.norm_topk_prob:
                tot = sum(ws)
                ws = [w / tot for w in ws]
            choices[t] = [(e, w * cfg.routed_scaling_factor) for e, w in zip(order, ws)]
    return choices, logits


def reference_forward(layer: MoELayer, x, token_mask=None, prev_logits=None, k=None, choices=None):
    """Output ``[..., D]`` computed token by token. ``choices`` overrides routing (for capacity)."""
    cfg = layer.config
    x_TD = x.reshape(-1, cfg.dim)
    mask_T = None if token_mask is None else token_mask.reshape(-1)
    prev_TE = None if prev_logits is None else prev_logits.reshape(x_TD.shape[0], -1)
    if choices is None:
        choices, _ = reference_route(layer, x_TD, mask_T, prev_TE, k)
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    rows = []
    for t in range(x_TD.shape[0]):
        xt = x_TD[t]
        y = torch.zeros_like(xt)
        for e, w in choices[t]:
            if e < cfg.num_experts:
                y = y + w * _ffn(xt, w_in[e], w_out[e], cfg.activation)
            elif e in layer.zero_ids:
                pass
            elif e in layer.copy_ids:
                y = y + w * xt
            else:
                c = e - layer.constant_ids.start
                a = torch.softmax(layer.const_gate[c] @ xt, -1)
                y = y + w * (a[0] * xt + a[1] * layer.const_vec[c])
        if cfg.residual_moe:
            coef = torch.softmax(layer.residual_coef.weight @ xt + layer.residual_coef.bias, -1)
            dense = _ffn(xt, layer.residual_mlp.w_in.weight, layer.residual_mlp.w_out.weight, cfg.activation)
            y = coef[0] * y + coef[1] * dense
        if cfg.shared_ffn_dim:
            sh = _ffn(xt, layer.shared.w_in.weight, layer.shared.w_out.weight, cfg.activation)
            if layer.shared_gate is not None:
                sh = torch.sigmoid(layer.shared_gate.weight @ xt) * sh
            y = y + sh
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)
