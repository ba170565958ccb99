"""moekit.convert: Hugging Face import/export with one adapter per family.

Contract:
    ``from_pretrained(path, dtype=None) -> MoEForCausalLM`` reads an HF folder (``config.json`` +
    safetensors, single file or sharded with ``model.safetensors.index.json``) or a moekit folder.
    The HF ``model_type`` picks the family adapter; the adapter translates the config (refusing,
    with a ``ValueError`` naming it, any option moekit cannot represent) and lists where every
    moekit tensor lives in the checkpoint. Both the per-expert layout (``experts.{e}.w1/w2/w3``,
    ``experts.{e}.gate_proj/up_proj/down_proj``) and transformers 5's fused layout
    (``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``) import. The model is
    allocated once, uninitialised, in the run dtype (built on the meta device), and each tensor is
    copied into its slice while its shard is open (never two copies of the weights); pickled
    ``.bin`` files are refused. ``dtype`` selects the run dtype (default: the
    checkpoint's).

    ``save_hf(model, path, family=None, max_shard_bytes=5 GiB)`` (also
    ``model.save_pretrained(path, format="hf")``) writes ``config.json`` with the family's
    ``model_type``/``architectures``, the weights in the layout transformers 5.24's own
    ``save_pretrained`` writes (per expert), sharded with an index above ``max_shard_bytes``, and
    the tokenizer files of ``tokenizer_dir`` (default: the folder the model was loaded from). The
    family is chosen from the config unless given; options no family expresses (top-p routing,
    MoE++ experts, gating residuals, per-layer expert counts, expert choice, capacity, ...) raise
    ``ValueError`` naming the option.

Layout:
    checkpoint.py        safetensors shard reading/writing, tokenizer files
    families/base.py     the adapter contract (Target, Piece, FamilyAdapter)
    families/<type>.py   one adapter per HF model_type (all HF tensor names live there)
    families/__init__.py the registry (``get_family``, ``family_for``)

To add a family, see :mod:`moekit.convert.families`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from moekit.config import ConfigTypeError
from moekit.convert.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    checkpoint_dtype,
    copy_tokenizer_files,
    hf_tensors,
    load_into,
    weight_map,
    write_shards,
)
from moekit.convert.families import FAMILIES, family_for, get_family
from moekit.models.config import ModelConfig
from moekit.models.decoder import MoEForCausalLM
from moekit.models.io import atomic_write, materialize

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION_CONFIG = "generation_config.json"
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``path/config.json`` as a dict; ValueError when missing or without ``model_type``."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{file} not found: not a Hugging Face or moekit model folder")
    data = json.loads(file.read_text())
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{file} has no 'model_type'; cannot tell which family it is")
    return data


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translates an HF config dict into a :class:`ModelConfig` (ValueError for unknown types/options).

    A value of the wrong type (``"num_local_experts": "four"``) is reported under its HF key.
    """
    try:
        return get_family(str(hf["model_type"])).config_from_hf(hf)
    except ConfigTypeError as e:
        # The readers pass HF values through unchanged, so the offending object is in ``hf``.
        keys = [k for k, v in hf.items() if v is e.value and type(v) is type(e.value)]
        if not keys:
            raise
        raise ValueError(
            f"{hf['model_type']} config.json: {' / '.join(keys)}={e.value!r} must be {e.expected} "
            f"(it becomes moekit's {e.field})"
        ) from None


