"""MoE-LLaVA's model: a vision tower, an MLP projector and a moekit LM, with image features
spliced into the text at image placeholder tokens (LLaVA's convention).

Shape legend: B = texts, S = text length, N = images in the batch, P = features per image,
Dv = vision width, D = LM width, V = vocabulary.

Splicing: the text holds ``P`` copies of ``image_token_id`` per image (the processor expands one
placeholder to ``image_seq_length`` tokens, as transformers' LLaVA does). ``pixel_values`` holds
the batch's images in reading order (row 0's images first); the k-th run of P placeholders is
replaced by the projected features of image k. Rows may hold 0, 1 or more images, and padding may
be on the left.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.config import JsonConfig, check_choice
from moekit.data.images import ImagePreprocess
from moekit.models.config import ModelConfig
from moekit.models.decoder import CausalLMOutput, MoEForCausalLM
from moekit.models.param_groups import module_param_names, moe_parameter_groups
from moekit.models.vision.config import ViTConfig
from moekit.models.vision.vit import ViTMoE

SELECT_STRATEGIES = ("default", "full")


@dataclass(kw_only=True)
class VLMConfig(JsonConfig):
    """A LLaVA-style vision-language model.

    Attributes:
        vision: the image tower (no head).
        text: the moekit LM (dense or MoE).
        image_token_id: the placeholder id (inside the LM's vocabulary).
        vision_feature_layer: transformers' index into the tower's hidden states (-2: the
            second-to-last layer's output, LLaVA's default).
        vision_feature_select_strategy: ``"default"`` drops the CLS feature, ``"full"`` keeps it.
        projector_bias: biases in the two projector linears.
    """

    vision: ViTConfig
    text: ModelConfig
    image_token_id: int
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_bias: bool = True

    def __post_init__(self) -> None:
        check_choice(
            "VLMConfig",
            "vision_feature_select_strategy",
            self.vision_feature_select_strategy,
            SELECT_STRATEGIES,
        )
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"VLMConfig.image_token_id={self.image_token_id} is outside the LM vocabulary")
        if self.vision.num_classes or self.vision.task_num_classes:
            raise ValueError("VLMConfig.vision must have no classification head")
        n = self.vision.num_layers
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise ValueError(
                f"VLMConfig.vision_feature_layer={self.vision_feature_layer} is outside [-{n + 1}, {n}]"
            )

    @property
    def image_seq_length(self) -> int:
        """P: placeholder tokens (features) per image."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra


class MultiModalProjector(nn.Module):
    """``linear_2(gelu(linear_1(x)))``: ``[..., Dv] -> [..., D]`` (LLaVA's ``mlp2x_gelu``)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Projects vision features into the LM's embedding space."""
        return self.linear_2(self.act(self.linear_1(x)))


def splice_image_features(
    embeds_BSD: Tensor, input_ids_BS: Tensor, features_NPD: Tensor | None, image_token_id: int
) -> Tensor:
    """Replaces the placeholder embeddings, in reading order, by the image features.

    Raises:
        ValueError: the placeholder count is not ``N * P`` (one line naming both counts).
    """
    is_image_BS = input_ids_BS == image_token_id
    num_slots = int(is_image_BS.sum())
    num_feats = 0 if features_NPD is None else features_NPD.shape[0] * features_NPD.shape[1]
    if num_slots != num_feats:
        per = "?" if features_NPD is None else features_NPD.shape[1]
        raise ValueError(
            f"the text holds {num_slots} image placeholder tokens but the images give {num_feats} features "
            f"({0 if features_NPD is None else features_NPD.shape[0]} images x {per}); expand each image "
            "placeholder to image_seq_length tokens"
        )
    if num_slots == 0:
        return embeds_BSD
    out = embeds_BSD.clone()
    # Boolean indexing walks rows then positions: exactly the reading order of the images.
    out[is_image_BS] = features_NPD.reshape(-1, features_NPD.shape[-1]).to(out.dtype)
    return out


IMAGE_MARKER = "<image>"
PREPROCESS_FILE = "image_preprocess.json"


def image_prompt_ids(
    encode: Callable[[str], list[int]], text: str, num_images: int, config: VLMConfig
) -> list[int]:
    """Prompt ids with ``image_seq_length`` placeholders per image, LLaVA-style.

    Each ``<image>`` marker in ``text`` marks where the next image goes; with no marker the
    images come first (LLaVA's default prompt puts the image before the question). ``encode``
    turns a text piece into ids.

    Raises:
        ValueError: the markers do not match ``num_images``.
    """
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) == 1 and num_images:
        pieces = [""] * num_images + pieces
    if len(pieces) - 1 != num_images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_MARKER} markers for {num_images} image(s)")
    slots = [config.image_token_id] * config.image_seq_length
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids += slots
        if piece:
            ids += encode(piece)
    return ids


