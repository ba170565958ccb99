"""Sparse upcycling: a dense model's FFNs become MoE layers (Komatsuzaki et al. 2022; MoE-LLaVA
stage III; AquilaMoE scale-out; SMoE-Dropout's split for ``expert_init="split"``).

Shape legend: D = model width, F = dense FFN width, H = input-projection rows (2F for SwiGLU),
E = experts, f = F / E (split slice width), N = calibration tokens.

Exactness at init (tested in float64):

* ``expert_init="copy"`` with a softmax router, ``norm_topk_prob=True`` (or ``top_k = E``), no
  capacity limit and no router noise: each token's weights sum to 1 over identical experts, so the
  MoE output equals the dense FFN whatever the router. This holds for every router init.
* ``expert_init="split"``: expert e holds hidden units ``[e f, (e+1) f)``; the dense FFN is the
  *sum* of the slices, so the model is unchanged only when every slice is used with weight exactly 1:
  ``top_k = E``, ``norm_topk_prob=False``, a zero router (softmax gives 1/E each) and
  ``routed_scaling_factor = E`` (:meth:`UpcycleConfig.exact_split`). With a learned router the
  weights stop being uniform as soon as it trains; that is the intended granular MoE.
* ``expert_init="noise"`` is not exact by construction.
* LoRA experts (Uni-MoE; :meth:`UpcycleConfig.lora`, ``moe_overrides={"expert_kind": "lora"}``):
  the dense FFN becomes the frozen shared base and every adapter's B is zero, so each expert is
  the dense FFN and the model is unchanged under the same router conditions as ``"copy"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.config import JsonConfig, check_choice
from moekit.layers import MoEConfig
from moekit.models import ModelConfig, MoEForCausalLM
from moekit.surgery.common import (
    Batches,
    as_batches,
    build_model,
    clone_state,
    collect_ffn_inputs,
    dense_ffn,
    kmeans,
    model_dtype,
    router_rows_from_directions,
)

LAYER_CHOICES = ("all", "every_other", "explicit")
EXPERT_INITS = ("copy", "noise", "split")
ROUTER_INITS = ("zeros", "random", "kmeans")


@dataclass(kw_only=True)
class UpcycleConfig(JsonConfig):
    """How to turn dense FFNs into MoE layers.

    Attributes:
        layers: ``"all"``, ``"every_other"`` (odd layers 1, 3, ..., as sparse upcycling's "every
            other") or ``"explicit"`` (exactly ``layer_indices``).
        layer_indices: the layers for ``"explicit"``.
        num_experts: E.
        top_k: experts per token.
        expert_init: ``"copy"`` (exact copies, MoE-LLaVA / sparse upcycling), ``"noise"`` (copies
            plus ``noise_std`` x the weight's std of Gaussian noise), or ``"split"`` (expert e gets
            hidden units ``[e F/E, (e+1) F/E)``, SMoE-Dropout / granular upcycling; F % E == 0).
        noise_std: relative noise scale for ``"noise"``.
        router_init: ``"zeros"`` (uniform routing; top-k picks are arbitrary ties until it trains),
            ``"random"`` (N(0, router_std), AquilaMoE), or ``"kmeans"`` (rows = spherical k-means
            centroids of each layer's FFN inputs on calibration data, scaled to ``router_logit_std``).
        router_std: std of the ``"random"`` init.
        router_logit_std: logit std on the calibration data for ``"kmeans"`` rows.
        kmeans_iters: Lloyd iterations.
        moe_overrides: other :class:`~moekit.layers.MoEConfig` fields (e.g. ``capacity_factor``,
            ``norm_topk_prob``, ``routed_scaling_factor``); ``dim``/``ffn_dim``/``num_experts``/
            ``top_k``/``activation`` are set here and may not be overridden.
        aux_loss_coef: the upcycled model's load-balance coefficient (AquilaMoE: 1e-3).
        seed: seeds noise, the random router and k-means.
    """

    layers: str = "all"
    layer_indices: tuple[int, ...] | None = None
    num_experts: int = 8
    top_k: int = 2
    expert_init: str = "copy"
    noise_std: float = 0.01
    router_init: str = "random"
    router_std: float = 0.02
    router_logit_std: float = 1.0
    kmeans_iters: int = 25
    moe_overrides: dict[str, Any] = field(default_factory=dict)
    aux_loss_coef: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        name = "UpcycleConfig"
        check_choice(name, "layers", self.layers, LAYER_CHOICES)
        check_choice(name, "expert_init", self.expert_init, EXPERT_INITS)
        check_choice(name, "router_init", self.router_init, ROUTER_INITS)
        if self.layer_indices is not None:
            self.layer_indices = tuple(self.layer_indices)
        if self.layers == "explicit" and not self.layer_indices:
            raise ValueError(f"{name}.layer_indices is required when layers='explicit'")
        if self.layers != "explicit" and self.layer_indices is not None:
            raise ValueError(f"{name}.layer_indices is only used with layers='explicit'")
        if self.num_experts < 1:
            raise ValueError(f"{name}.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{name}.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        for f in ("noise_std", "router_std", "aux_loss_coef"):
            if getattr(self, f) < 0:
                raise ValueError(f"{name}.{f} must be >= 0, got {getattr(self, f)}")
        if self.router_logit_std <= 0:
            raise ValueError(f"{name}.router_logit_std must be positive, got {self.router_logit_std}")
        if self.kmeans_iters < 1:
            raise ValueError(f"{name}.kmeans_iters must be >= 1, got {self.kmeans_iters}")
        reserved = sorted({"dim", "ffn_dim", "num_experts", "top_k", "activation"} & set(self.moe_overrides))
        if reserved:
            raise ValueError(f"{name}.moe_overrides may not set {reserved}; use the UpcycleConfig fields")
        unknown = sorted(set(self.moe_overrides) - set(MoEConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{name}.moe_overrides has unknown MoEConfig field(s) {unknown}")
        if self.moe_overrides.get("expert_kind") == "lora" and self.expert_init != "copy":
            raise ValueError(
                f"{name}.expert_init={self.expert_init!r}: LoRA experts share the dense FFN as their base; "
                "use expert_init='copy'"
            )

    @classmethod
    def lora(cls, num_experts: int, rank: int = 8, alpha: float = 16.0, **changes: Any) -> UpcycleConfig:
        """Uni-MoE's LoRA experts: the dense FFN is the frozen base of ``num_experts`` experts,
        each with rank-``rank`` adapters on every projection (B = 0: exact at init)."""
        overrides = {"expert_kind": "lora", "lora_rank": rank, "lora_alpha": float(alpha)}
        overrides.update(changes.pop("moe_overrides", {}))
        return cls(num_experts=num_experts, expert_init="copy", moe_overrides=overrides, **changes)

    @classmethod
    def exact_split(cls, num_experts: int, **changes: Any) -> UpcycleConfig:
        """The function-preserving split: E slices, all used (k = E) with weight exactly 1
        (zero router -> softmax 1/E, ``norm_topk_prob=False``, ``routed_scaling_factor=E``)."""
        overrides = {"norm_topk_prob": False, "routed_scaling_factor": float(num_experts)}
        overrides.update(changes.pop("moe_overrides", {}))
        return cls(
            num_experts=num_experts,
            top_k=num_experts,
            expert_init="split",
            router_init="zeros",
            moe_overrides=overrides,
            **changes,
        )


def upcycle_layer_ids(model_config: ModelConfig, config: UpcycleConfig) -> list[int]:
    """The decoder layers ``config`` upcycles in a model with ``model_config``."""
    num_layers = model_config.num_layers
    if config.layers == "all":
        return list(range(num_layers))
    if config.layers == "every_other":
        return [i for i in range(num_layers) if i % 2 == 1]
    bad = [i for i in config.layer_indices or () if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"UpcycleConfig.layer_indices {bad} out of range [0, {num_layers})")
    return sorted(set(config.layer_indices or ()))


def upcycled_model_config(model_config: ModelConfig, config: UpcycleConfig) -> ModelConfig:
    """The :class:`ModelConfig` of the upcycled model (dense layers keep ``ffn_dim``)."""
    if model_config.num_moe_layers:
        raise ValueError(
            f"upcycle: the model already has MoE layers {model_config.moe_layer_ids}; upcycle a dense model"
        )
    layer_ids = upcycle_layer_ids(model_config, config)
    if not layer_ids:
        raise ValueError("upcycle: the chosen layers are empty (a 1-layer model has no odd layer)")
    ffn_dim = model_config.ffn_dim
    if config.expert_init == "split":
        if ffn_dim % config.num_experts:
            raise ValueError(
                f"UpcycleConfig.expert_init='split' needs num_experts={config.num_experts} to divide the "
                f"FFN width {ffn_dim}"
            )
        ffn_dim //= config.num_experts
    moe = MoEConfig(
        dim=model_config.dim,
        ffn_dim=ffn_dim,
        num_experts=config.num_experts,
        top_k=config.top_k,
        activation=model_config.dense_ffn_activation,
        **config.moe_overrides,
    )
    if moe.shared_ffn_dim or moe.residual_moe or moe.num_total_experts != moe.num_experts:
        raise ValueError(
            "UpcycleConfig.moe_overrides: shared experts, residual MoE and zero-computation experts have no "
            "dense source to copy from; upcycle without them"
        )
    all_layers = layer_ids == list(range(model_config.num_layers))
    return model_config.replace(
        moe=moe,
        moe_placement="all" if all_layers else "explicit",
        moe_layer_indices=None if all_layers else tuple(layer_ids),
        num_dense_first_layers=0,
        moe_layer_freq=1,
        experts_per_layer=None,
        aux_loss_coef=config.aux_loss_coef,
    )


def expert_weights_from_ffn(
    w_in_HD: torch.Tensor,
    w_out_DF: torch.Tensor,
    config: UpcycleConfig,
    activation: str,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights from one dense FFN: ``(w_in [E, H', D], w_out [E, D, F'])`` with
    ``F' = F`` (copy, noise) or ``F / E`` (split)."""
    num_e = config.num_experts
    if config.expert_init == "split":
        ffn = w_out_DF.shape[1]
        width = ffn // num_e
        ins, outs = [], []
        for e in range(num_e):
            cols = slice(e * width, (e + 1) * width)
            if activation == "swiglu":
                gate, up = w_in_HD[:ffn], w_in_HD[ffn:]
                ins.append(torch.cat([gate[cols], up[cols]]))
            else:
                ins.append(w_in_HD[cols])
            outs.append(w_out_DF[:, cols])
        return torch.stack(ins), torch.stack(outs)
    w_in = w_in_HD.unsqueeze(0).repeat(num_e, 1, 1)
    w_out = w_out_DF.unsqueeze(0).repeat(num_e, 1, 1)
    if config.expert_init == "noise" and config.noise_std > 0:
        for w in (w_in, w_out):
            scale = float(w[0].to(torch.float64).std()) * config.noise_std
            w.add_(torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype) * scale)
    return w_in, w_out


@torch.no_grad()
def upcycle(
    dense_model: MoEForCausalLM, config: UpcycleConfig, calibration: Batches | None = None
) -> MoEForCausalLM:
    """Sparse upcycling: copies every non-FFN weight and turns the chosen dense FFNs into MoE layers.

    Args:
        dense_model: a dense moekit model (no MoE layer); not modified.
        config: :class:`UpcycleConfig`.
        calibration: ``[B, S]`` token batches, needed for ``router_init="kmeans"`` (the FFN inputs
            of each upcycled layer are clustered into E centroids).

    Returns:
        A new :class:`MoEForCausalLM` in ``dense_model``'s dtype, in eval mode. Expert weights are
        ``[E, H, D]`` / ``[E, D, F]`` stacks of the dense ``w_in`` ``[H, D]`` / ``w_out`` ``[D, F]``.
    """
    src_cfg = dense_model.config
    new_cfg = upcycled_model_config(src_cfg, config)
    layer_ids = new_cfg.moe_layer_ids
    if config.router_init == "kmeans" and not as_batches(calibration):
        raise ValueError("upcycle: router_init='kmeans' needs calibration batches")
    gen = torch.Generator().manual_seed(config.seed)
    state = clone_state(dense_model)
    feats = collect_ffn_inputs(dense_model, calibration, layer_ids) if config.router_init == "kmeans" else {}
    activation = src_cfg.dense_ffn_activation
    for i in layer_ids:
        ffn = dense_ffn(dense_model, i)
        prefix = f"layers.{i}.mlp."
        for k in [k for k in state if k.startswith(prefix)]:
            del state[k]
        moe = new_cfg.moe_config(i)
        if moe.expert_kind == "lora":
            state.update(_lora_expert_state(prefix + "experts.", ffn, moe, gen))
        else:
            w_in, w_out = expert_weights_from_ffn(ffn.w_in.weight, ffn.w_out.weight, config, activation, gen)
            state[prefix + "experts.w_in"] = w_in.clone()
            state[prefix + "experts.w_out"] = w_out.clone()
        state.update(_router_state(prefix, new_cfg.moe_config(i), config, feats.get(i), gen, i))
    model = build_model(new_cfg, state, model_dtype(dense_model))
    return model


def _lora_expert_state(prefix: str, ffn, moe: MoEConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # The dense FFN is the shared base; A ~ U(+-1/sqrt(fan_in)) (PEFT's bound), B = 0.
    num_e, rank, dim, ffn_dim = moe.num_experts, moe.lora_rank, moe.dim, moe.ffn_dim
    num_p = ffn.w_in.weight.shape[0] // ffn_dim

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) / fan_in**0.5

    return {
        prefix + "w_in": ffn.w_in.weight.clone(),
        prefix + "w_out": ffn.w_out.weight.clone(),
        prefix + "lora_in_A": uniform((num_e, num_p, rank, dim), dim),
        prefix + "lora_in_B": torch.zeros(num_e, num_p, ffn_dim, rank, dtype=torch.float64),
        prefix + "lora_out_A": uniform((num_e, rank, ffn_dim), ffn_dim),
        prefix + "lora_out_B": torch.zeros(num_e, dim, rank, dtype=torch.float64),
    }


def _router_state(
    prefix: str,
    moe: MoEConfig,
    config: UpcycleConfig,
    x_ND: torch.Tensor | None,
    gen: torch.Generator,
    layer: int,
) -> dict[str, torch.Tensor]:
    num_e, dim = moe.num_total_experts, moe.dim
    if config.router_init == "zeros":
        weight = torch.zeros(num_e, dim, dtype=torch.float64)
    elif config.router_init == "random":
        weight = torch.randn(num_e, dim, generator=gen, dtype=torch.float64) * config.router_std
    else:
        assert x_ND is not None
        cents, _ = kmeans(x_ND, num_e, config.kmeans_iters, seed=config.seed + layer)
        weight = router_rows_from_directions(cents, x_ND, config.router_logit_std)
    out = {prefix + "router.weight": weight}
    if moe.router_bias or moe.router_type == "random_fixed":
        out[prefix + "router.bias"] = torch.zeros(num_e, dtype=torch.float64)
    if moe.gating_residual:
        out[prefix + "router.residual_weight"] = torch.zeros(num_e, num_e, dtype=torch.float64)
    if moe.use_expert_bias:
        out[prefix + "router.expert_bias"] = torch.zeros(num_e, dtype=torch.float64)
    return out
