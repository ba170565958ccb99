"""Named model configs: ``get_preset("moe-small")``.

Each preset is a function returning a fresh :class:`ModelConfig`; its docstring names the Hugging
Face family it maps onto. The default family is Qwen3-MoE
(https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json): explicit head_dim, per-head
q/k RMSNorm, softmax top-k with ``norm_topk_prob``, no attention or router biases, untied
embeddings. The dense twins have the same *active* parameters as their MoE preset (dense
``ffn_dim = top_k * expert ffn_dim``), so MoE-vs-dense comparisons are at equal compute per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig

# The main job's measured validation losses (docs/benchmarks.md, "MoE against dense"): means over
# seeds of `python benchmarks/moe_vs_dense.py train --variant moe-small dense-small`.
_MOE_SMALL_VAL = 3.1865
_DENSE_SMALL_VAL = 3.2195
_NUM_SEEDS = 3


def _qwen3_moe(dim: int, num_layers: int, expert_ffn_dim: int, vocab_size: int = 4096, **moe) -> ModelConfig:
    """Qwen3-MoE conventions with every layer MoE; ``moe`` overrides the MoEConfig template."""
    moe.setdefault("num_experts", 8)
    moe.setdefault("top_k", 2)
    moe.setdefault("norm_topk_prob", True)
    return ModelConfig(
        vocab_size=vocab_size,
        dim=dim,
        num_layers=num_layers,
        num_heads=8,
        num_kv_heads=4,
        head_dim=dim // 8,
        ffn_dim=expert_ffn_dim * moe["top_k"],  # used only if a layer is made dense later
        moe=MoEConfig(dim=dim, ffn_dim=expert_ffn_dim, **moe),
        moe_placement="all",
        qk_norm="per_head",
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def _dense_twin(moe_config: ModelConfig) -> ModelConfig:
    """The dense model with the MoE model's active parameters (FFN width top_k * expert width)."""
    assert moe_config.moe is not None
    return moe_config.replace(
        moe=None,
        moe_placement="none",
        ffn_dim=moe_config.moe.top_k * moe_config.moe.ffn_dim,
        aux_loss_coef=0.0,
        num_dense_first_layers=0,
    )


def moe_tiny() -> ModelConfig:
    """For tests: vocab 512, dim 64, 2 layers, 4 heads / 2 kv heads, 4 experts top-2 (F=64). Qwen3-MoE layout."""
    cfg = _qwen3_moe(dim=64, num_layers=2, expert_ffn_dim=64, vocab_size=512, num_experts=4)
    return cfg.replace(num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)


def moe_small_all() -> ModelConfig:
    """dim 256, 4 layers, 8/4 heads, 8 experts top-2 (F=512), every layer MoE: the main job's
    layout before issue 21, and the base of the paper presets below.

    Maps onto Qwen3-MoE (``Qwen3MoeForCausalLM``): q/k per-head RMSNorm, ``norm_topk_prob=True``,
    no biases, rope_theta 10000. About 15.5M parameters, 6.0M active per token.
    """
    return _qwen3_moe(dim=256, num_layers=4, expert_ffn_dim=512)


def moe_small() -> ModelConfig:
    """Default training job: moe-small-all with a dense first layer (DeepSeek's
    ``first_k_dense_replace = 1``; Qwen3-MoE's ``mlp_only_layers = [0]``), FFN width 1024.

    The first layer's router would route on raw token embeddings; kept dense, the MoE beats its
    dense twin at the main job's budget where the all-MoE layout loses to it (docs/benchmarks.md,
    ``benchmarks/moe_vs_dense.py``). About 13.1M parameters, 6.0M active per token.
    """
    return moe_small_all().replace(num_dense_first_layers=1)


def moe_base() -> ModelConfig:
    """Bigger: dim 512, 8 layers, 8/4 heads (head_dim 64), 8 experts top-2 (F=1024). Qwen3-MoE."""
    return _qwen3_moe(dim=512, num_layers=8, expert_ffn_dim=1024)


def dense_small() -> ModelConfig:
    """Dense twin of moe-small (FFN width 1024 = 2 x 512; same active parameters). Maps onto Qwen3."""
    return _dense_twin(moe_small())


def dense_base() -> ModelConfig:
    """Dense twin of moe-base (FFN width 2048; same active parameters). Maps onto Qwen3."""
    return _dense_twin(moe_base())


def smoe_dropout_small() -> ModelConfig:
    """moe-small with SMoE-Dropout's frozen random router (``router_type="random_fixed"``).

    The router never trains, so the balance loss is off. Maps onto Qwen3-MoE shapes (the router
    weights are just never updated); train with a growing ``moe_k`` schedule.
    """
    cfg = moe_small_all()
    assert cfg.moe is not None
    return cfg.replace(moe=cfg.moe.replace(router_type="random_fixed"), aux_loss_coef=0.0)


