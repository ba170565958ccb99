"""moekit.surgery: model surgery on moekit ``MoEForCausalLM`` models.

Contract:
    Every operation is a pure function ``op(model, Config, [data]) -> MoEForCausalLM`` (or a
    report): the input model is never modified (work happens on a deep copy or a rebuilt state
    dict), the result is in the input's dtype and in eval mode, and ``Config`` is a
    :class:`moekit.config.JsonConfig` dataclass that validates itself (``ValueError`` naming the
    field). Calibration data is passed as ``[B, S]`` token batches (``[B, S + 1]`` windows where an
    operation trains). Results of every operation except :func:`extend_experts` are plain models
    that ``save_pretrained``/``from_pretrained`` round-trip; an extended model is a training form,
    folded back by :func:`consolidate_extension`. HF dense checkpoints enter through
    ``moekit.convert.from_pretrained`` and are then ordinary inputs here.

Operations (paper followed; docs/surgery.md lists what differs from the papers' code):
    upcycle.py   :func:`upcycle` sparse upcycling (Komatsuzaki et al.; MoE-LLaVA; SMoE-Dropout split)
    scale.py     :func:`grow` scale-up before scale-out (AquilaMoE EfficientScale; Net2Net/bert2BERT)
    dmu.py       :func:`dmu_upcycle` diversified multiplet upcycling of a decoder LM
                 (``recipe="per_cluster_only"`` or ``"multiplet"``)
    multiplet.py :func:`upcycle_vision` (ViT/CLIP copy upcycling) and :func:`multiplet_upcycle`,
                 CLIP-MoE's DMU as the paper does it (import from ``moekit.surgery.multiplet``)
    mixture.py   :func:`merge_dense_models` mixture of dense fine-tunes (mergekit-moe, Branch-Train-MiX)
    extend.py    :func:`extend_experts` + :func:`consolidate_extension` + :func:`calibrate_new_bias`
                 (MoExtend): layers by the routing shift of router tuning, calibration module
                 (modules in extend_modules.py)
    prune.py     :func:`prune_experts` usage-based expert pruning (DeepSpeed multitask MoE)
    pregate.py   :func:`to_pregated` Pre-gated MoE: routers read the previous MoE layer's input
    merge.py     :func:`merge_experts` agglomerative expert merging
    recipes.py   staged-training freeze specs for ``TrainConfig.freeze`` (MoE-LLaVA stage III, ...)
    common.py    shared helpers (FFN-input collection, k-means, usage, snapshots, a short train loop)

To add an operation: write ``moekit/surgery/<op>.py`` with a ``<Op>Config(JsonConfig)`` dataclass
(validated in ``__post_init__``) and a function ``<op>(model, config, data=None) -> model`` that
builds the new :class:`~moekit.models.ModelConfig` and state dict and calls
:func:`common.build_model` (strict shape checks), or works on ``copy.deepcopy(model)``; document
which paper it follows and whether it preserves the function; export it here; add a CLI verb
``moekit/cli/<op>.py`` (HELP / add_arguments / run) and tests in ``tests/test_surgery.py``.
"""

from moekit.surgery.common import (
    changed_tensors,
    collect_ffn_inputs,
    expert_usage,
    kmeans,
    lm_loss,
    snapshot,
    train_steps,
)
from moekit.surgery.dmu import DMUConfig, dmu_upcycle
from moekit.surgery.extend import (
    CALIBRATION_FREEZE,
    EXTENSION_FREEZE,
    ROUTER_TUNING_FREEZE,
    CalibratedRouter,
    ExtendConfig,
    ExtendedRouter,
    SplitExpertWeights,
    calibrate_new_bias,
    calibrate_router,
    consolidate_extension,
    extend_experts,
    load_shift,
    router_tuning_shift,
    routing_shift,
    select_layers_by_shift,
    selection_load,
    tune_routers,
)
from moekit.surgery.merge import MergeConfig, merge_experts
from moekit.surgery.mixture import MixtureConfig, check_same_shapes, merge_dense_models
from moekit.surgery.pregate import to_pregated
from moekit.surgery.prune import PruneConfig, prune_experts
from moekit.surgery.recipes import RECIPES, recipe_freeze
from moekit.surgery.scale import GrowConfig, grow
from moekit.surgery.upcycle import UpcycleConfig, upcycle

__all__ = [
    "CALIBRATION_FREEZE",
    "EXTENSION_FREEZE",
    "RECIPES",
    "ROUTER_TUNING_FREEZE",
    "CalibratedRouter",
    "DMUConfig",
    "ExtendConfig",
    "ExtendedRouter",
    "GrowConfig",
    "MergeConfig",
    "MixtureConfig",
    "PruneConfig",
    "SplitExpertWeights",
    "UpcycleConfig",
    "calibrate_new_bias",
    "calibrate_router",
    "changed_tensors",
    "check_same_shapes",
    "collect_ffn_inputs",
    "consolidate_extension",
    "dmu_upcycle",
    "expert_usage",
    "extend_experts",
    "grow",
    "kmeans",
    "lm_loss",
    "load_shift",
    "merge_dense_models",
    "merge_experts",
    "prune_experts",
    "recipe_freeze",
    "router_tuning_shift",
    "routing_shift",
    "select_layers_by_shift",
    "selection_load",
    "snapshot",
    "train_steps",
    "to_pregated",
    "tune_routers",
    "upcycle",
]
