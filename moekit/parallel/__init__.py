"""moekit.parallel: expert parallelism on torch.distributed, applied to a built model from outside.

Contract: model code stays single-device. ``parallelize_experts(model, group)`` shards the
experts of every MoE layer over an expert-parallel group (gloo on CPU, NCCL on GPU) and returns
the model; ``full_state_dict``/``load_full_state_dict`` convert between sharded models and the
single-device state dict, so checkpoints move between expert-parallel sizes. Placement
planning lives in ``placement.py``. Each layer gets two parts: storage (``ExpertParallelExperts``,
this rank's shard) and a dispatcher (``AllToAllDispatcher``). To add a strategy, write a
``moekit.layers.Dispatcher`` (and a storage if the shard layout differs) and assign them to
``layer.dispatcher`` / ``layer.experts``; never edit ``moekit.layers``.

Floor 4 (``tests/test_floors.py``): imports config, layers, blocks and models only; never its
floor-4 siblings convert and compress, nor anything above. Layout:

    distributed.py      data + expert parallel training support under torchrun (gradient sync)
    expert_parallel.py  ExpertParallelExperts (shard storage), AllToAllDispatcher, parallelize_experts,
                        full/sharded state-dict conversion
    placement.py        expert placement planning from a routing trace

Test a strategy against the single-device model on 2+ gloo processes (``tests/test_parallel.py``):
same logits and gradients, to float64 precision.
"""

from moekit.parallel.expert_parallel import (
    AllToAllDispatcher,
    ExpertParallelExperts,
    ddp_ignored_parameters,
    full_state_dict,
    load_full_state_dict,
    parallelize_experts,
)

__all__ = [
    "AllToAllDispatcher",
    "ExpertParallelExperts",
    "ddp_ignored_parameters",
    "full_state_dict",
    "load_full_state_dict",
    "parallelize_experts",
]
