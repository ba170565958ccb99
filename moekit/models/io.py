"""Saving and loading moekit model folders: ``config.json`` + ``model.safetensors``, any family.

``config.json`` holds the family's config (``to_dict()``) plus ``"model_type": "moekit"``,
``"moekit_family"`` (see :mod:`moekit.models.registry`) and ``"moekit_version"``. Extra sections
written by other packages (``"quantization"`` by ``moekit.compress``) are passed through
``extra_config`` and ignored by :func:`read_config`'s callers that do not know them.

Only safetensors is read, never pickle, and every file is checked before it is trusted
(:mod:`moekit.models.safetensors_io`). Loading validates before allocating: the model is built on
the meta device, its tensor names and shapes are compared with the file's header, and the bytes it
needs with the memory available, so a config claiming ten million experts fails in milliseconds
with a message instead of trying to allocate hundreds of gigabytes.

Writes go to a temporary file in the same folder, are fsynced, and are renamed over the target
(then the folder is fsynced), so a crash never leaves a half-written file under the real name.
The weights are written before the config, so a folder with a moekit ``config.json`` is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import moekit
from moekit.models.registry import DEFAULT_FAMILY, ModelFamily, family_of, get_family
from moekit.models.safetensors_io import check_safetensors, open_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "moekit"
FAMILY_KEY = "moekit_family"
SAVE_FORMATS = ("moekit", "hf")
# Keys of config.json that are about the file, not the family's config.
_FOLDER_KEYS = ("model_type", "moekit_version", FAMILY_KEY)


def fsync_dir(folder: Path) -> None:
    """Flushes a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Calls ``write(tmp_path)``, fsyncs the temp file, renames it to ``path`` and fsyncs the folder.

    On any error (a full disk included) the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


_atomic_write = atomic_write  # the name earlier releases used


def aliased_names(model: nn.Module) -> set[str]:
    """State-dict names whose tensor is the same storage as an earlier name's (tied weights)."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    aliased = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen and tensor.numel():
            aliased.add(name)
        else:
            seen[key] = name
    return aliased


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a folder stores: the state dict without tied aliases, contiguous, on CPU."""
    skip = aliased_names(model)
    return {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if name not in skip
    }


def write_model_folder(
    model: nn.Module,
    path: str | Path,
    tensors: dict[str, torch.Tensor] | None = None,
    extra_config: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes ``model.safetensors`` then ``config.json`` into ``path`` (created), each atomically.

    Args:
        model: a model of a registered family (its ``config`` is written).
        path: the folder.
        tensors: what to store (default :func:`model_tensors`); packages with their own tensor
            layout (quantized experts) pass theirs.
        extra_config: more top-level sections for ``config.json`` (e.g. ``"quantization"``).
        metadata: more safetensors metadata strings.

    Returns:
        The folder.
    """
    family = family_of(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(model) if tensors is None else tensors
    meta = {"format": "pt", "moekit_version": moekit.__version__, **(metadata or {})}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    config = {
        "model_type": MODEL_TYPE,
        FAMILY_KEY: family.name,
        "moekit_version": moekit.__version__,
        **model.config.to_dict(),
        **(extra_config or {}),
    }
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return folder


def _refuse_lora_experts(model: nn.Module) -> None:
    # No HF family stores LoRA experts; writing their [H, D] base as [E, H, D] would be wrong.
    from moekit.layers import LoRAExpertWeights

    if any(isinstance(m, LoRAExpertWeights) for m in model.modules()):
        raise ValueError(
            "save_pretrained(format='hf'): the model has LoRA experts, which no HF family stores; "
            "merge them into full experts first (moekit.layers.merge_lora_experts) or save as moekit"
        )


def save_pretrained(model: nn.Module, path: str | Path, format: str = "moekit", **kwargs: Any) -> None:
    """Writes a moekit folder (``format="moekit"``) or a Hugging Face one (``format="hf"``).

    The HF writer is the family's exporter (:attr:`ModelFamily.hf_exporter`, for the LM
    :func:`moekit.convert.save_hf`); ``kwargs`` go to it.
    """
    if format == "hf":
        _refuse_lora_experts(model)
        family_of(model).resolve_hf_exporter()(model, path, **kwargs)
        return
    if format != "moekit":
        raise ValueError(
            f"save_pretrained: format={format!r} is not valid; choose one of {list(SAVE_FORMATS)}"
        )
    if kwargs:
        raise ValueError(f"save_pretrained: unexpected argument(s) {sorted(kwargs)} for format='moekit'")
    write_model_folder(model, path)


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """``path/config.json`` of a moekit folder as a dict; ValueError naming the file otherwise."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{file} not found: not a moekit model folder")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        found = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{file} is not a moekit config (model_type={found!r}); open Hugging Face folders with "
            "moekit.from_pretrained, or convert them with `moekit convert`"
        )
    return data