def image_preprocess(config: VLMConfig, folder: str | Path | None = None) -> ImagePreprocess:
    """The preprocessing of this VLM's images: ``folder/image_preprocess.json`` when present, else
    the tower's size and channels with mean = std = 0.5 on [0, 1] pixels (what moekit's image data
    modules train with). Inputs are :func:`moekit.data.images.read_image` arrays (``value_range`` 1)."""
    if folder is not None and (Path(folder) / PREPROCESS_FILE).is_file():
        prep = ImagePreprocess.from_json(Path(folder) / PREPROCESS_FILE)
    else:
        prep = ImagePreprocess(
            size=config.vision.image_size, channels=config.vision.num_channels, value_range=1.0
        )
    if (prep.size, prep.channels) != (config.vision.image_size, config.vision.num_channels):
        raise ValueError(
            f"{PREPROCESS_FILE}: size/channels {prep.size}/{prep.channels} do not match the vision tower's "
            f"{config.vision.image_size}/{config.vision.num_channels}"
        )
    return prep


class MoELLaVA(nn.Module):
    """Vision tower + projector + moekit LM (dense, or MoE after stage-3 upcycling).

    Submodules: ``vision_tower`` (:class:`ViTMoE`), ``projector`` (:class:`MultiModalProjector`),
    ``language_model`` (:class:`~moekit.models.MoEForCausalLM`).
    """

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = ViTMoE(config.vision)
        self.projector = MultiModalProjector(config.vision.dim, config.text.dim, config.projector_bias)
        self.language_model = MoEForCausalLM(config.text)

    def tie_weights(self) -> None:
        """Ties the LM's head to its embedding when its config says so."""
        self.language_model.tie_weights()

    def tied_weight_names(self) -> list[str]:
        """The LM's tied names, prefixed."""
        return [f"language_model.{n}" for n in self.language_model.tied_weight_names()]

    def parameter_groups(self) -> dict[str, list[str]]:
        """The MoE groups plus ``vision_tower``, ``projector``, ``language_model`` and ``lm_moe``
        (the LM's routers and experts: what MoE-LLaVA's stage 3 trains)."""
        groups = moe_parameter_groups(self)
        groups["vision_tower"] = module_param_names(self.vision_tower, "vision_tower")
        groups["projector"] = module_param_names(self.projector, "projector")
        groups["language_model"] = module_param_names(self.language_model, "language_model")
        lm = set(groups["language_model"])
        groups["lm_moe"] = [n for n in groups["router"] + groups["experts"] if n in lm]
        return groups

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """``[N, P, D]``: the tower's ``vision_feature_layer`` states, selected and projected."""
        cfg = self.config
        hidden = self.vision_tower.hidden_state(pixel_values, cfg.vision_feature_layer).hidden
        if cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return self.projector(hidden)

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        moe_k: int | None = None,
    ) -> CausalLMOutput:
        """HF-style: ``model(input_ids=..., pixel_values=..., attention_mask=...)`` -> ``.logits [B, S, V]``."""
        embeds = self.language_model.embed_tokens(input_ids)
        feats = None if pixel_values is None else self.image_features(pixel_values)
        embeds = splice_image_features(embeds, input_ids, feats, self.config.image_token_id)
        return self.language_model(
            input_ids, attention_mask=attention_mask, labels=labels, moe_k=moe_k, inputs_embeds=embeds
        )

    @torch.no_grad()
    def spliced_embeds(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """``[B, S, D]``: the text embeddings with the image features at the placeholders."""
        embeds = self.language_model.embed_tokens(input_ids)
        feats = None if pixel_values is None else self.image_features(pixel_values)
        return splice_image_features(embeds, input_ids, feats, self.config.image_token_id)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 20,
        use_cache: bool = True,
        moe_k: int | None = None,
        **sampling,
    ) -> Tensor:
        """Generates up to ``max_new_tokens`` per row after an image + text prompt; ``[B, S + N]`` ids.

        The prompt (``input_ids [B, S]``, left-padded, with ``image_seq_length`` placeholders per
        image; ``pixel_values [N, C, H, W]`` in reading order) is prefilled once with the spliced
        embeddings, then the LM decodes with its KV cache (its :class:`DecodeSession`, fast path
        included). ``use_cache=False`` recomputes the whole spliced sequence per token (the
        reference). ``sampling``: :func:`moekit.models.generation.generate`'s other keywords
        (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``pad_token_id``,
        ``generator``, ``streamer``, ``sampler``).
        """
        from moekit.models.decode import DecodeSession
        from moekit.models.generation import generate

        if "source" in sampling or "compile" in sampling:
            raise ValueError("MoELLaVA.generate builds its own decode session (no source=/compile=)")
        was_training = self.training
        self.eval()
        try:
            embeds = self.spliced_embeds(input_ids, pixel_values)
            if use_cache:
                source = DecodeSession(
                    self.language_model,
                    input_ids,
                    attention_mask,
                    max(max_new_tokens, 0),
                    moe_k=moe_k,
                    inputs_embeds=embeds,
                )
            else:
                source = _VLMRecomputeSource(self, input_ids, pixel_values, attention_mask, moe_k)
            return generate(
                self.language_model,
                input_ids,
                attention_mask,
                max_new_tokens,
                source=source,
                compile=False,
                **sampling,
            )
        finally:
            self.train(was_training)


