"""The adapter contract: how one Hugging Face family maps onto :class:`~moekit.models.ModelConfig`.

A family adapter answers three questions and nothing else:

1. ``config_from_hf(hf) -> ModelConfig``: translate an HF ``config.json`` dict, raising
   ``ValueError`` that names any option moekit cannot represent;
2. ``config_to_hf(cfg) -> dict``: the inverse, raising ``ValueError`` naming any moekit option the
   family cannot express;
3. ``targets(cfg) -> list[Target]``: for every moekit state-dict tensor, where its values live in
   the HF checkpoint. A :class:`Target` lists one or more alternative *layouts* (e.g. per-expert
   ``experts.{e}.gate_proj`` tensors, or transformers 5's fused ``experts.gate_up_proj``); each
   layout is a list of :class:`Piece` (an HF tensor and the slice of the moekit tensor it fills).
   Import takes the first layout whose tensors are all in the checkpoint; export writes the first.

HF tensor names appear only in the family adapters (``families/<model_type>.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.layers import MoEConfig
from moekit.models.config import ModelConfig

Index = tuple[Any, ...]


@dataclass(frozen=True)
class Piece:
    """One HF tensor ``key`` and the region ``index`` (a tuple of ints/slices) of the moekit tensor it fills.

    Optional layout changes, for checkpoints that store tensors other than moekit does (DBRX):

    * ``hf_rows``: the piece is only rows ``hf_rows`` of the HF tensor (a fused ``Wqkv`` split
      into q/k/v); export concatenates the pieces of one key in row order;
    * ``transpose``: the HF values are the region with its last two dims swapped;
    * ``flatten``: the HF tensor is the (transposed) region with its leading dims flattened into
      one, ``[E * F, D]`` for a region ``[E, F, D]``;
    * ``interleave_dim``: moekit dim of the region that holds ``[gate; up]`` halves, which the HF
      tensor stores interleaved (gate row j at 2j, up row j at 2j + 1; GPT-OSS ``gate_up_proj``);
    * ``mxfp4_scales``: ``key`` is the ``*_blocks`` tensor of an MXFP4 checkpoint and this names its
      ``*_scales``; import dequantizes them (:func:`~moekit.convert.mxfp4.dequantize_mxfp4`) to the
      HF values. Import only: export writes the dense layout.
    """

    key: str
    index: Index = ()
    hf_rows: slice | None = None
    transpose: bool = False
    flatten: bool = False
    interleave_dim: int | None = None
    mxfp4_scales: str | None = None

    @property
    def plain(self) -> bool:
        """Whether the HF tensor is the region as it is (no rows, transpose, flatten, interleave, MXFP4)."""
        return (
            self.hf_rows is None
            and not self.transpose
            and not self.flatten
            and self.interleave_dim is None
            and self.mxfp4_scales is None
        )

    def to_hf(self, region: Any) -> Any:
        """The HF values of this piece from the moekit ``region`` (a tensor)."""
        if self.interleave_dim is not None:
            region = _interleave(region, self.interleave_dim)
        out = region.mT if self.transpose else region
        return out.reshape(-1, out.shape[-1]) if self.flatten else out

    def from_hf(self, values: Any, region_shape: tuple[int, ...]) -> Any:
        """The moekit region's values from this piece's HF ``values`` (the inverse of :meth:`to_hf`)."""
        shape = list(region_shape)
        if self.transpose:
            shape[-1], shape[-2] = shape[-2], shape[-1]
        out = values.reshape(shape) if self.flatten else values
        out = out.mT if self.transpose else out
        return _deinterleave(out, self.interleave_dim) if self.interleave_dim is not None else out

    def hf_shape(self, region_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this piece's HF values must have for a moekit region of ``region_shape``."""
        shape = list(region_shape)
        if self.transpose:
            shape[-1], shape[-2] = shape[-2], shape[-1]
        if self.flatten:
            lead = 1
            for n in shape[:-1]:
                lead *= n
            shape = [lead, shape[-1]]
        return tuple(shape)


