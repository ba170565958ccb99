"""Online dynamic pruning (MC-MoE ODP): tokens whose later experts carry little weight skip them.

Shape legend: B = batch, S = tokens per sequence, T = tokens (B * S), K = slots per token,
E = experts scored by the router, H = query heads, Dh = head width, D = model width.

:func:`dynamic_prune` wraps MoE layers' routers in a :class:`PrunedRouter` that post-processes
the :class:`~moekit.layers.RouterOutput`: slot j is dropped (id -1, weight 0) when
``w_j < threshold_l * max_k w_k``; the top slot always stays. MC-MoE's further rules, as its code
does them [code, per the notes]:

* per-layer thresholds (``PruneConfig.thresholds``; MC-MoE's are hard-coded for Mixtral, 0.40-0.62);
* only the ``num_layers`` layers with the smallest pruning loss are pruned
  (:func:`rank_layers_by_pruning_loss`; MC-MoE hard-codes its order for 10 of 32 layers; how it
  measured "pruning loss" is not confirmed, here it is the MoE block's output change on
  calibration data, ``||Y - Y_pruned||_F``);
* in prefill, token importance = (attention probability the token receives, averaged over heads
  and over the causal queries that can see it) x ``||h||_1``; the top ``protect_top`` of each
  sequence keep every expert, the bottom ``drop_bottom`` lose every expert. ``h`` here is the MoE
  layer's input (the router's input); which hidden state MC-MoE multiplies by is [recon].

The attention probabilities are recomputed from the layer's own q/k projections in a forward hook
(:func:`attention_received`), because SDPA does not return them; a test checks that these
probabilities reproduce the attention output. ``choice_ids_TK`` keeps the router's original
choice, so ``RoutingInfo`` tells how many expert calls were saved (:func:`expert_calls_saved`).
Parameter names are unchanged, so a pruned model loads and saves the same checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from moekit.blocks.attention import Attention
from moekit.blocks.rope import apply_rotary
from moekit.compress.calibrate import collect_layer_inputs, moe_layers
from moekit.compress.config import PruneConfig
from moekit.layers import MoELayer, Router, RouterOutput


class PrunedRouter(Router):
    """A :class:`Router` whose output drops low-weight non-top slots.

    Shares the wrapped router's parameters and buffers (same state-dict keys).

    Args:
        router: the router to wrap.
        threshold: relative weight below which a non-top slot is dropped (0: never).
        renormalize: rescale surviving weights so each token's weight sum is unchanged.
        protect_top, drop_bottom: shares of each prefill sequence's tokens, by importance, that
            keep all experts / lose all experts (need :attr:`attention_received` set for the call).

    Attributes:
        attention_received: ``[B, S]`` set by the attention hook of the same decoder layer just
            before this router runs on a prefill, consumed (reset to None) by :meth:`forward`.
    """

    def __init__(
        self,
        router: Router,
        threshold: float,
        renormalize: bool = True,
        protect_top: float = 0.0,
        drop_bottom: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)
        for key, value in router.__dict__.items():
            self.__dict__[key] = dict(value) if key.startswith("_") and isinstance(value, dict) else value
        self.threshold, self.renormalize = threshold, renormalize
        self.protect_top, self.drop_bottom = protect_top, drop_bottom
        self.attention_received: Tensor | None = None

    def forward(self, x_TD: Tensor, token_mask_T=None, prev_logits_TE=None, k=None) -> RouterOutput:
        """As :meth:`Router.forward`, then prunes (see the module docstring)."""
        out = super().forward(x_TD, token_mask_T, prev_logits_TE, k)
        received_BS, self.attention_received = self.attention_received, None
        if out.expert_ids_TK.shape[-1] < 2 and not self.drop_bottom:
            return out
        w_TK, ids_TK = out.weights_TK, out.expert_ids_TK
        top_T1 = w_TK.max(dim=-1, keepdim=True).values
        is_top_TK = torch.zeros_like(w_TK, dtype=torch.bool).scatter_(-1, w_TK.argmax(-1, keepdim=True), True)
        valid_TK = ids_TK >= 0
        keep_TK = valid_TK & ((w_TK >= self.threshold * top_T1) | is_top_TK)
        if received_BS is not None and received_BS.numel() == x_TD.shape[0]:
            protect_T, drop_T = importance_masks(
                received_BS,
                x_TD.detach().abs().sum(-1).view_as(received_BS),
                self.protect_top,
                self.drop_bottom,
            )
            keep_TK = torch.where(protect_T.view(-1, 1), valid_TK, keep_TK)
            keep_TK = keep_TK & ~drop_T.view(-1, 1)
        if bool(keep_TK.eq(valid_TK).all()):
            return out
        new_w = torch.where(keep_TK, w_TK, torch.zeros_like(w_TK))
        if self.renormalize:
            new_w = new_w * (w_TK.sum(-1, keepdim=True) / new_w.sum(-1, keepdim=True).clamp_min(1e-12))
        new_ids = torch.where(keep_TK, ids_TK, torch.full_like(ids_TK, -1))
        return replace(out, expert_ids_TK=new_ids, weights_TK=new_w)


def importance_masks(
    received_BS: Tensor, h_norm1_BS: Tensor, protect_top: float, drop_bottom: float
) -> tuple[Tensor, Tensor]:
    """MC-MoE's token importance ``received * ||h||_1`` per sequence -> ``(protect_BS, drop_BS)``
    bool masks: the ``floor(protect_top * S)`` most and ``floor(drop_bottom * S)`` least important
    tokens of each sequence (protection wins where both apply). Whether MC-MoE floors or rounds
    the counts is not confirmed."""
    imp_BS = received_BS.to(torch.float64) * h_norm1_BS.to(torch.float64)
    num_s = imp_BS.shape[-1]
    order_BS = imp_BS.argsort(dim=-1, descending=True)
    rank_BS = torch.empty_like(order_BS).scatter_(
        -1, order_BS, torch.arange(num_s, device=imp_BS.device).expand_as(order_BS)
    )
    num_top, num_bottom = int(math.floor(protect_top * num_s)), int(math.floor(drop_bottom * num_s))
    protect_BS = rank_BS < num_top
    drop_BS = (rank_BS >= num_s - num_bottom) & ~protect_BS
    return protect_BS, drop_BS


@torch.no_grad()
def attention_probs(attn: Attention, x_BSD: Tensor, cos_B1Sd: Tensor, sin_B1Sd: Tensor, mask_B1SK) -> Tensor:
    """``[B, H, S, S]`` float64 attention probabilities of a prefill without cached keys, recomputed
    with ``attn``'s own projections, q/k norms, RoPE and GQA sharing (SDPA does not return them).
    ``mask_B1SK``: the SDPA bool mask, or None for plain causal."""
    b, s, _ = x_BSD.shape
    dh = attn.head_dim
    q, k = attn.q_proj(x_BSD), attn.k_proj(x_BSD)
    if attn.qk_norm == "full":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q_BHSd = q.view(b, s, attn.num_heads, dh).transpose(1, 2)
    k_BGSd = k.view(b, s, attn.num_kv_heads, dh).transpose(1, 2)
    if attn.qk_norm == "per_head":
        q_BHSd, k_BGSd = attn.q_norm(q_BHSd), attn.k_norm(k_BGSd)
    q_BHSd = apply_rotary(q_BHSd, cos_B1Sd, sin_B1Sd).to(torch.float64)
    k_BHSd = apply_rotary(k_BGSd, cos_B1Sd, sin_B1Sd).to(torch.float64)
    k_BHSd = k_BHSd.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)
    scores_BHSS = (q_BHSd @ k_BHSd.transpose(-1, -2)) / math.sqrt(dh)
    return torch.softmax(scores_BHSS.masked_fill(~_allowed(mask_B1SK, b, s, x_BSD.device), float("-inf")), -1)


def _allowed(mask_B1SK, b: int, s: int, device) -> Tensor:
    if mask_B1SK is None:
        return torch.ones(s, s, dtype=torch.bool, device=device).tril().expand(b, 1, s, s)
    return mask_B1SK.to(torch.bool)


def received_attention(probs_BHSS: Tensor, mask_B1SK=None) -> Tensor:
    """``[B, S]``: for each key token j, ``mean_heads sum_i A[i, j] / #{i : i may attend to j}``
    (MC-MoE's column mean over the causal queries)."""
    b, _, s, _ = probs_BHSS.shape
    allowed_BSS = _allowed(mask_B1SK, b, s, probs_BHSS.device)[:, 0]
    return probs_BHSS.mean(1).sum(1) / allowed_BSS.sum(1).clamp_min(1)


def attention_received(
    attn: Attention, x_BSD: Tensor, cos_B1Sd: Tensor, sin_B1Sd: Tensor, mask_B1SK
) -> Tensor:
    """``[B, S]``: :func:`received_attention` of :func:`attention_probs`."""
    return received_attention(attention_probs(attn, x_BSD, cos_B1Sd, sin_B1Sd, mask_B1SK), mask_B1SK)


def _install_attention_hook(model: nn.Module, layer: MoELayer, router: PrunedRouter) -> None:
    """Registers (once) a forward hook on the attention of ``layer``'s decoder layer that sets
    ``router.attention_received`` on prefill calls (no cached keys)."""
    owner = next((m for m in model.modules() if getattr(m, "mlp", None) is layer), None)
    attn = getattr(owner, "self_attn", None)
    if not isinstance(attn, Attention):
        raise ValueError(
            "PruneConfig.protect_top/drop_bottom need standard attention probabilities (the layer's "
            f"attention is {type(attn).__name__}); set protect_top=0 and drop_bottom=0"
        )
    # attention_probs recomputes plain softmax(q.k) probabilities; these change them.
    unsupported = [
        name
        for name, hit in (
            ("attention sinks", attn.sinks is not None),
            ("the L2 q/k norm", attn.qk_norm == "l2"),
            ("attention temperature tuning", attn.temperature_scale is not None),
        )
        if hit
    ]
    if unsupported:
        raise ValueError(
            f"PruneConfig.protect_top/drop_bottom need standard attention probabilities (the layer's "
            f"attention has {', '.join(unsupported)}); set protect_top=0 and drop_bottom=0"
        )
    if getattr(router, "_attn_hook", None) is not None:
        return

    def hook(module, args, output) -> None:
        x_BSD, cos, sin, mask = args[0], args[1], args[2], args[3] if len(args) > 3 else None
        cache = args[4] if len(args) > 4 else None
        num_s = x_BSD.shape[1]
        prefill = num_s > 1 and (mask is None or mask.shape[-1] == num_s)
        if cache is not None:  # the hook runs after the update: a prefill cached exactly S tokens
            prefill = prefill and cache.lengths[module.layer_idx] == num_s
        wants = router.protect_top > 0 or router.drop_bottom > 0
        router.attention_received = (
            attention_received(module, x_BSD, cos, sin, mask) if prefill and wants else None
        )

    router._attn_hook = attn.register_forward_hook(hook)


@torch.no_grad()
def rank_layers_by_pruning_loss(
    model: nn.Module, batches: list[Tensor], thresholds: list[float]
) -> list[tuple[int, float]]:
    """MoE layers sorted by pruning loss, smallest first: ``[(layer index, loss)]``.

    The loss of layer l is ``||Y - Y_pruned||_F`` of its MoE block on its calibration inputs
    (``batches``, ``[B, S]`` token ids), pruned alone with ``thresholds[l]`` (no token protection).
    """
    layers = moe_layers(model)
    inputs = collect_layer_inputs(model, batches)
    losses = []
    for index, layer in enumerate(layers):
        x_TD = inputs[index].x_TD.to(next(layer.parameters()).dtype)
        plain = PrunedRouter(layer.router, 0.0)  # the same parameters, never pruning
        pruned = PrunedRouter(layer.router, thresholds[index], True)
        with layer.override_routing(lambda router, x, m, p, k, r=plain: r(x, m, p, k)):
            ref = layer(x_TD).hidden
        with layer.override_routing(lambda router, x, m, p, k, r=pruned: r(x, m, p, k)):
            out = layer(x_TD).hidden
        losses.append((index, float((out.double() - ref.double()).norm())))
    return sorted(losses, key=lambda t: (t[1], t[0]))


def dynamic_prune(
    model: nn.Module, config: PruneConfig, calibration: list[Tensor] | None = None
) -> nn.Module:
    """Installs :class:`PrunedRouter` in the chosen MoE layers (in place) and returns the model.

    Candidates are ``config.layers`` (None: all); with ``config.num_layers`` only that many of
    them, those with the smallest :func:`rank_layers_by_pruning_loss` on ``calibration``
    (``[B, S]`` token batches), are pruned. A model already pruned is re-pruned from its original
    routers, so calling this again replaces the old settings (layers no longer chosen become no-ops).
    """
    layers = moe_layers(model)
    num_l = len(layers)
    if config.thresholds is not None and len(config.thresholds) != num_l:
        raise ValueError(
            f"PruneConfig.thresholds has {len(config.thresholds)} entries; the model has {num_l} MoE layers"
        )
    thresholds = config.thresholds if config.thresholds is not None else [config.threshold] * num_l
    candidates = list(range(num_l)) if config.layers is None else list(config.layers)
    for index in candidates:
        if not 0 <= index < num_l:
            raise ValueError(f"PruneConfig.layers has {index}; the model has MoE layers 0..{num_l - 1}")
    chosen = candidates
    if config.num_layers is not None:
        if not calibration:
            raise ValueError("PruneConfig.num_layers ranks layers by pruning loss: pass calibration batches")
        ranked = [
            i for i, _ in rank_layers_by_pruning_loss(model, calibration, thresholds) if i in candidates
        ]
        chosen = ranked[: config.num_layers]
    for index, layer in enumerate(layers):
        on = index in chosen
        router = layer.router
        if not isinstance(router, PrunedRouter):
            if not on:
                continue
            router = PrunedRouter(router, 0.0)
            layer.router = router
        router.threshold = thresholds[index] if on else 0.0
        router.renormalize = config.renormalize
        router.protect_top = config.protect_top if on else 0.0
        router.drop_bottom = config.drop_bottom if on else 0.0
        if on and (router.protect_top > 0 or router.drop_bottom > 0):
            _install_attention_hook(model, layer, router)
    return model


def expert_calls_saved(routing: list) -> float:
    """Share of the router's (token, expert) choices that were not computed, over all layers.

    Args:
        routing: the ``routing`` list of a model output (one :class:`RoutingInfo` per MoE layer).
    """
    chosen = sum(int((r.choice_ids >= 0).sum()) for r in routing)
    computed = sum(int((r.expert_ids >= 0).sum()) for r in routing)
    return 1.0 - computed / max(chosen, 1)