class _VLMRecomputeSource:
    """``use_cache=False``: the LM forward over the whole spliced sequence every step (the reference).

    Generated tokens are embedded as text (an id equal to the placeholder is not an image slot).
    """

    def __init__(self, vlm: MoELLaVA, input_ids, pixel_values, attention_mask, moe_k) -> None:
        self.lm, self.moe_k, self.ids_BN = vlm.language_model, moe_k, input_ids
        self.embeds_BND = vlm.spliced_embeds(input_ids, pixel_values)
        self.mask_BN = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()

    def _scores(self) -> Tensor:
        out = self.lm(
            self.ids_BN, attention_mask=self.mask_BN, moe_k=self.moe_k, inputs_embeds=self.embeds_BND
        )
        return out.logits[:, -1].float()

    def prefill(self) -> Tensor:
        return self._scores()

    def step(self, next_B: Tensor) -> Tensor:
        self.ids_BN = torch.cat([self.ids_BN, next_B[:, None]], dim=1)
        self.embeds_BND = torch.cat([self.embeds_BND, self.lm.embed_tokens(next_B[:, None])], dim=1)
        self.mask_BN = torch.cat([self.mask_BN, self.mask_BN.new_ones(next_B.shape[0], 1)], dim=1)
        return self._scores()


# What each MoE-LLaVA stage freezes (``--freeze`` specs on this model's groups).
LLAVA_STAGE_FREEZE: dict[int, list[str]] = {
    1: ["vision_tower", "language_model"],  # the projector only
    2: ["vision_tower"],  # the projector and the LM
    3: ["vision_tower", "projector", "re:^language_model\\.(?!layers\\.\\d+\\.mlp\\.(router|experts)\\.)"],
}


def stage_trainable(model: MoELLaVA, stage: int) -> list[str]:
    """The parameter names MoE-LLaVA's ``stage`` (1, 2, 3) trains, after freezing its groups."""
    if stage not in LLAVA_STAGE_FREEZE:
        raise ValueError(f"MoE-LLaVA has stages 1, 2, 3; got {stage}")
    groups = model.parameter_groups()
    frozen: set[str] = set()
    names = [n for n, _ in model.named_parameters()]
    for spec in LLAVA_STAGE_FREEZE[stage]:
        if spec.startswith("re:"):
            frozen |= {n for n in names if re.search(spec[3:], n)}
        else:
            frozen |= set(groups[spec])
    return [n for n in names if n not in frozen]
