"""Freezing parameter groups and building the optimizer.

Groups come from the model: ``model.parameter_groups()`` (the decoder LM has one), else the groups
any MoE model has (:func:`moekit.models.param_groups.moe_parameter_groups`). ``re:<regex>`` on
parameter names stays as a raw escape hatch. :data:`FREEZE_GROUPS` keeps the same groups as regexes
on decoder-LM names, for callers that have only names (:func:`select_frozen`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

# Named freeze groups: name -> (regex on parameter names, invert). Parameter names look like
# ``embed_tokens.weight``, ``layers.3.self_attn.q_proj.weight``, ``layers.3.mlp.router.weight``,
# ``layers.3.mlp.experts.w_in``, ``layers.3.mlp.shared.w_in.weight``, ``layers.0.mlp.w_in.weight``
# (a dense FFN), ``norm.weight``, ``lm_head.weight``. An inverted group freezes what does NOT match.
_ROUTER = r"\.mlp\.router\."
# Routed experts, including MoE++ constant experts (their gate and vector are per-expert weights).
_EXPERTS = r"\.mlp\.(experts\.|const_gate$|const_vec$)"
# Always-on dense branches inside an MoE layer: shared expert(s) and PR-MoE's residual MLP.
_SHARED = r"\.mlp\.(shared|shared_gate|residual_mlp|residual_coef)\."
FREEZE_GROUPS: dict[str, tuple[str, bool]] = {
    "router": (_ROUTER, False),
    "experts": (_EXPERTS, False),
    # The adapters of LoRA experts (their shared base is frozen by the layer itself).
    "lora_experts": (r"\.mlp\.experts\.lora_", False),
    "shared": (_SHARED, False),
    "attention": (r"\.self_attn\.", False),
    "embeddings": (r"^(embed_tokens|lm_head)\.", False),
    "norms": (r"(^|\.)\w*norm\w*\.(weight|bias)$", False),
    # A dense FFN's projections hang directly off `mlp`, unlike experts/shared/router ones.
    "dense_ffn": (r"^layers\.\d+\.mlp\.w_\w+\.(weight|bias)$", False),
    # The backbone: everything that is not part of an MoE block's routing or experts.
    "non_experts": (f"{_ROUTER}|{_EXPERTS}|{_SHARED}", True),
    "all_but_router": (_ROUTER, True),
    "all_but_experts": (_EXPERTS, True),
}
RAW_REGEX_PREFIX = "re:"


def freeze_pattern(spec: str) -> tuple[re.Pattern[str], bool]:
    """Compiles a freeze spec: a :data:`FREEZE_GROUPS` name or ``"re:<regex>"``; returns (regex, invert)."""
    if spec.startswith(RAW_REGEX_PREFIX):
        try:
            return re.compile(spec[len(RAW_REGEX_PREFIX) :]), False
        except re.error as e:
            raise ValueError(f"freeze regex {spec!r} does not compile: {e}") from e
    if spec not in FREEZE_GROUPS:
        raise ValueError(
            f"unknown freeze group {spec!r}; use one of {sorted(FREEZE_GROUPS)} or 're:<regex>' on parameter names"
        )
    regex, invert = FREEZE_GROUPS[spec]
    return re.compile(regex), invert


def select_frozen(names: list[str], specs: list[str]) -> set[str]:
    """The parameter names the freeze specs select (union over specs).

    Raises:
        ValueError: a spec matches no parameter (likely a typo), or the specs select every parameter.
    """
    frozen: set[str] = set()
    for spec in specs:
        pattern, invert = freeze_pattern(spec)
        hit = {n for n in names if bool(pattern.search(n)) != invert}
        if not hit:
            raise ValueError(f"freeze {spec!r} matches no parameter of this model (e.g. {names[:3]})")
        frozen |= hit
    if names and frozen >= set(names):
        raise ValueError(f"freeze {specs} freezes every parameter; nothing would train")
    return frozen


def model_parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """``model.parameter_groups()`` when the model defines it, else the groups of any MoE model."""
    if hasattr(model, "parameter_groups"):
        return model.parameter_groups()
    from moekit.models.param_groups import moe_parameter_groups

    return moe_parameter_groups(model)


def select_frozen_in_model(model: nn.Module, specs: list[str]) -> set[str]:
    """The parameter names of ``model`` that the freeze specs select (union over specs).

    Group names come from :func:`model_parameter_groups`; ``re:<regex>`` searches parameter names.

    Raises:
        ValueError: an unknown group, a bad regex, a spec that selects nothing, or every parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    groups = model_parameter_groups(model) if specs else {}
    frozen: set[str] = set()
    for spec in specs:
        if spec.startswith(RAW_REGEX_PREFIX):
            pattern, _ = freeze_pattern(spec)
            hit = {n for n in names if pattern.search(n)}
        elif spec in groups:
            hit = set(groups[spec])
        else:
            raise ValueError(
                f"unknown freeze group {spec!r}; this model has {sorted(groups)}, or use 're:<regex>' "
                "on parameter names"
            )
        if not hit:
            raise ValueError(f"freeze {spec!r} matches no parameter of this model (e.g. {names[:3]})")
        frozen |= hit
    if names and frozen >= set(names):
        raise ValueError(f"freeze {specs} freezes every parameter; nothing would train")
    return frozen


def apply_freeze(model: nn.Module, specs: list[str]) -> set[str]:
    """Sets ``requires_grad=False`` on the parameters ``specs`` select (:func:`select_frozen_in_model`);
    returns their names.

    Parameters that are already frozen by the model (e.g. a random-fixed router) stay frozen. Raises
    ``ValueError`` if nothing would remain trainable.
    """
    named = dict(model.named_parameters())
    frozen = select_frozen_in_model(model, specs)
    if specs and all(not p.requires_grad or n in frozen for n, p in named.items()):
        raise ValueError(f"freeze {specs} leaves no trainable parameter")
    for name in frozen:
        named[name].requires_grad_(False)
    return frozen


def build_optimizer(model: nn.Module, config: Any) -> tuple[torch.optim.AdamW, dict[int, str]]:
    """AdamW over the trainable parameters; returns it and ``id(param) -> name``.

    Weight decay applies to matrices only: norms, biases (1-D) and embeddings are excluded, because
    decaying them pulls scales and rare-token rows toward zero without regularising anything useful.
    ``config`` needs ``lr``, ``betas`` and ``weight_decay``.
    """
    decay, no_decay, names = [], [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names[id(p)] = name
        if p.ndim < 2 or "embed" in name or re.search(FREEZE_GROUPS["norms"][0], name):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # foreach=False: the single-tensor path gives the same bits whatever the grouping of tensors.
    opt = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=False)
    return opt, names
