"""Extension (MoExtend, Zhong et al. 2024): add experts to a trained MoE for a new task or modality,
train only the new experts and their router rows, keep every old weight bit-identical.

MoExtend as published (:meth:`ExtendConfig.moextend`): (1) tune only the routers on the new data
(:func:`tune_routers`); (2) per MoE layer, compare the expert-selection distribution on the new
data before (p) and after (q) that tuning, ``shift = std_e(q - p)``, and extend the top half of
layers (:func:`router_tuning_shift`, :func:`select_layers_by_shift`); (3) copy the new expert and
its router row from ``argmax_e q``; (4) add the calibration module ``p' = p + MLP(p)``
(:class:`CalibratedRouter`) and train new experts, new rows and the MLP. The earlier moekit
variant, the untouched router's load on old against new data, stays as ``shift_source="data"``.

Shape legend: T = tokens, D = model width, E = old FFN experts, N = new experts, H/F as in
``moekit.layers.experts``.

Why wrappers: the new router rows must live in their own parameter. A single ``[E + N, D]`` router
weight would put old and new rows in one tensor, so weight decay, AdamW state and gradient
clipping could not leave the old rows alone. :class:`ExtendedRouter` (a ``Router`` subclass)
holds ``weight`` ``[E, D]`` (old, frozen) and ``new_weight`` ``[N, D]`` (and ``new_bias`` ``[N]``
when asked) and computes ``logits = cat(x W_old^T, x W_new^T + b_new)``; the old logits come from
the very same ``F.linear`` call as before, so they are bit-identical. :class:`SplitExpertWeights`
(an ``ExpertWeights`` subclass, the layer's documented extension point) keeps old and new expert
stacks apart the same way and runs each through the layer's own sorted kernel. ``moekit.layers``
is not modified.

The training form cannot be saved as is (the loader builds plain routers); call
:func:`consolidate_extension` first: it folds the new rows and experts into a plain model with
``experts_per_layer`` raised (and ``router_bias`` on when ``new_bias`` is used), same function.

Old-task invariance: with ``router_init="isolated"`` the new rows are zero and ``new_bias`` is
-1e4, so the new experts' softmax mass underflows to exactly 0 and no token picks them: the
model's logits are bit-identical to the original's (tested; on batches above the layer's
decode-size threshold of 64 assignments, where the original model also uses the sorted kernel).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import JsonConfig, check_choice
from moekit.layers import ExpertWeights, MoELayer, Router
from moekit.models import MoEForCausalLM
from moekit.surgery.common import (
    Batches,
    as_batches,
    build_model,
    collect_ffn_inputs,
    expert_usage,
    require_plain_experts,
    router_rows_from_directions,
    train_steps,
)
from moekit.surgery.extend_modules import CalibratedRouter, ExtendedRouter, SplitExpertWeights

EXTEND_LAYERS = ("all", "explicit", "shift")
EXTEND_EXPERT_INITS = ("most_used", "mean", "random")
EXTEND_ROUTER_INITS = ("copy_source", "random", "isolated", "contrast")
SHIFT_METRICS = ("js", "kl", "std")
SHIFT_SOURCES = ("router_tuning", "data")

# Freeze specs for TrainConfig.freeze / apply_freeze: everything except the new parameters (the new
# experts, their router rows and bias, and the calibration MLP of a CalibratedRouter).
EXTENSION_FREEZE = [
    r"re:^(?!.*\.(new_w_in|new_w_out|new_weight|new_bias|calib_w1|calib_b1|calib_w2|calib_b2)$)"
]
# MoExtend's router tuning: only the routers' own rows (and bias) train.
ROUTER_TUNING_FREEZE = [r"re:^(?!.*\.router\.(weight|bias)$)"]
# Router calibration after extension: only the new router rows (and their bias) train.
CALIBRATION_FREEZE = [r"re:^(?!.*\.router\.(new_weight|new_bias)$)"]


@dataclass(kw_only=True)
class ExtendConfig(JsonConfig):
    """How to extend an MoE.

    Attributes:
        num_new_experts: N, new experts per extended layer.
        layers: ``"all"`` MoE layers, ``"explicit"`` (``layer_indices``), or ``"shift"``: the
            ``shift_fraction`` of MoE layers whose routing distribution moves most (MoExtend extends
            the top half); ``shift_source`` says which two distributions are compared.
        layer_indices: decoder layer indices for ``"explicit"``.
        shift_fraction: share of MoE layers to extend for ``"shift"`` (at least one).
        shift_source: ``"router_tuning"`` (MoExtend as published: copy the model, train only its
            routers on ``new_data`` for ``tune_steps``, compare the expert-selection distribution on
            ``new_data`` before (p) and after (q) that tuning; the source expert of
            ``expert_init="most_used"`` is then ``argmax_e q``) or ``"data"`` (the earlier moekit
            variant: the untouched router's load on ``old_data`` (p) against ``new_data`` (q); the
            source expert is the most used on ``new_data``). The extended model keeps the
            *original* routers either way; the tuned copy only decides where to extend (MoExtend
            freezes the old router against forgetting; that it restarts from the untuned router is
            [recon], not confirmed from the paper's text).
        shift_metric: ``"std"`` (MoExtend's ``std_e(q - p)``, the default; torch's unbiased std,
            which ranks layers the same as the population std when all layers have E experts),
            ``"js"`` (Jensen-Shannon) or ``"kl"`` (KL(q || p)).
        tune_steps, tune_lr: the router tuning of ``"router_tuning"`` (AdamW through
            :func:`moekit.surgery.common.train_steps`). MoExtend tunes 1000 steps on 665k samples
            [code scripts]; the default here is sized for small models and is not the paper's.
        expert_init: ``"most_used"`` (copy of the old expert the new data selects most, MoExtend),
            ``"mean"`` (average of the old experts) or ``"random"`` (the model's init).
        router_init: ``"copy_source"`` (the source expert's router row, MoExtend; with
            ``"mean"``/``"random"`` experts the mean old row), ``"random"`` (N(0, 0.02)) or
            ``"isolated"`` (zero rows and ``new_bias`` -1e4: new experts unreachable, exact old
            behaviour; raise the bias, or train with a moderate one, to let them in), or
            ``"contrast"``: the row points from the old data's mean FFN input to the new data's
            (mergekit "hidden"-style, scaled to ``contrast_logit_std`` logit std), and a trainable
            ``new_bias`` is calibrated on the old data so that only ``contrast_leak`` of old tokens
            would pick the new expert (needs ``old_data`` and ``new_data``).
        contrast_logit_std: logit std of the ``"contrast"`` row on old + new FFN inputs.
        contrast_leak: share of old-data tokens whose top-k the new expert enters at init.
        new_bias: initial value of a trainable per-new-expert logit bias, None for no bias
            (``"isolated"`` uses -1e4 when None).
        seed: seeds random inits.
        calibrate: put MoExtend's calibration module ``p' = p + MLP(p)`` in each extended router
            (:class:`CalibratedRouter`, identity at init, trained with the new experts under
            :data:`EXTENSION_FREEZE`). Off by default: a trained calibration MLP cannot be folded
            into a plain router, so :func:`consolidate_extension` refuses such a model (it drops
            the module while it is still the identity). :meth:`moextend` turns it on.
        calibration_hidden: M, the MLP's hidden width (16 in the MoExtend code).
    """

    num_new_experts: int = 1
    layers: str = "shift"
    layer_indices: tuple[int, ...] | None = None
    shift_fraction: float = 0.5
    shift_metric: str = "std"
    expert_init: str = "most_used"
    router_init: str = "copy_source"
    new_bias: float | None = None
    contrast_logit_std: float = 2.0
    contrast_leak: float = 0.01
    seed: int = 0
    shift_source: str = "router_tuning"
    tune_steps: int = 100
    tune_lr: float = 1e-3
    calibrate: bool = False
    calibration_hidden: int = 16

    @classmethod
    def moextend(cls, **overrides) -> ExtendConfig:
        """MoExtend as published: layers by router-tuning shift (std of q - p, top half), one new
        expert copied from ``argmax q`` with its router row, and the calibration module."""
        base = dict(
            num_new_experts=1,
            layers="shift",
            shift_fraction=0.5,
            shift_source="router_tuning",
            shift_metric="std",
            expert_init="most_used",
            router_init="copy_source",
            calibrate=True,
        )
        base.update(overrides)
        return cls(**base)

    def __post_init__(self) -> None:
        name = "ExtendConfig"
        check_choice(name, "shift_source", self.shift_source, SHIFT_SOURCES)
        if self.tune_steps < 1:
            raise ValueError(f"{name}.tune_steps must be >= 1, got {self.tune_steps}")
        if not self.tune_lr > 0:
            raise ValueError(f"{name}.tune_lr must be positive, got {self.tune_lr}")
        if self.calibration_hidden < 1:
            raise ValueError(f"{name}.calibration_hidden must be >= 1, got {self.calibration_hidden}")
        check_choice(name, "layers", self.layers, EXTEND_LAYERS)
        check_choice(name, "shift_metric", self.shift_metric, SHIFT_METRICS)
        check_choice(name, "expert_init", self.expert_init, EXTEND_EXPERT_INITS)
        check_choice(name, "router_init", self.router_init, EXTEND_ROUTER_INITS)
        if self.layer_indices is not None:
            self.layer_indices = tuple(self.layer_indices)
        if self.num_new_experts < 1:
            raise ValueError(f"{name}.num_new_experts must be >= 1, got {self.num_new_experts}")
        if self.layers == "explicit" and not self.layer_indices:
            raise ValueError(f"{name}.layer_indices is required when layers='explicit'")
        if not 0 < self.shift_fraction <= 1:
            raise ValueError(f"{name}.shift_fraction must be in (0, 1], got {self.shift_fraction}")
        if self.contrast_logit_std <= 0:
            raise ValueError(f"{name}.contrast_logit_std must be positive, got {self.contrast_logit_std}")
        if not 0 <= self.contrast_leak < 1:
            raise ValueError(f"{name}.contrast_leak must be in [0, 1), got {self.contrast_leak}")
        if self.new_bias is not None and not math.isfinite(self.new_bias):
            raise ValueError(f"{name}.new_bias must be finite, got {self.new_bias}")


def _distribution(load_E: Tensor) -> Tensor:
    p = load_E.to(torch.float64) + 1e-6
    return p / p.sum()


def load_shift(old_load: Tensor, new_load: Tensor, metric: str = "js") -> float:
    """How far the expert-load distribution moved: ``[E]`` counts -> a scalar (see ``ExtendConfig.shift_metric``)."""
    p, q = _distribution(old_load), _distribution(new_load)
    if metric == "kl":
        return float((q * (q / p).log()).sum())
    if metric == "std":
        return float((q - p).std())
    m = (p + q) / 2
    return float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())


@torch.no_grad()
def routing_shift(
    model: MoEForCausalLM, old_data: Batches, new_data: Batches, metric: str = "js"
) -> list[float]:
    """Per MoE layer, the shift of the expert-load distribution from old to new data.

    Uses :func:`moekit.analysis.record_trace` on each data set. Returns one float per MoE layer.
    """
    from moekit.analysis import record_trace

    old = record_trace(model, [(b, None) for b in as_batches(old_data)]).load()
    new = record_trace(model, [(b, None) for b in as_batches(new_data)]).load()
    return [load_shift(p, q, metric) for p, q in zip(old, new)]


def select_layers_by_shift(model: MoEForCausalLM, shifts: list[float], fraction: float) -> list[int]:
    """The decoder indices of the ``ceil(fraction * L_moe)`` MoE layers with the largest shift."""
    ids = model.config.moe_layer_ids
    num = max(1, math.ceil(fraction * len(ids)))
    order = sorted(range(len(ids)), key=lambda j: -shifts[j])[:num]
    return sorted(ids[j] for j in order)


@torch.no_grad()
def selection_load(model: MoEForCausalLM, data: Batches) -> list[Tensor]:
    """Per MoE layer, how often each expert is in a token's chosen set on ``data`` (``[B, S]``
    batches): one ``[E]`` float tensor per MoE layer (the router's own descending top-k; MoExtend's
    ``expert_distribution.py`` counts the two *lowest* scores by an ascending argsort, a bug not
    reproduced)."""
    from moekit.analysis import record_trace

    return record_trace(model, [(b, None) for b in as_batches(data)]).load()


def tune_routers(
    model: MoEForCausalLM, data: Batches, steps: int = 100, lr: float = 1e-3, seed: int = 0
) -> MoEForCausalLM:
    """MoExtend's router tuning: a copy of ``model`` whose routers alone are trained on ``data``
    (``[B, S + 1]`` windows) through the one engine (:func:`moekit.surgery.common.train_steps`,
    freeze :data:`ROUTER_TUNING_FREEZE`); every other tensor stays bit-identical. ``model`` is not
    modified."""
    out = copy.deepcopy(model)
    train_steps(out, as_batches(data), steps, lr=lr, freeze=ROUTER_TUNING_FREEZE, seed=seed)
    return out


def router_tuning_shift(
    model: MoEForCausalLM, tuned: MoEForCausalLM, data: Batches, metric: str = "std"
) -> tuple[list[float], list[Tensor]]:
    """Per MoE layer, how far the expert-selection distribution on ``data`` moved from ``model``
    (p) to its router-tuned copy ``tuned`` (q), by :func:`load_shift`; also returns q's loads
    (``[E]`` per MoE layer), from which MoExtend picks the source expert (``argmax_e q``)."""
    before, after = selection_load(model, data), selection_load(tuned, data)
    return [load_shift(p, q, metric) for p, q in zip(before, after)], after


def extend_experts(
    model: MoEForCausalLM,
    config: ExtendConfig,
    new_data: Batches | None = None,
    old_data: Batches | None = None,
    tuned: MoEForCausalLM | None = None,
) -> MoEForCausalLM:
    """Adds ``num_new_experts`` experts to chosen MoE layers (training form, see the module doc).

    Args:
        model: a trained moekit MoE (top-k routers, FFN experts only); not modified.
        config: :class:`ExtendConfig`.
        new_data: ``[B, S]`` batches of the new task; needed for ``expert_init="most_used"`` and
            ``layers="shift"`` (and, with ``shift_source="router_tuning"``, the router tuning uses
            them as ``[B, S]`` windows: inputs ``[:, :-1]``, targets ``[:, 1:]``).
        old_data: ``[B, S]`` batches of the old task; needed for ``shift_source="data"`` and
            ``router_init="contrast"``.
        tuned: with ``shift_source="router_tuning"``, an already router-tuned copy of ``model``
            (e.g. from :func:`tune_routers`); None tunes one here when the layer choice or the
            source expert needs it.

    Returns:
        A deep copy with :class:`ExtendedRouter` (:class:`CalibratedRouter` with ``calibrate``) and
        :class:`SplitExpertWeights` in the extended layers and ``config.experts_per_layer`` raised.
        Freeze with :data:`EXTENSION_FREEZE`.
    """
    require_plain_experts(model, "extend")
    cfg = model.config
    if not cfg.num_moe_layers:
        raise ValueError("extend: the model has no MoE layer")
    new_data, old_data = as_batches(new_data), as_batches(old_data)
    if config.expert_init == "most_used" and not new_data:
        raise ValueError("extend: expert_init='most_used' needs new_data batches")
    usage = None
    shifts = None
    by_tuning = config.shift_source == "router_tuning"
    if by_tuning and (config.layers == "shift" or config.expert_init == "most_used"):
        if not new_data:
            raise ValueError("extend: shift_source='router_tuning' needs new_data batches")
        if tuned is None:
            tuned = tune_routers(model, new_data, config.tune_steps, config.tune_lr, config.seed)
        shifts, usage = router_tuning_shift(model, tuned, new_data, config.shift_metric)
    if config.layers == "shift":
        if shifts is None:
            if not new_data or not old_data:
                raise ValueError(
                    "extend: layers='shift' with shift_source='data' needs old_data and new_data batches"
                )
            shifts = routing_shift(model, old_data, new_data, config.shift_metric)
        layers = select_layers_by_shift(model, shifts, config.shift_fraction)
    elif config.layers == "all":
        layers = list(cfg.moe_layer_ids)
    else:
        layers = sorted(set(config.layer_indices or ()))
        for i in layers:
            if not (0 <= i < cfg.num_layers) or not cfg.is_moe_layer(i):
                raise ValueError(
                    f"ExtendConfig.layer_indices: layer {i} is not an MoE layer ({cfg.moe_layer_ids})"
                )
    if config.expert_init == "most_used" and usage is None:
        usage = expert_usage(model, new_data, "tokens")
    with torch.no_grad():
        return _extend(model, config, layers, usage, new_data, old_data)


def _extend(
    model: MoEForCausalLM,
    config: ExtendConfig,
    layers: list[int],
    usage: list[Tensor] | None,
    new_data: list[Tensor],
    old_data: list[Tensor],
) -> MoEForCausalLM:
    cfg = model.config
    if config.router_init == "contrast":
        if not new_data or not old_data:
            raise ValueError("extend: router_init='contrast' needs old_data and new_data batches")
        old_feats = collect_ffn_inputs(model, old_data, layers)
        new_feats = collect_ffn_inputs(model, new_data, layers)
    gen = torch.Generator().manual_seed(config.seed)
    out = copy.deepcopy(model)
    num_new = config.num_new_experts
    counts = [cfg.moe_config(i).num_experts for i in cfg.moe_layer_ids]
    new_bias_value = config.new_bias
    if config.router_init == "isolated" and new_bias_value is None:
        new_bias_value = -1e4
    for i in layers:
        j = cfg.moe_layer_ids.index(i)
        mlp: MoELayer = out.layers[i].mlp
        old_cfg = mlp.config
        w_in, w_out = mlp.experts.stacked() if mlp.experts.stacked() is not None else _stack(mlp.experts)
        std = cfg.initializer_range
        if config.expert_init == "most_used":
            src = int(usage[j][: old_cfg.num_experts].argmax())
            new_in, new_out = (
                w_in[src : src + 1].repeat(num_new, 1, 1),
                w_out[src : src + 1].repeat(num_new, 1, 1),
            )
            row = mlp.router.weight[src]
        elif config.expert_init == "mean":
            new_in = w_in.mean(0, keepdim=True).repeat(num_new, 1, 1)
            new_out = w_out.mean(0, keepdim=True).repeat(num_new, 1, 1)
            row = mlp.router.weight.mean(0)
        else:
            new_in = (
                torch.randn((num_new, *w_in.shape[1:]), generator=gen, dtype=torch.float64).to(w_in.dtype)
                * std
            )
            new_out = torch.randn((num_new, *w_out.shape[1:]), generator=gen, dtype=torch.float64).to(
                w_out.dtype
            ) * (std / math.sqrt(2 * cfg.num_layers))
            row = mlp.router.weight.mean(0)
        if config.router_init == "copy_source":
            new_w = row.unsqueeze(0).repeat(num_new, 1)
        elif config.router_init == "random":
            new_w = torch.randn(num_new, cfg.dim, generator=gen, dtype=torch.float64) * std
        elif config.router_init == "contrast":
            x_old, x_new = old_feats[i].to(torch.float64), new_feats[i].to(torch.float64)
            direction = (x_new.mean(0) - x_old.mean(0)).unsqueeze(0)
            new_w = router_rows_from_directions(
                direction, torch.cat([x_old, x_new]), config.contrast_logit_std
            )
            old_logits = mlp.router.project(x_old)  # float64 in, float64 out
            kth = old_logits.topk(old_cfg.top_k, dim=-1).values[:, -1]
            margin = (x_old @ new_w.t()).squeeze(-1) - kth
            bias = -float(torch.quantile(margin, 1.0 - config.contrast_leak))
            new_w = new_w.repeat(num_new, 1)
        else:
            new_w = torch.zeros(num_new, cfg.dim)
        new_b = None if new_bias_value is None else torch.full((num_new,), float(new_bias_value))
        if config.router_init == "contrast":
            new_b = torch.full((num_new,), bias + (new_bias_value or 0.0))
        new_moe_cfg = old_cfg.replace(num_experts=old_cfg.num_experts + num_new)
        if config.calibrate:
            mlp.router = CalibratedRouter(
                mlp.router, new_moe_cfg, new_w, new_b, config.calibration_hidden, generator=gen
            )
        else:
            mlp.router = ExtendedRouter(mlp.router, new_moe_cfg, new_w, new_b)
        mlp.experts = SplitExpertWeights(
            w_in.detach(), w_out.detach(), new_in.detach(), new_out.detach(), old_cfg.activation
        )
        mlp.config = new_moe_cfg
        mlp.balance_weight = torch.ones(new_moe_cfg.num_total_experts, dtype=mlp.balance_weight.dtype)
        counts[j] += num_new
    moe = cfg.moe
    assert moe is not None
    if (new_bias_value is not None or config.router_init == "contrast") and not moe.router_bias:
        moe = moe.replace(router_bias=True)
    out.config = cfg.replace(moe=moe, experts_per_layer=tuple(counts))
    out.eval()
    return out


def _stack(experts: ExpertWeights) -> tuple[Tensor, Tensor]:
    pairs = [experts.expert_tensors(e) for e in range(experts.num_experts)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def extended_layers(model: MoEForCausalLM) -> list[int]:
    """Decoder indices of the layers holding an :class:`ExtendedRouter`."""
    return [
        i
        for i, layer in enumerate(model.layers)
        if isinstance(getattr(layer.mlp, "router", None), ExtendedRouter)
    ]


@torch.no_grad()
def consolidate_extension(model: MoEForCausalLM) -> MoEForCausalLM:
    """Folds an extended model into a plain :class:`MoEForCausalLM` (savable, same function).

    Router rows become ``cat(weight, new_weight)`` ``[E + N, D]``, experts ``cat`` along the expert
    axis; with ``new_bias`` the router gets a bias ``cat(old bias or 0, new_bias)`` and layers
    without one get zeros. A :class:`CalibratedRouter` whose calibration MLP is still the identity
    is dropped; a trained one raises ``ValueError`` (``p + MLP(p)`` has no plain-router form).
    Not modified: ``model``.
    """
    for i in extended_layers(model):
        router = model.layers[i].mlp.router
        if isinstance(router, CalibratedRouter) and not router.is_identity():
            raise ValueError(
                f"consolidate_extension: layer {i} has a trained calibration MLP (p' = p + MLP(p)), which a "
                "plain router cannot express; keep the training form, or extend with calibrate=False"
            )
    state = {}
    skip = ("router.new_weight", "router.new_bias", "experts.new_w_in", "experts.new_w_out")
    skip += tuple(f"router.{n}" for n in ("calib_w1", "calib_b1", "calib_w2", "calib_b2"))
    for name, t in model.state_dict().items():
        if name.endswith(skip):
            continue
        state[name] = t.detach().clone()
    moe = model.config.moe
    for i in model.config.moe_layer_ids:
        p = f"layers.{i}.mlp."
        mlp = model.layers[i].mlp
        router = mlp.router
        num_e = mlp.config.num_total_experts
        if isinstance(router, ExtendedRouter):
            state[p + "router.weight"] = torch.cat([router.weight, router.new_weight]).detach().clone()
            state[p + "experts.w_in"] = torch.cat([mlp.experts.w_in, mlp.experts.new_w_in]).detach().clone()
            state[p + "experts.w_out"] = (
                torch.cat([mlp.experts.w_out, mlp.experts.new_w_out]).detach().clone()
            )
        if moe is not None and moe.router_bias:
            old_b = (
                router.bias if router.bias is not None else router.weight.new_zeros(router.weight.shape[0])
            )
            new_b = getattr(router, "new_bias", None)
            if isinstance(router, ExtendedRouter):
                new_b = (
                    new_b if new_b is not None else router.new_weight.new_zeros(router.new_weight.shape[0])
                )
                state[p + "router.bias"] = torch.cat([old_b, new_b]).detach().clone()
            elif p + "router.bias" not in state:
                state[p + "router.bias"] = router.weight.new_zeros(num_e)
    dtype = next(model.parameters()).dtype
    return build_model(model.config, state, dtype)


def extension_freeze_check(model: MoEForCausalLM) -> list[str]:
    """The parameter names :data:`EXTENSION_FREEZE` leaves trainable (the new ones only)."""
    from moekit.train import select_frozen

    names = [n for n, _ in model.named_parameters()]
    frozen = select_frozen(names, EXTENSION_FREEZE)
    return sorted(set(names) - frozen)


def calibrate_router(
    model: MoEForCausalLM, batches: Batches, steps: int = 50, lr: float = 1e-3
) -> MoEForCausalLM:
    """Router calibration after extension: trains only the new router rows (and ``new_bias``) on a
    mix of old- and new-task ``[B, S + 1]`` batches, so the new experts are chosen where they help.

    MoExtend instead trains a small MLP on the routing probabilities (p' = p + MLP(p)) jointly with
    the new experts: extend with ``calibrate=True`` (:class:`CalibratedRouter`) and train under
    :data:`EXTENSION_FREEZE`. Returns a trained copy; ``model`` is not modified.
    """
    out = copy.deepcopy(model)
    if not extended_layers(out):
        raise ValueError("calibrate_router: the model has no extended layer (run extend_experts first)")
    train_steps(out, batches, steps, lr=lr, freeze=CALIBRATION_FREEZE)
    return out


@torch.no_grad()
def calibrate_new_bias(model: MoEForCausalLM, old_data: Batches, leak: float = 0.0) -> MoEForCausalLM:
    """Closed-form router calibration: resets each new expert's ``new_bias`` so that it enters the
    top-k of at most ``leak`` of the old-data tokens (measured on ``old_data``, ``[B, S]`` batches).

    With ``norm_topk_prob`` (or softmax after top-k), a token whose top-k holds no new expert gets the
    same weights as before extension (the new experts' softmax mass cancels in the renormalisation),
    so old-task outputs move only on the leaked tokens, while new-task tokens whose new-expert logit
    clears the old experts keep using it. Returns a calibrated copy; ``model`` is not modified.
    """
    if not 0 <= leak < 1:
        raise ValueError(f"calibrate_new_bias: leak must be in [0, 1), got {leak}")
    layers = extended_layers(model)
    if not layers:
        raise ValueError("calibrate_new_bias: the model has no extended layer (run extend_experts first)")
    out = copy.deepcopy(model)
    for i in layers:
        router = out.layers[i].mlp.router
        if router.new_bias is None:
            raise ValueError(
                f"calibrate_new_bias: layer {i} has no new_bias; extend with new_bias or 'contrast'"
            )
        x_old = collect_ffn_inputs(out, old_data, [i])[i].to(torch.float64)
        old_logits = Router.project(router, x_old)  # the old rows only
        kth = old_logits.topk(out.layers[i].mlp.config.top_k, dim=-1).values[:, -1:]
        margin = x_old @ router.new_weight.to(torch.float64).t() - kth  # [N, num_new], without the bias
        q = torch.quantile(margin, 1.0 - leak, dim=0) if leak > 0 else margin.amax(0)
        # Strictly below the old k-th logit on (1 - leak) of the tokens (a small safety margin).
        router.new_bias.copy_((-q - 1e-3).to(router.new_bias.dtype))
    return out
