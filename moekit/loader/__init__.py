"""moekit.loader: one loader for every folder that moekit writes or reads.

Contract:
    ``from_pretrained(path, dtype=None, kernel=None) -> nn.Module`` opens, by what the folder
    holds (:func:`inspect_folder`):

    ==========  ==========================================================================
    kind        what it is
    ==========  ==========================================================================
    run         a ``moekit train`` run folder: its ``checkpoints/last`` (else ``previous``)
    checkpoint  one checkpoint folder (``trainer_state.json`` beside a model folder)
    moekit      a model folder: ``config.json`` with ``"model_type": "moekit"`` (any family)
    quantized   a moekit folder whose config has a ``"quantization"`` section
    hf          a Hugging Face folder of a family ``moekit.convert`` supports (LMs; CLIPModel and
                LlavaForConditionalGeneration through ``moekit.convert.families.clip``/``llava``;
                SiglipModel through ``siglip``, import only)
    ==========  ==========================================================================

    and returns the model in eval mode, ready for ``generate``.
    ``load_model_and_tokenizer(path, dtype=None)`` returns it with its tokenizer and end-of-text
    id (:class:`LoadedModel`); every CLI verb that takes ``--model`` calls it.

    Errors are one ``ValueError`` (or ``FileNotFoundError`` for a missing path) naming the file
    and what to do.

To add a folder kind: teach :func:`inspect_folder` to recognise it and :func:`from_pretrained` to
open it; model families are added in :mod:`moekit.models.registry`, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.compress import load_quantized
from moekit.compress.model import QUANT_KEY
from moekit.convert import from_pretrained as load_hf
from moekit.convert.families import FAMILIES as HF_FAMILIES
from moekit.convert.families.clip import load_clip_hf
from moekit.convert.families.llava import load_llava_hf
from moekit.convert.families.siglip import load_siglip_hf
from moekit.data.tokenizer import EOS_TOKEN
from moekit.models.io import CONFIG_NAME, MODEL_TYPE, WEIGHTS_NAME, load_pretrained

# HF vision families, each read by its own importer (the LM families go through moekit.convert).
HF_VISION_LOADERS = {"clip": load_clip_hf, "llava": load_llava_hf, "siglip": load_siglip_hf}
HF_VISION_TYPES = tuple(HF_VISION_LOADERS)
KINDS = ("run", "checkpoint", "moekit", "quantized", "hf")
RUN_CHECKPOINTS = "checkpoints"
LAST, PREVIOUS = "last", "previous"
TRAINER_STATE = "trainer_state.json"
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
_MOEKIT_EOS = EOS_TOKEN  # moekit's own tokenizer's end of text


@dataclass(frozen=True)
class FolderInfo:
    """What :func:`inspect_folder` found.

    Attributes:
        path: the folder the user passed.
        model_dir: the folder that holds the model (``path`` itself, or a run's checkpoint).
        kind: one of :data:`KINDS`.
        detail: the moekit family, or the HF ``model_type``.
    """

    path: Path
    model_dir: Path
    kind: str
    detail: str


def run_checkpoint(path: Path) -> Path | None:
    """A run folder's newest complete checkpoint (``checkpoints/last``, else ``previous``), or None."""
    for base in (path / RUN_CHECKPOINTS, path):
        for name in (LAST, PREVIOUS):
            if (base / name / CONFIG_NAME).is_file():
                return base / name
    return None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the folder is damaged") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object; the folder is damaged")
    return data