def _interleave(halves: torch.Tensor, dim: int) -> torch.Tensor:
    """``[gate; up]`` halves along ``dim`` -> alternating gate/up rows (gate j at 2j, up j at 2j + 1)."""
    d = dim % halves.dim()
    gate, up = halves.chunk(2, dim=d)
    return torch.stack([gate, up], dim=d + 1).flatten(d, d + 1)


def _deinterleave(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """Alternating gate/up rows along ``dim`` -> ``[gate; up]`` halves (the inverse of :func:`_interleave`)."""
    d = dim % rows.dim()
    index = torch.arange(rows.shape[d], device=rows.device)
    return rows.index_select(d, torch.cat([index[0::2], index[1::2]]))


@dataclass
class Target:
    """A moekit state-dict tensor ``name`` and its alternative HF layouts (the first is the export layout)."""

    name: str
    layouts: list[list[Piece]] = field(default_factory=list)

    @classmethod
    def copy(cls, name: str, *keys: str) -> Target:
        """A tensor stored whole under one of ``keys`` (alternative names, first is exported)."""
        return cls(name, [[Piece(k)] for k in keys])


def row_split(prefix_keys: list[str], rows: int) -> list[Piece]:
    """Pieces stacking HF tensors along dim 0 in ``rows``-row blocks (gate rows, then up rows)."""
    return [Piece(k, (slice(j * rows, (j + 1) * rows),)) for j, k in enumerate(prefix_keys)]


def expert_in_layouts(per_expert: list[tuple[str, str]], fused: str, num_experts: int, ffn_dim: int) -> list:
    """Layouts of moekit ``experts.w_in [E, 2F, D]``: per-expert (gate, up) key pairs, or one fused tensor."""
    pieces = []
    for e, (gate, up) in enumerate(per_expert):
        pieces.append(Piece(gate, (e, slice(0, ffn_dim))))
        pieces.append(Piece(up, (e, slice(ffn_dim, 2 * ffn_dim))))
    assert len(per_expert) == num_experts
    return [pieces, [Piece(fused)]]


def expert_out_layouts(per_expert: list[str], fused: str) -> list:
    """Layouts of moekit ``experts.w_out [E, D, F]``: per-expert down keys, or one fused tensor."""
    return [[Piece(k, (e,)) for e, k in enumerate(per_expert)], [Piece(fused)]]


class HFConfigReader:
    """Reads an HF ``config.json`` dict with the family's defaults and clear errors."""

    def __init__(self, hf: dict[str, Any], model_type: str, defaults: dict[str, Any]) -> None:
        self.hf, self.model_type, self.defaults = hf, model_type, defaults

    def get(self, key: str, default: Any = None) -> Any:
        """``hf[key]``, else the family default, else ``default``."""
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        return self.defaults.get(key, default)

    def first(self, *keys: str) -> Any:
        """The value of the first of ``keys`` present in the HF dict (aliases), else the first key's default."""
        for key in keys:
            if self.hf.get(key) is not None:
                return self.hf[key]
        return self.require(keys[0])

    def require(self, key: str) -> Any:
        """``hf[key]`` (or the family default); ValueError naming the key when absent."""
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.model_type} config.json: required option {key!r} is missing")
        return value

    def refuse(self, key: str, ok: Any, why: str) -> None:
        """ValueError naming ``key`` unless its value (with defaults) equals ``ok``."""
        value = self.get(key, ok)
        if value != ok:
            raise ValueError(
                f"{self.model_type} config.json: unsupported option {key}={value!r} ({why}); "
                f"moekit can only import {key}={ok!r}"
            )

    def partial_rotary_factor(self, default: float = 1.0) -> float:
        """``partial_rotary_factor`` from ``rope_parameters`` (transformers 5) or the top level."""
        params = self.hf.get("rope_scaling") or self.hf.get("rope_parameters") or {}
        factor = params.get("partial_rotary_factor") or self.hf.get("partial_rotary_factor")
        return float(default if factor is None else factor)

    def rope(self, default_theta: float, partial: bool = False) -> tuple[float, dict[str, Any] | None]:
        """``(rope_theta, rope_scaling)`` from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``.

        ``partial_rotary_factor`` is refused unless ``partial`` (the family reads it with
        :meth:`partial_rotary_factor`)."""
        params = dict(self.hf.get("rope_parameters") or {})
        theta = params.pop("rope_theta", None) or self.hf.get("rope_theta") or default_theta
        scaling = dict(self.hf.get("rope_scaling") or params)
        scaling.pop("rope_theta", None)
        factor = scaling.pop("partial_rotary_factor", None) or self.hf.get("partial_rotary_factor")
        if factor not in (None, 1, 1.0) and not partial:
            raise ValueError(
                f"{self.model_type} config.json: unsupported option partial_rotary_factor={factor!r} "
                "(moekit rotates the whole head)"
            )
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            return float(theta), None
        if rope_type not in ("linear", "yarn", "llama3"):
            raise ValueError(
                f"{self.model_type} config.json: unsupported option rope_type={rope_type!r} "
                "(moekit implements default, linear, yarn, llama3)"
            )
        scaling.pop("type", None)
        scaling["rope_type"] = rope_type
        return float(theta), scaling


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` for ``cfg``."""
    params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    for k, v in (cfg.rope_scaling or {}).items():
        if k not in ("rope_type", "type"):
            params[k] = v
    if cfg.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    return params


# Architecture fields of MoEConfig and their neutral values: a family that cannot express a
# non-neutral value refuses export naming the field. Training-only fields (noise, losses, backend,
# router_frozen, drop policy) do not change the forward pass and are not checked.
NEUTRAL_MOE = {
    "num_zero_experts": 0,
    "num_copy_experts": 0,
    "num_constant_experts": 0,
    "activation": "swiglu",
    "shared_ffn_dim": 0,
    "shared_expert_gate": False,
    "residual_moe": False,
    "router_type": "topk",
    "score_func": "softmax",
    "softmax_order": "before_topk",
    "routed_scaling_factor": 1.0,
    "num_expert_groups": 1,
    "num_limited_groups": 1,
    "use_expert_bias": False,
    "router_bias": False,
    "gating_residual": False,
    "capacity_factor": None,
    "ffn_bias": False,
    "weights_on_input": False,
    "output_bias": False,
    "swiglu_alpha": 1.702,
    "swiglu_limit": 7.0,
}


# ModelConfig family features and their neutral values (the same rule as NEUTRAL_MOE): an adapter
# lists the ones it expresses in ``model_features``; any other non-neutral value refuses export.
NEUTRAL_MODEL = {
    "partial_rotary_factor": 1.0,
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "attention_multiplier": None,
    "logits_scaling": 1.0,
    "clip_qkv": None,
    "norm_type": "rmsnorm",
    "norm_bias": False,
    "attention_out_bias": False,
    "lm_head_bias": False,
    "qk_norm_after_rope": False,
    "norm_placement": "pre",
    "attention_sinks": False,
    "attention_layer_types": None,
    "attention_chunk_size": None,
    "nope_layer_indices": None,
    "residual_scales": None,
    "attention_temperature_scale": None,
    "attention_floor_scale": 8192,
}


def refuse_export(family: str, option: str, value: Any, why: str) -> ValueError:
    """The ValueError HF export raises for an option the family cannot express."""
    return ValueError(f"cannot export to HF {family!r}: option {option}={value!r} is not expressible ({why})")


class FamilyAdapter:
    """Base class of family adapters (see the module docstring).

    Attributes:
        model_type: HF ``model_type`` handled.
        architecture: HF ``architectures[0]`` written on export.
    """

    model_type: str = ""
    architecture: str = ""
    # transformers keeps these routers in float32 whatever the run dtype (``_keep_in_fp32_modules``).
    fp32_routers: bool = False
    # The family has lightning (linear) attention layers (MiniMax).
    linear_layers: bool = False
    # ModelConfig fields of NEUTRAL_MODEL the family expresses (plus "rope_interleave" for GQA).
    model_features: frozenset[str] = frozenset()

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """Translates an HF config dict (ValueError naming an unsupported option)."""
        raise NotImplementedError

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """Translates a moekit config (ValueError naming an inexpressible option)."""
        raise NotImplementedError

    def targets(self, cfg: ModelConfig) -> list[Target]:
        """The key map: one :class:`Target` per moekit state-dict tensor."""
        raise NotImplementedError

    def matches(self, cfg: ModelConfig) -> bool:
        """Whether automatic family choice should pick this family for ``cfg`` (export)."""
        return False

    def derived_tensor(self, key: str) -> bool:
        """Whether HF tensor ``key`` is recomputable from others (import skips it silently)."""
        return False

    def derived_tensors(self, cfg: ModelConfig, state: dict[str, Any]) -> list[tuple[str, Any]]:
        """Extra ``(HF name, tensor)`` pairs export writes, computed from the moekit ``state``."""
        return []

    def check_mixers(self, cfg: ModelConfig) -> None:
        """Refuses Mamba layers, attention without RoPE and (but for MiniMax) linear-attention layers."""
        if "linear" in (cfg.layer_types or ()) and not self.linear_layers:
            raise refuse_export(self.model_type, "layer_types", "linear layers", "no linear attention")
        if cfg.mamba_layer_ids:
            raise refuse_export(self.model_type, "layer_types", "mamba layers", "an attention-only family")
        if not cfg.use_rope:
            raise refuse_export(self.model_type, "use_rope", False, "the family's attention uses RoPE")

    # Shared checks for MoE families.
    def check_model_features(self, cfg: ModelConfig) -> None:
        """Refuses :data:`NEUTRAL_MODEL` fields outside :attr:`model_features` (and GQA rope_interleave)."""
        for name, neutral in NEUTRAL_MODEL.items():
            if name not in self.model_features and getattr(cfg, name) != neutral:
                raise refuse_export(
                    self.model_type, name, getattr(cfg, name), "no HF equivalent in the family"
                )
        if (
            cfg.attention_type == "mha"
            and cfg.rope_interleave
            and "rope_interleave" not in self.model_features
        ):
            raise refuse_export(self.model_type, "rope_interleave", True, "the family rotates halves")

    def check_moe(self, cfg: ModelConfig, allowed: set[str] = frozenset()) -> MoEConfig:
        """Refuses MoE options outside :data:`NEUTRAL_MOE` (except ``allowed``) and per-layer expert counts."""
        self.check_model_features(cfg)
        self.check_mixers(cfg)
        moe = cfg.moe
        if moe is None or cfg.num_moe_layers == 0:
            raise refuse_export(
                self.model_type, "moe", None, "the family is an MoE family; the model is dense"
            )
        for name, neutral in NEUTRAL_MOE.items():
            if name not in allowed and getattr(moe, name) != neutral:
                raise refuse_export(self.model_type, f"moe.{name}", getattr(moe, name), "no HF equivalent")
        if cfg.experts_per_layer is not None and len(set(cfg.experts_per_layer)) > 1:
            raise refuse_export(
                self.model_type, "experts_per_layer", list(cfg.experts_per_layer), "HF uses one expert count"
            )
        if cfg.dense_ffn_activation != "swiglu" and cfg.num_moe_layers < cfg.num_layers:
            raise refuse_export(
                self.model_type, "dense_ffn_activation", cfg.dense_ffn_activation, "HF uses SiLU"
            )
        return moe

    def check_attention(
        self, cfg: ModelConfig, qk_norm: str = "none", bias: bool | None = False, sliding: bool = False
    ) -> None:
        """Refuses attention options the family lacks (``bias=None`` accepts either)."""
        self.check_model_features(cfg)
        self.check_mixers(cfg)
        if cfg.attention_type != "mha":
            raise refuse_export(self.model_type, "attention_type", cfg.attention_type, "the family uses GQA")
        if cfg.qk_norm != qk_norm:
            raise refuse_export(
                self.model_type, "qk_norm", cfg.qk_norm, f"the family uses qk_norm={qk_norm!r}"
            )
        if bias is not None and cfg.attention_bias != bias:
            raise refuse_export(
                self.model_type, "attention_bias", cfg.attention_bias, f"the family has bias={bias}"
            )
        if not sliding and cfg.sliding_window is not None:
            raise refuse_export(self.model_type, "sliding_window", cfg.sliding_window, "no sliding window")