def read_config(path: str | Path, ignore: tuple[str, ...] = ()) -> tuple[ModelFamily, Any]:
    """``(family, config)`` of a moekit folder.

    Args:
        path: the folder.
        ignore: top-level sections of ``config.json`` that belong to another package (e.g.
            ``"quantization"``) and are not fields of the family's config.

    Raises:
        ValueError: naming the file, for a missing/invalid file, an unknown family or a bad field.
    """
    file = Path(path) / CONFIG_NAME
    data = read_config_dict(path)
    try:
        family = get_family(str(data.get(FAMILY_KEY, DEFAULT_FAMILY)))
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    fields = {k: v for k, v in data.items() if k not in _FOLDER_KEYS and k not in ignore}
    try:
        return family, family.config_cls.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: invalid {family.name} config: {err}") from None


def build_on_meta(family: ModelFamily, config: Any) -> nn.Module:
    """The model with meta tensors: its names and shapes, with no memory and no random init."""
    with torch.device("meta"):
        return family.build(config)


def materialize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Gives a meta-built model real, uninitialised CPU memory (in ``dtype``) and rebuilds buffers.

    Non-persistent buffers (RoPE tables, balance weights) are not in any file; models compute them
    in ``init_buffers()``, called here on every module that defines it (``MoELayer`` does). Tied weights are re-tied.
    """
    tied = getattr(model, "tie_weights", None)
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device="cpu")
    if tied is not None:
        tied()
    # Every module that computes buffers no file holds (MoE balance weights, a model's own) does
    # it again on the real memory; each init_buffers is idempotent.
    for module in model.modules():
        init_buffers = getattr(module, "init_buffers", None)
        if callable(init_buffers):
            init_buffers()
    return model


def check_memory(num_bytes: int, what: str) -> None:
    """ValueError when ``num_bytes`` exceed the memory available (Linux ``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return
    if num_bytes > available:
        raise ValueError(
            f"{what} needs {num_bytes / 1e9:.1f} GB but only {available / 1e9:.1f} GB of memory is "
            "available; load it with a smaller dtype, quantize it, or check its config for a typo"
        )


def compare_with_header(
    expected: dict[str, torch.Tensor], header: dict[str, dict[str, Any]], weights: Path, config_name: str
) -> None:
    """ValueError naming the first unknown, missing or mis-shaped tensor of ``weights``."""
    unknown = sorted(set(header) - set(expected))
    if unknown:
        raise ValueError(
            f"{weights}: unknown tensor(s) {unknown[:10]} not in a model built from {config_name}"
        )
    missing = sorted(set(expected) - set(header))
    if missing:
        raise ValueError(
            f"{weights}: missing tensor(s) {missing[:10]}; the file is truncated or was saved from a "
            f"different config than {config_name}"
        )
    for name, info in header.items():
        if tuple(info["shape"]) != tuple(expected[name].shape):
            raise ValueError(
                f"{weights}: tensor {name!r} has shape {tuple(info['shape'])}, {config_name} expects "
                f"{tuple(expected[name].shape)}"
            )


def load_pretrained(
    cls: type[nn.Module] | None, path: str | Path, dtype: torch.dtype | None = None
) -> nn.Module:
    """Builds the folder's model from ``config.json`` and loads ``model.safetensors`` strictly.

    Args:
        cls: the expected model class (ValueError when the folder holds another family), or None
            for whatever family the folder holds.
        path: the folder.
        dtype: run dtype (default float32); stored tensors are cast to it.

    Raises:
        ValueError: naming the file or tensor: a missing/invalid config, a missing or corrupt
            weights file, a missing, unknown or mis-shaped tensor, or too little memory.
    """
    folder = Path(path)
    family, config = read_config(folder)
    if cls is not None and not issubclass(family.model_cls, cls):
        raise ValueError(f"{folder} holds a {family.name} model, not a {cls.__name__}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{weights} not found: the folder has a config but no weights")
    header = check_safetensors(weights)
    model = build_on_meta(family, config)
    expected = model.state_dict()
    for name in _meta_aliases(model):
        expected.pop(name, None)
    compare_with_header(expected, header, weights, CONFIG_NAME)
    dtype = dtype or torch.float32
    itemsize = torch.empty((), dtype=dtype).element_size()
    check_memory(sum(t.numel() for t in expected.values()) * itemsize, str(folder))
    materialize(model, dtype)
    state = model.state_dict()
    with torch.no_grad(), open_safetensors(weights) as f:
        for name in header:
            # copy_ casts the stored dtype to the model's and writes into the one allocation.
            state[name].copy_(f.get_tensor(name))
    return model


def _meta_aliases(model: nn.Module) -> set[str]:
    """Tied names of a meta-built model (meta tensors share no storage, so ask the model)."""
    names = getattr(model, "tied_weight_names", None)
    return set(names()) if names is not None else set()


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