def topp_small() -> ModelConfig:
    """moe-small with top-p dynamic routing (p=0.4, "Harder Tasks Need More Experts").

    Weights are not renormalised (as the official code). The entropy loss pushes routing to be
    confident. Has no HF family; the shapes are Qwen3-MoE's.
    """
    cfg = moe_small_all()
    assert cfg.moe is not None
    return cfg.replace(moe=cfg.moe.replace(router_type="top_p", top_p=0.4), entropy_loss_coef=1e-4)


def moepp_small() -> ModelConfig:
    """moe-small as MoE++: 8 FFN + 1 zero + 1 copy + 2 constant experts, top-2, gating residual.

    Heterogeneous balance loss with tau 0.75 on the zero-computation experts. Not an HF family;
    the attention and FFN-expert shapes are Qwen3-MoE's.
    """
    cfg = moe_small_all()
    assert cfg.moe is not None
    moe = cfg.moe.replace(
        num_zero_experts=1,
        num_copy_experts=1,
        num_constant_experts=2,
        gating_residual=True,
        zero_expert_tau=0.75,
    )
    return cfg.replace(moe=moe)


def prmoe_small(experts: tuple[int, int] = (4, 8)) -> ModelConfig:
    """moe-small as a DeepSpeed PR-MoE: a pyramid (fewer experts in the early MoE layer than in the
    late one) of residual MoE layers (a dense MLP mixed with one top-1 expert), MoE every other
    layer (decoder layers 1 and 3).

    From the DeepSpeed-MoE example scripts, per the notes [code]: 350M model = 12 MoE layers every
    other layer, 32 experts in the first 10 and 64 in the last 2; residual MoE
    ``y = c0 * moe_top1(x) + c1 * mlp(x)``, ``[c0, c1] = softmax(Linear(D, 2)(x))``; top-1, aux
    coefficient 0.01. Here the pyramid is scaled down to ``experts`` for the two MoE layers. Not
    from the notes (DeepSpeed's ``top1gating`` as remembered, unconfirmed): the top-1 weight is the
    softmax probability, not renormalised to 1, hence ``norm_topk_prob=False``. DeepSpeed also trains
    with capacity factor 1.0 (min capacity 4) and drops overflow by *random token selection*; this
    preset is dropless like every moekit preset. For DeepSpeed's dropping set
    ``capacity_factor=1.0, min_capacity=4, drop_policy="random"`` (moekit's default
    ``drop_policy="score"`` keeps the highest-weight assignments instead). Not an HF family.
    """
    cfg = moe_small_all()
    assert cfg.moe is not None
    if not (len(experts) == 2 and 1 <= experts[0] <= experts[1]):
        raise ValueError(f"prmoe_small: experts must be two counts, early <= late (a pyramid), got {experts}")
    moe = cfg.moe.replace(num_experts=max(experts), top_k=1, norm_topk_prob=False, residual_moe=True)
    return cfg.replace(
        moe=moe, moe_placement="every_other", experts_per_layer=tuple(experts), aux_loss_coef=0.01
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "moe-tiny": moe_tiny,
    "moe-small": moe_small,
    "moe-small-all": moe_small_all,
    "moe-base": moe_base,
    "dense-small": dense_small,
    "dense-base": dense_base,
    "smoe-dropout-small": smoe_dropout_small,
    "topp-small": topp_small,
    "moepp-small": moepp_small,
    "prmoe-small": prmoe_small,
}


def list_presets() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` for preset ``name``; ValueError listing the names if unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available presets: {list_presets()}")
    return PRESETS[name]()


@dataclass(frozen=True)
class ReferenceRun:
    """What a preset reached on the main job's default budget (``TrainConfig()``: the stdlib,
    320 steps x 16 x 256 tokens, lr 2e-3), measured by ``benchmarks/moe_vs_dense.py`` and tabled in
    docs/benchmarks.md, beside its dense twin: mean validation loss over ``num_seeds`` seeds."""

    preset: str
    val_loss: float
    twin: str
    twin_val_loss: float
    num_seeds: int


def reference_run(preset: str) -> ReferenceRun | None:
    """The docs' measured main-job numbers for ``preset`` (None when it has none)."""
    runs = (
        ReferenceRun("moe-small", _MOE_SMALL_VAL, "dense-small", _DENSE_SMALL_VAL, _NUM_SEEDS),
        ReferenceRun("dense-small", _DENSE_SMALL_VAL, "moe-small", _MOE_SMALL_VAL, _NUM_SEEDS),
    )
    return next((r for r in runs if r.preset == preset), None)
