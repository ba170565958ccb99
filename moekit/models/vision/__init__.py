"""moekit.models.vision: ViT-MoE, task-level MoE (M3ViT) and the CLIP-MoE dual encoder.

Contract:
    ``ViTMoE(ViTConfig)(pixel_values [B, C, H, W], labels=None, task=None, moe_k=None) ->
    ViTOutput(logits, pooled, hidden, loss, aux_losses, routing)``; one task per call when the
    config has per-task heads (``task_num_classes``); the MoE layers then route on the task too
    (``MoEConfig.num_tasks``).
    ``CLIPMoE(CLIPConfig)(input_ids=None, pixel_values=None, attention_mask=None, return_loss=False)
    -> CLIPOutput(logits_per_image, logits_per_text, image_embeds, text_embeds, loss, aux_losses,
    routing)``, transformers' ``CLIPModel`` semantics (``moekit.convert.families.clip`` maps weights).
    Both follow the LM's model contract: ``config``, ``parameter_groups()``,
    ``tied_weight_names()``, ``save_pretrained``/``from_pretrained`` (moekit folders, any family).

Layout:
    config.py      EncoderConfig (placement rule), ViTConfig, TextConfig, CLIPConfig
    encoder.py     EncoderLayer, Encoder (pre-norm, LayerNorm, biased attention, dense or MoE FFN)
    vit.py         ViTMoE (classification / per-task heads)
    clip.py        TextTower, CLIPMoE, contrastive_loss
    task.py        task-level MoE: per-task expert usage, extract_task_model, memory saved
    objectives.py  ClassificationObjective, ContrastiveObjective, VQAObjective, accuracy,
                   retrieval_r1, vqa_accuracy
    llava.py       VLMConfig, MoELLaVA (tower + projector + moekit LM), splice_image_features,
                   LLAVA_STAGE_FREEZE / stage_trainable (MoE-LLaVA's three stages)
    unimoe.py      UniMoEConfig, UniMoE (ViT + 1-D SignalEncoder, a connector per modality,
                   moekit LM), UNIMOE_STAGE_FREEZE / unimoe_stage_trainable (Uni-MoE's stages)
    siglip.py      SigLIPConfig, SigLIPMoE (MAP-pooled ViT without CLS, last-token text tower,
                   logit bias); transformers' SiglipModel folders import into it
    presets.py     named configs for the CLI (vit-digits, clip-shapes, multitask-shapes)

To add a vision family: give it a config here, build it from ``Encoder``, and register it in
``moekit.models.registry``.
"""

from moekit.models.vision.clip import CLIPMoE, CLIPOutput, TextTower, contrastive_loss
from moekit.models.vision.config import CLIPConfig, EncoderConfig, TextConfig, ViTConfig
from moekit.models.vision.encoder import Encoder, EncoderLayer, EncoderOutput
from moekit.models.vision.objectives import (
    ClassificationObjective,
    ContrastiveObjective,
    accuracy,
    retrieval_r1,
)
from moekit.models.vision.vit import ViTMoE, ViTOutput

__all__ = [
    "CLIPConfig",
    "CLIPMoE",
    "CLIPOutput",
    "ClassificationObjective",
    "ContrastiveObjective",
    "Encoder",
    "EncoderConfig",
    "EncoderLayer",
    "EncoderOutput",
    "TextConfig",
    "TextTower",
    "ViTConfig",
    "ViTMoE",
    "ViTOutput",
    "accuracy",
    "contrastive_loss",
    "retrieval_r1",
]
