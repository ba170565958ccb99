"""Saving and loading moekit model folders: ``config.json`` + ``model.safetensors``.

Only safetensors is read (never pickle). Writes go to a temporary file in the same folder and are
then renamed over the target, so a crash never leaves a half-written file under the real name.
The weights are written before the config, so a folder with a moekit ``config.json`` is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import moekit
from moekit.models.config import ModelConfig

if TYPE_CHECKING:
    from moekit.models.decoder import MoEForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "moekit"
SAVE_FORMATS = ("moekit", "hf")


def _atomic_write(path: Path, write) -> None:
    """Calls ``write(tmp_path)``, fsyncs it, renames it to ``path`` and fsyncs the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(model: MoEForCausalLM, path: str | Path, format: str = "moekit") -> None:
    """Writes ``path/model.safetensors`` and ``path/config.json`` (atomically, each).

    ``config.json`` holds ``ModelConfig.to_dict()`` plus ``"model_type": "moekit"`` and
    ``"moekit_version"``. A tied ``lm_head.weight`` is not stored (it is the embedding).

    Args:
        model: the model to save.
        path: the folder (created if missing).
        format: ``"moekit"``, or ``"hf"`` for a Hugging Face folder (see :func:`moekit.convert.save_hf`;
            the family is chosen from the config).
    """
    if format == "hf":
        from moekit.convert import save_hf  # lazy: moekit.convert imports this package

        save_hf(model, path)
        return
    if format != "moekit":
        raise ValueError(
            f"save_pretrained: format={format!r} is not valid; choose one of {list(SAVE_FORMATS)}"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[name] = tensor.detach().contiguous().cpu()
    metadata = {"format": "pt", "moekit_version": moekit.__version__}
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    config = {"model_type": MODEL_TYPE, "moekit_version": moekit.__version__, **model.config.to_dict()}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def read_config(path: str | Path) -> ModelConfig:
    """Reads ``path/config.json`` as a :class:`ModelConfig`; ValueError if it is not a moekit config."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{file} not found: not a folder written by MoEForCausalLM.save_pretrained")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{file} is not a moekit config (model_type={found!r}, expected {MODEL_TYPE!r}); "
            "Hugging Face folders are imported with moekit.convert"
        )
    data = {k: v for k, v in data.items() if k not in ("model_type", "moekit_version")}
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: invalid model config: {err}") from err


def load_pretrained(
    cls: type[MoEForCausalLM], path: str | Path, dtype: torch.dtype | None = None
) -> MoEForCausalLM:
    """Builds ``cls`` from ``path/config.json`` and loads ``path/model.safetensors`` strictly.

    Raises:
        ValueError: naming the file or tensor when the config is missing or not moekit's, the
            weights file is missing, or a tensor is missing, mis-shaped or unknown.
    """
    folder = Path(path)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{weights} not found: the folder has a config but no weights")
    model = cls(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded = {}
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        unknown = sorted(names - set(expected))
        if unknown:
            raise ValueError(
                f"{weights}: unknown tensor(s) {unknown[:10]} not in a model built from {CONFIG_NAME}"
            )
        missing = sorted(set(expected) - names)
        if missing:
            raise ValueError(
                f"{weights}: missing tensor(s) {missing[:10]}; the file is truncated or was saved from a "
                f"different config than {CONFIG_NAME}"
            )
        for name in sorted(names):
            tensor = f.get_tensor(name)
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"{weights}: tensor {name!r} has shape {tuple(tensor.shape)}, the config expects "
                    f"{tuple(expected[name].shape)}"
                )
            loaded[name] = tensor
    if dtype is not None:
        model.to(dtype)
    # load_state_dict copies into the existing tensors, so the stored dtype is cast to the model's.
    model.load_state_dict(loaded, strict=not config.tie_word_embeddings)
    return model


def is_moekit_folder(path: str | Path) -> bool:
    """True when ``path`` holds a moekit ``config.json`` and ``model.safetensors``."""
    folder = Path(path)
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict) and data.get("model_type") == MODEL_TYPE and (folder / WEIGHTS_NAME).is_file()
    )
