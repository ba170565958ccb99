"""Staged training recipes written as freeze specs for ``TrainConfig.freeze`` / ``apply_freeze``.

Each recipe is a list of :data:`moekit.train.FREEZE_GROUPS` names or ``"re:<regex>"`` specs (the
regex selects what is *frozen*). See docs/surgery.md for a worked recipe.

=========================  ====================================================================
recipe                     trains
=========================  ====================================================================
``moe_llava_stage3``       MoE-LLaVA stage III: the MoE layers' experts and routers only. Dense
                           FFNs stay frozen too (MoE-LLaVA's substring freezing left them
                           trainable, a known pitfall; use ``moe_llava_stage3_code`` for that).
``moe_llava_stage3_code``  what the MoE-LLaVA code does: experts, routers and dense FFNs
``router_only``            routers only (CLIP-MoE / DMU router stage, router calibration)
``experts_only``           routed experts only
``ffn_only``               dense FFNs only (CLIP-MoE's ``--lock-except-mlp`` MCL stage)
``extension``              MoExtend: the new experts and new router rows only
``extension_calibrate``    the new router rows only
``full``                   everything
=========================  ====================================================================
"""

from __future__ import annotations

from moekit.surgery.extend import CALIBRATION_FREEZE, EXTENSION_FREEZE

RECIPES: dict[str, list[str]] = {
    "moe_llava_stage3": ["non_experts"],
    "moe_llava_stage3_code": [r"re:^(?!layers\.\d+\.mlp\.)"],
    "router_only": ["all_but_router"],
    "experts_only": ["all_but_experts"],
    "ffn_only": [r"re:^(?!layers\.\d+\.mlp\.w_\w+\.(weight|bias)$)"],
    "extension": list(EXTENSION_FREEZE),
    "extension_calibrate": list(CALIBRATION_FREEZE),
    "full": [],
}


def recipe_freeze(name: str) -> list[str]:
    """The freeze specs of recipe ``name`` (a copy); ``ValueError`` listing the recipes if unknown."""
    if name not in RECIPES:
        raise ValueError(f"unknown surgery recipe {name!r}; choose one of {sorted(RECIPES)}")
    return list(RECIPES[name])
