"""moekit.parallel: expert parallelism on torch.distributed, applied to a built model from outside.

Contract: model code stays single-device. ``parallelize_experts(model, group)`` shards the
experts of every MoE layer over an expert-parallel group (gloo on CPU, NCCL on GPU) and returns
the model; ``full_state_dict``/``load_full_state_dict`` convert between sharded models and the
single-device state dict, so checkpoints move between expert-parallel sizes. Placement
planning lives in ``placement.py``. To add a strategy, subclass ``ExpertWeights`` (the layer's
expert interface) and override ``routed_forward``; never edit ``moekit.layers``.
"""

from moekit.parallel.expert_parallel import (
    ExpertParallelExperts,
    ddp_ignored_parameters,
    full_state_dict,
    load_full_state_dict,
    parallelize_experts,
)

__all__ = [
    "ExpertParallelExperts",
    "ddp_ignored_parameters",
    "full_state_dict",
    "load_full_state_dict",
    "parallelize_experts",
]