def inspect_folder(path: str | Path) -> FolderInfo:
    """Tells which kind of folder ``path`` is (see the module doc) without loading weights.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it exists but is none of the kinds, naming what is missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder (runs/NAME) or a model folder")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; pass the folder that holds config.json")
    model_dir = path
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        found = run_checkpoint(path)
        if found is None:
            raise ValueError(
                f"{path} has no {CONFIG_NAME} and no checkpoints/{LAST}: not a model, run or Hugging Face "
                "folder (pass the folder `moekit train` or `moekit convert` wrote)"
            )
        model_dir, config_file = found, found / CONFIG_NAME
    data = _read_json(config_file)
    model_type = data.get("model_type")
    if model_type == MODEL_TYPE:
        family = str(data.get("moekit_family", "causal_lm"))
        if model_dir != path:
            kind = "run"
        elif (path / TRAINER_STATE).is_file():
            kind = "checkpoint"
        else:
            kind = "quantized" if QUANT_KEY in data else "moekit"
        if model_dir != path and QUANT_KEY in data:
            kind = "quantized"
        return FolderInfo(path, model_dir, kind, family)
    if model_type is None:
        raise ValueError(f"{config_file} has no 'model_type'; cannot tell which model family it is")
    if str(model_type) not in HF_FAMILIES and str(model_type) not in HF_VISION_TYPES:
        raise ValueError(
            f"{config_file}: Hugging Face model_type {model_type!r} is not supported; moekit reads "
            f"{sorted(HF_FAMILIES) + sorted(HF_VISION_TYPES)}"
        )
    return FolderInfo(path, model_dir, "hf", str(model_type))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32"``/``"bf16"``/``"float16"``/a ``torch.dtype``/None -> ``torch.dtype`` or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not valid; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def from_pretrained(
    path: str | Path, dtype: str | torch.dtype | None = None, kernel: str | None = None
) -> nn.Module:
    """Opens any folder moekit writes or reads (see the module doc); returns the model in eval mode.

    Args:
        path: a run, checkpoint, model, quantized or Hugging Face folder.
        dtype: run dtype (``torch.dtype`` or ``"fp32"``/``"bf16"``/``"fp16"``); None keeps float32
            for moekit folders and the checkpoint's dtype for Hugging Face ones.
        kernel: quantized folders only: override the saved kernel (``"auto"`` or ``"dequant"``).

    Raises:
        FileNotFoundError, ValueError: one line naming the file and what to do.
    """
    info = inspect_folder(path)
    run_dtype = resolve_dtype(dtype)
    if kernel is not None and info.kind != "quantized":
        raise ValueError(
            f"kernel={kernel!r} applies to quantized folders; {info.path} is a {info.kind} folder"
        )
    if info.kind == "quantized":
        model = load_quantized(info.model_dir, dtype=run_dtype, kernel=kernel)
    elif info.kind == "hf" and info.detail in HF_VISION_TYPES:
        model = HF_VISION_LOADERS[info.detail](info.model_dir, dtype=run_dtype)
    elif info.kind == "hf":
        model = load_hf(info.model_dir, dtype=run_dtype)
    else:
        if not (info.model_dir / WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{info.model_dir / WEIGHTS_NAME} not found: the folder has a config but no weights"
            )
        model = load_pretrained(None, info.model_dir, dtype=run_dtype)
    model.eval()
    return model


@dataclass
class LoadedModel:
    """A model with what the CLI and the server need to run it on text.

    Attributes:
        model: the model, in eval mode.
        tokenizer: its ``tokenizers.Tokenizer``.
        folder: the folder that holds the model (a run's checkpoint for a run).
        info: the :class:`FolderInfo`.
        eos_token_id: the end-of-text id.
    """

    model: nn.Module
    tokenizer: Any
    folder: Path
    info: FolderInfo
    eos_token_id: int


def load_tokenizer(folder: str | Path) -> Any:
    """The ``tokenizers.Tokenizer`` of a model folder (``tokenizer.json``).

    Raises:
        ValueError: no ``tokenizer.json`` (saying what the folder has instead), or an invalid one.
    """
    folder = Path(folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        hint = ""
        if (folder / "tokenizer.model").is_file():
            hint = (
                " It has a SentencePiece tokenizer.model: write tokenizer.json with transformers "
                "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder))."
            )
        raise ValueError(
            f"{folder} has no tokenizer.json; moekit commands need the tokenizer beside the model.{hint}"
        )
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:  # pragma: no cover - depends on the environment
        raise ValueError(
            "reading tokenizer.json needs the `tokenizers` package: pip install 'moekit[hf]'"
        ) from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{file} is not a valid tokenizer.json: {str(err).splitlines()[0]}") from None


def eos_token_id(tokenizer: Any, folder: str | Path) -> int:
    """The end-of-text id: ``config.json``'s ``eos_token_id``, then ``generation_config.json``'s,
    then ``tokenizer_config.json``'s ``eos_token``, then moekit's own ``<|endoftext|>``."""
    folder = Path(folder)
    for name in (CONFIG_NAME, "generation_config.json"):
        file = folder / name
        if file.is_file():
            eos = _read_json(file).get("eos_token_id")
            if isinstance(eos, list) and eos:
                eos = eos[0]
            if isinstance(eos, int) and not isinstance(eos, bool):
                return eos
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        token = _read_json(tok_cfg).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    idx = tokenizer.token_to_id(_MOEKIT_EOS)
    if idx is None:
        raise ValueError(
            f"{folder}: cannot tell the end-of-text token (no eos_token_id in config.json or "
            "generation_config.json, no eos_token in tokenizer_config.json)"
        )
    return idx


def load_model_and_tokenizer(
    path: str | Path, dtype: str | torch.dtype | None = None, kernel: str | None = None
) -> LoadedModel:
    """:func:`from_pretrained` plus the folder's tokenizer and end-of-text id."""
    info = inspect_folder(path)
    tokenizer = load_tokenizer(info.model_dir)
    model = from_pretrained(path, dtype=dtype, kernel=kernel)
    return LoadedModel(model, tokenizer, info.model_dir, info, eos_token_id(tokenizer, info.model_dir))


__all__ = [
    "KINDS",
    "FolderInfo",
    "LoadedModel",
    "eos_token_id",
    "from_pretrained",
    "inspect_folder",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "resolve_dtype",
    "run_checkpoint",
]
