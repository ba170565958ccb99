"""Pre-gated MoE (Hwang et al., ISCA'24): each MoE layer's experts are chosen one block early.

In the paper, MoE block l holds a *pre-gate* that reads block l's input and selects the experts
of block l+1; the first block also keeps an ordinary gate for itself, and the last has no
pre-gate. Routing then uses the pre-gates, so the experts of block l+1 are known (and can be
copied to the accelerator) while block l computes. The pre-gates are fine-tuned end to end with
the task loss plus the balance loss.

moekit keeps each pre-gate where it is used: with ``ModelConfig.pregated`` the router of MoE
layer l+1 *is* its pre-gate and reads MoE layer l's input (:meth:`MoEForCausalLM.forward`), the
first MoE layer's router reads its own input. The parameters are the same as the paper's (one
``[E, D]`` gate per MoE layer, the first layer's own gate included), only stored with the layer
they route. :func:`to_pregated` therefore initialises every pre-gate from the router of the layer
it selects for (the paper's natural initialisation), by turning the flag on; then fine-tune with
``moekit.train`` (``moekit pregate`` then ``moekit train --init-from``).
"""

from __future__ import annotations

import copy

from moekit.models import MoEForCausalLM


def to_pregated(model: MoEForCausalLM) -> MoEForCausalLM:
    """A copy of ``model`` whose MoE layers after the first route from the previous MoE layer's
    input (``ModelConfig.pregated``), each pre-gate initialised from that layer's own router.

    The result changes the function (the routers read other inputs) and needs fine-tuning; the
    input model is not modified. Raises ``ValueError`` for a model with fewer than two MoE layers
    (nothing to pre-gate), a gating-residual model, or one already pregated.
    """
    cfg = model.config
    if cfg.pregated:
        raise ValueError("to_pregated: the model is already pregated")
    if cfg.num_moe_layers < 2:
        raise ValueError(
            f"to_pregated: the model has {cfg.num_moe_layers} MoE layer(s); pre-gating needs at least two"
        )
    new_cfg = cfg.replace(pregated=True)  # validates (gating residuals are refused there)
    out = copy.deepcopy(model)
    out.config = new_cfg
    out.num_eager_decode_tokens, out.decode_compiled = 0, False
    return out.eval()
