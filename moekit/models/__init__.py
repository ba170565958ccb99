"""moekit.models: model families built from ``moekit.layers``.

Contract: models are single-device ``nn.Module``s built from a config dataclass. Parallelism,
offloading and quantization are applied to a built model by their own packages.

The decoder LM:
    ``MoEForCausalLM(ModelConfig)(input_ids, attention_mask=None, labels=None, ...) ->
    CausalLMOutput(loss, lm_loss, logits, aux_loss, aux_losses, routing, past_key_values)``,
    with Hugging Face calling conventions (shifted labels, -100 ignored, left padding, KV cache).
    ``save_pretrained``/``from_pretrained`` use ``config.json`` + ``model.safetensors``.

    ``model.generate(...)`` is :func:`generate`: one API (HF kwargs plus ``moe_k``, ``compile``)
    over one session (:class:`DecodeSession`), fast path by default wherever it applies.

Layout:
    config.py      ModelConfig (MoE placement rule, rope scaling, q/k norm, loss coefficients);
                   builds the blocks' configs (rope_config, attention_config, mla_config)
    decoder.py     DecoderLayer, MoEForCausalLM (norms, RoPE, attention, KV cache: moekit.blocks)
    decode.py      DecodeSession (preallocated cache/masks/RoPE rows), the fast decode path, the
                   compiled batch-1 step
    batch_decode.py DecodeBatch (a continuous batch over a ragged KV cache), ChunkedPrefill, batch_decode_supported
    generation.py  generate, Sampler, iter_tokens, the compile="auto" policy
    io.py          save/load of moekit folders (safetensors only)
    presets.py     named configs (moe-tiny, moe-small, ..., dense twins)
    registry.py    model families (name, config, model, objective, data module, task)
    timemoe.py     the Time-MoE forecaster family (task "forecast"): TimeMoEConfig,
                   TimeMoEForecaster (forecast with the KV cache), its PRESETS (timemoe-*)
    timemoe_train.py  TimeMoEObjective (multi-horizon Huber + aux), SeriesDataModule
    forecaster.py  Forecaster: predict / predict_df frames over any forecast-family model
    moirai*.py     the Moirai-MoE forecaster family (model, mixture heads, objective, data
                   module, forecaster; family ``moirai_moe``), docs/timeseries-moirai.md
    vision/        ViT-MoE, task-level MoE (M3ViT) and CLIP-MoE (``moekit.models.vision``,
                   registered as the ``vit_moe`` and ``clip_moe`` families)

To add a family: express it as ModelConfig fields (add a field with a neutral default when a
family needs a switch the decoder lacks), add a preset whose docstring cites the HF config, and
put the HF key map in ``moekit.convert``; parameter names here never follow HF.
"""

from moekit.blocks import KVCache
from moekit.models.config import ModelConfig
from moekit.models.decode import DecodeSession, fast_decode_supported
from moekit.models.decoder import CausalLMOutput, MoEForCausalLM
from moekit.models.generation import Sampler, generate, iter_tokens
from moekit.models.io import is_moekit_folder
from moekit.models.presets import PRESETS, get_preset, list_presets

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "DecodeSession",
    "KVCache",
    "ModelConfig",
    "MoEForCausalLM",
    "Sampler",
    "fast_decode_supported",
    "generate",
    "get_preset",
    "is_moekit_folder",
    "iter_tokens",
    "list_presets",
]
