"""The registry of model families: the one place that knows which classes make up a family.

A family is a config dataclass, a model class built from it, and (for training) the objective and
the data module it trains with. The loader (:mod:`moekit.loader`), the model-folder reader
(:mod:`moekit.models.io`) and the training engine look families up here; nothing else in moekit
switches on a family's name.

A moekit model folder records its family in ``config.json`` as ``"moekit_family"`` (folders
written before families existed have none and are the causal LM).

To add a family:
    1. write its config (a :class:`moekit.config.JsonConfig`) and its model (an ``nn.Module``
       whose ``__init__`` takes the config and whose ``config`` attribute holds it);
    2. add a :class:`ModelFamily` entry to :func:`_build_families` below;
    3. give it an objective and a data module if it trains (see ``moekit.models.objectives`` and
       ``moekit.data``), and set ``task`` when it is not a causal LM.
The table is built once, on first use, from constants: it is not mutable state.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

from moekit.config import JsonConfig

DEFAULT_FAMILY = "causal_lm"


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    Attributes:
        name: the family's id, stored in model folders as ``"moekit_family"``.
        config_cls: its config dataclass (``from_dict``/``to_dict`` round-trip through JSON).
        model_cls: the ``nn.Module`` built as ``model_cls(config)``.
        description: one line for ``--help`` texts and error messages.
        objective_cls: the training objective (``moekit.models.objectives``), or None.
        data_module_cls: the default data module (``moekit.data``), or None.
        hf_exporter: ``"module:function"`` writing the model as a Hugging Face folder, or None.
            A name rather than an import, because exporters live on a higher floor (``convert``)
            than the models they export; it is resolved only when a user asks for ``format="hf"``.
        task: what the model does, so each tool picks the families it can drive: ``"causal_lm"``
            (text: ``moekit train``, ``generate``, ``serve``) or ``"forecast"`` (time series:
            ``moekit ts-train``, ``forecast``, ``ts-eval``). A forecast family's model has
            ``forecast(histories, horizon) -> [N, horizon]`` point forecasts in raw units (and may
            have ``forecast_samples(histories, horizon, num_samples) -> [N, S, horizon]``); its
            config module has a ``PRESETS`` dict (name -> config function, the first is the
            default); its objective has ``for_config(config)`` and its data module
            ``for_model(SeriesDataConfig, config)`` (see ``moekit.train.forecasting``).
    """

    name: str
    config_cls: type[JsonConfig]
    model_cls: type[nn.Module]
    description: str
    objective_cls: type | None = None
    data_module_cls: type | None = None
    hf_exporter: str | None = None
    task: str = "causal_lm"

    def build(self, config: JsonConfig) -> nn.Module:
        """A fresh model of this family from ``config``."""
        return self.model_cls(config)

    def resolve_hf_exporter(self):
        """The Hugging Face export function, or ValueError when the family has none."""
        if self.hf_exporter is None:
            raise ValueError(
                f"the {self.name} family has no Hugging Face format; save it with format='moekit'"
            )
        module, _, attr = self.hf_exporter.partition(":")
        return getattr(importlib.import_module(module), attr)