def build_empty(config: ModelConfig, dtype: torch.dtype) -> MoEForCausalLM:
    """The model with uninitialised weights allocated once, in ``dtype`` (the checkpoint fills them).

    Built on the meta device (no random init, no float32 copy of a bf16 model), then given real
    memory; the non-persistent buffers are rebuilt by the model (:func:`moekit.models.io.materialize`).
    """
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    return materialize(model, dtype)


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> MoEForCausalLM:
    """Loads an HF or moekit folder as a :class:`~moekit.models.MoEForCausalLM`.

    Args:
        path: the folder.
        dtype: run dtype; None keeps the checkpoint's (float32, bfloat16 or float16).

    Raises:
        ValueError: unknown ``model_type``, an unsupported config option, pickled weights, or a
            missing / mis-shaped tensor (each message names it).
    """
    folder = Path(path)
    hf = read_hf_config(folder)
    if hf["model_type"] == "moekit":
        return MoEForCausalLM.from_pretrained(folder, dtype=dtype)
    adapter = get_family(str(hf["model_type"]))
    config = config_from_hf(hf)
    token_ids = {k: hf[k] for k in TOKEN_ID_KEYS if hf.get(k) is not None}
    if token_ids:
        try:
            config = config.replace(**token_ids)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{folder / 'config.json'}: {err}") from None
    mapping = weight_map(folder)
    run_dtype = dtype or checkpoint_dtype(mapping)
    model = build_empty(config, run_dtype)
    if adapter.fp32_routers:
        for moe in model.moe_layers:
            moe.router.float()  # routing runs in float32 anyway; keeps the checkpoint's fp32 values
    state = model.state_dict(keep_vars=False)
    targets = adapter.targets(config)
    expected = set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unmapped = sorted(expected - {t.name for t in targets})
    if unmapped:
        raise ValueError(f"{adapter.model_type} adapter does not map moekit tensor(s) {unmapped[:5]}")
    load_into(state, targets, {k: v for k, v in mapping.items() if not adapter.derived_tensor(k)})
    model.eval()
    model.name_or_path = str(folder)
    return model


def _tokenizer_eos_id(folder: Path) -> int | None:
    """The id of moekit's end-of-text token in ``folder/tokenizer.json``, or None."""
    file = folder / "tokenizer.json"
    try:
        added = json.loads(file.read_text()).get("added_tokens", [])
    except (OSError, ValueError, AttributeError):
        return None
    for token in added if isinstance(added, list) else []:
        if isinstance(token, dict) and token.get("content") == "<|endoftext|>":
            return token.get("id")
    return None


def hf_config_for(model: MoEForCausalLM, family: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(adapter, HF config dict)`` for exporting ``model`` (ValueError naming a blocking option)."""
    if model.config.pregated:
        raise ValueError(
            "a pregated model (ModelConfig.pregated) cannot be exported to Hugging Face: no transformers "
            "family routes a layer from the previous layer's input; keep it in the moekit format"
        )
    adapter = get_family(family) if family is not None else family_for(model.config)
    hf = adapter.config_to_hf(model.config)
    dtype = next(model.parameters()).dtype
    hf["dtype"] = DTYPE_NAMES.get(dtype, "float32")
    for key in TOKEN_ID_KEYS:
        if getattr(model.config, key) is not None:
            hf[key] = getattr(model.config, key)
    return adapter, hf


def save_hf(
    model: MoEForCausalLM,
    path: str | Path,
    family: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Writes ``model`` as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        model: the model.
        path: output folder (created).
        family: HF ``model_type`` to write; None picks it from the config.
        max_shard_bytes: shard above this size (writes ``model.safetensors.index.json``).
        tokenizer_dir: copy tokenizer/generation files from here (default: where the model came from).

    Returns:
        The folder.
    """
    adapter, hf = hf_config_for(model, family)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = itertools.chain(
        hf_tensors(state, adapter.targets(model.config)), adapter.derived_tensors(model.config, state)
    )
    write_shards(tensors, folder, max_shard_bytes)
    text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))
    src = tokenizer_dir if tokenizer_dir is not None else getattr(model, "name_or_path", None)
    copy_tokenizer_files(Path(src) if src else None, folder)
    if "eos_token_id" not in hf:
        eos = _tokenizer_eos_id(folder)
        if eos is not None:
            hf["eos_token_id"] = eos
            text = json.dumps(hf, indent=2, sort_keys=True) + "\n"
            atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))
    if "eos_token_id" in hf and not (folder / GENERATION_CONFIG).is_file():
        # transformers' generate reads eos from here; without it, exported models never stop.
        gen = {k: hf[k] for k in TOKEN_ID_KEYS if k in hf}
        gen_text = json.dumps({**gen, "_from_model_config": True}, indent=2, sort_keys=True) + "\n"
        atomic_write(folder / GENERATION_CONFIG, lambda tmp: Path(tmp).write_text(gen_text))
    return folder


__all__ = [
    "FAMILIES",
    "config_from_hf",
    "family_for",
    "from_pretrained",
    "get_family",
    "hf_config_for",
    "save_hf",
]
