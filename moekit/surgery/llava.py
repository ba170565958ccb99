"""MoE-LLaVA's stage 3: upcycle the VLM's language model (the paper's sparse layers: every other
layer starting at layer 0), keeping the vision tower and projector as they are."""

from __future__ import annotations

import torch

from moekit.models.vision.llava import MoELLaVA
from moekit.surgery.upcycle import UpcycleConfig, upcycle


def moe_llava_layers(num_layers: int) -> UpcycleConfig:
    """MoE-LLaVA's default placement: layers 0, 2, 4, ... (4 experts, top-2, copied FFNs)."""
    return UpcycleConfig(
        layers="explicit", layer_indices=tuple(range(0, num_layers, 2)), num_experts=4, top_k=2
    )


@torch.no_grad()
def upcycle_vlm(vlm: MoELLaVA, config: UpcycleConfig) -> MoELLaVA:
    """A new :class:`MoELLaVA` whose LM is ``upcycle(vlm.language_model, config)``; ``vlm`` is unchanged.

    With ``expert_init="copy"`` (and the defaults) the result equals ``vlm`` at init.
    """
    lm = upcycle(vlm.language_model, config)
    new_cfg = vlm.config.replace(text=lm.config)
    with torch.random.fork_rng(devices=[]):
        model = MoELLaVA(new_cfg).to(next(vlm.parameters()).dtype)
    model.vision_tower.load_state_dict(vlm.vision_tower.state_dict())
    model.projector.load_state_dict(vlm.projector.state_dict())
    model.language_model.load_state_dict(lm.state_dict())
    return model.eval()