@functools.cache
def _build_families() -> dict[str, ModelFamily]:
    from moekit.data import TextDataModule
    from moekit.models.config import ModelConfig
    from moekit.models.decoder import MoEForCausalLM
    from moekit.models.moirai import MoiraiMoEConfig, MoiraiMoEModel
    from moekit.models.moirai_train import MoiraiDataModule, MoiraiObjective
    from moekit.models.objectives import CausalLMObjective
    from moekit.models.timemoe import TimeMoEConfig, TimeMoEForecaster
    from moekit.models.timemoe_train import SeriesDataModule, TimeMoEObjective

    entries = [
        ModelFamily(
            name=DEFAULT_FAMILY,
            config_cls=ModelConfig,
            model_cls=MoEForCausalLM,
            description="decoder-only language model with dense or MoE FFNs (GQA or MLA attention)",
            objective_cls=CausalLMObjective,
            data_module_cls=TextDataModule,
            hf_exporter="moekit.convert:save_hf",
        ),
        ModelFamily(
            name="timemoe",
            config_cls=TimeMoEConfig,
            model_cls=TimeMoEForecaster,
            description="Time-MoE forecaster: point-wise tokens, MoE decoder, multi-horizon heads",
            objective_cls=TimeMoEObjective,
            data_module_cls=SeriesDataModule,
            task="forecast",
        ),
        ModelFamily(
            name="moirai_moe",
            config_cls=MoiraiMoEConfig,
            model_cls=MoiraiMoEModel,
            description="Moirai-MoE patch forecaster: mixture-distribution head, token-cluster gated MoE FFNs",
            objective_cls=MoiraiObjective,
            data_module_cls=MoiraiDataModule,
            task="forecast",
        ),
        _vision_family("vit_moe"),
        _vision_family("clip_moe"),
        _vision_family("moe_llava"),
        _vision_family("uni_moe"),
        _vision_family("siglip"),
    ]
    return {family.name: family for family in entries}


def _vision_family(name: str) -> ModelFamily:
    from moekit.data.images import DigitsDataModule, ShapesCaptionDataModule
    from moekit.models import vision

    if name == "uni_moe":
        from moekit.models.vision.unimoe import UniMoE, UniMoEConfig

        return ModelFamily(
            name="uni_moe",
            config_cls=UniMoEConfig,
            model_cls=UniMoE,
            description="Uni-MoE: ViT and 1-D signal encoders, a connector per modality, moekit LM (LoRA experts)",
        )
    if name == "siglip":
        from moekit.models.vision.siglip import SigLIPConfig, SigLIPMoE

        return ModelFamily(
            name="siglip",
            config_cls=SigLIPConfig,
            model_cls=SigLIPMoE,
            description="SigLIP dual encoder (MAP-pooled ViT, last-token text tower, logit bias); imports HF SiglipModel",
        )
    if name == "moe_llava":
        from moekit.models.vision.llava import MoELLaVA, VLMConfig

        return ModelFamily(
            name="moe_llava",
            config_cls=VLMConfig,
            model_cls=MoELLaVA,
            description="LLaVA-style VLM: ViT tower, MLP projector, moekit LM (dense or MoE)",
            hf_exporter="moekit.convert.families.llava:save_llava_hf",
        )
    if name == "vit_moe":
        return ModelFamily(
            name="vit_moe",
            config_cls=vision.ViTConfig,
            model_cls=vision.ViTMoE,
            description="ViT classifier with dense or MoE FFNs, optionally task-level MoE with per-task heads",
            objective_cls=vision.ClassificationObjective,
            data_module_cls=DigitsDataModule,
        )
    return ModelFamily(
        name="clip_moe",
        config_cls=vision.CLIPConfig,
        model_cls=vision.CLIPMoE,
        description="CLIP dual encoder (ViT image tower, causal text tower) with dense or MoE FFNs",
        objective_cls=vision.ContrastiveObjective,
        data_module_cls=ShapesCaptionDataModule,
        hf_exporter="moekit.convert.families.clip:save_clip_hf",
    )


def families() -> tuple[ModelFamily, ...]:
    """Every registered family, in registration order."""
    return tuple(_build_families().values())


def families_for_task(task: str) -> tuple[ModelFamily, ...]:
    """The registered families whose :attr:`ModelFamily.task` is ``task``, in registration order."""
    return tuple(f for f in families() if f.task == task)


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; ValueError listing the registered ones otherwise."""
    table = _build_families()
    if name not in table:
        raise ValueError(f"unknown model family {name!r}; moekit has {sorted(table)}")
    return table[name]


def family_of(obj: Any) -> ModelFamily:
    """The family of a model instance or of a config instance (ValueError when none matches)."""
    for family in families():
        if isinstance(obj, (family.model_cls, family.config_cls)):
            return family
    config = getattr(obj, "config", None)
    for family in families():
        if config is not None and isinstance(config, family.config_cls):
            return family
    raise ValueError(
        f"{type(obj).__name__} is not a model or config of a registered family "
        f"({[f.name for f in families()]})"
    )
