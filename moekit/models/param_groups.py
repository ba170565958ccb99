"""Parameter groups by role, found from module types (what ``--freeze GROUP`` names).

:func:`moe_parameter_groups` works on any model built from :class:`~moekit.layers.MoELayer` s (the
groups every family shares: ``router``, ``experts``, ``shared``, ``norms`` and the complements);
a model class adds its own (the decoder LM: ``attention``, ``embeddings``, ``dense_ffn``) in its
``parameter_groups()`` method. Names are ``model.named_parameters()`` names (tied weights once).
"""

from __future__ import annotations

from torch import nn

from moekit.layers import MoELayer

# The groups every model has, in the order ``--freeze`` help lists them.
MOE_GROUPS = (
    "router",
    "experts",
    "lora_experts",
    "shared",
    "norms",
    "non_experts",
    "all_but_router",
    "all_but_experts",
)
_EXPERT_PARAMS = ("const_gate", "const_vec")  # MoE++ constant experts: per-expert weights
_SHARED_MODULES = ("shared", "shared_gate", "residual_mlp", "residual_coef")  # always-on branches


def module_param_names(module: nn.Module | None, prefix: str) -> list[str]:
    """``module``'s parameter names, prefixed as in the root model (empty for None)."""
    if module is None:
        return []
    return [name for name, _ in module.named_parameters(prefix=prefix)]


def _is_norm(module: nn.Module) -> bool:
    # RMSNorm classes live in several places (blocks, decoder, torch); their names say what they are.
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def moe_parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """``router``, ``experts``, ``lora_experts`` (the adapters of LoRA experts, a part of ``experts``;
    their shared base is frozen by the layer), ``shared``, ``norms`` and the complements
    ``non_experts`` (everything but router, experts and shared), ``all_but_router`` and
    ``all_but_experts``, from module types."""
    every = [name for name, _ in model.named_parameters()]
    known = set(every)
    router, experts, lora, shared, norms = [], [], [], [], []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, MoELayer):
            router += module_param_names(module.router, f"{dot}router")
            experts += module_param_names(module.experts, f"{dot}experts")
            lora += [n for n in module_param_names(module.experts, f"{dot}experts") if ".lora_" in n]
            experts += [
                f"{dot}{a}" for a in _EXPERT_PARAMS if isinstance(getattr(module, a, None), nn.Parameter)
            ]
            for attr in _SHARED_MODULES:
                sub = getattr(module, attr, None)
                if isinstance(sub, nn.Module):
                    shared += module_param_names(sub, f"{dot}{attr}")
        elif _is_norm(module):
            norms += [f"{dot}{n}" for n, _ in module.named_parameters(recurse=False)]
    moe = set(router) | set(experts) | set(shared)
    groups = {
        "router": router,
        "experts": experts,
        "lora_experts": lora,
        "shared": shared,
        "norms": norms,
        "non_experts": [n for n in every if n not in moe],
        "all_but_router": [n for n in every if n not in set(router)],
        "all_but_experts": [n for n in every if n not in set(experts)],
    }
    return {k: [n for n in v if n in known] for k, v in groups.items()}
