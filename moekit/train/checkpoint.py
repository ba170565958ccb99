"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder::

    config.json, model.safetensors      the model (``model.save_pretrained``)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    optimizer.safetensors               AdamW state tensors, keyed ``state/<param name>/<key>``
    rng_state.safetensors               torch CPU RNG, the data sampler's generator, numpy's MT keys
    trainer_state.json                  step, scheduler, sampler, config, history, optimizer scalars,
                                        python/numpy RNG scalars

Saving writes everything into ``<name>.tmp-<pid>``, fsyncs every file and the folder, and then
renames it onto ``<name>`` (the old ``last`` first becomes ``previous`` or is deleted), so a write
that dies part-way (a crash, a full disk) leaves the previous checkpoint intact. Temporary folders
of dead processes are removed by :func:`remove_stale_tmp` on the next start. Nothing is pickled:
tensors go to safetensors, everything else to JSON.

A model without ``save_pretrained`` (any family's model) is stored as ``model.safetensors`` of its
state dict, and a checkpoint without a tokenizer simply has none: ``trainer_state.json`` lists the
files the checkpoint must hold.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moekit.data.tokenizer import TOKENIZER_FILES, save_tokenizer
from moekit.models.io import fsync_dir

FORMAT_VERSION = 1
MODEL_FILES = ("config.json", "model.safetensors")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
REQUIRED_FILES = (*MODEL_FILES, *TOKENIZER_FILES, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
REQUIRED_STATE_KEYS = ("format_version", "step", "scheduler", "sampler", "config", "optimizer", "rng")
LAST, PREVIOUS = "last", "previous"


@dataclass
class Checkpoint:
    """A checkpoint read back by :func:`load_checkpoint` (the model itself is loaded separately).

    Attributes:
        path: the checkpoint folder.
        state: the parsed ``trainer_state.json``.
        optimizer_tensors: ``optimizer.safetensors`` contents.
        rng_tensors: ``rng_state.safetensors`` contents.
    """

    path: Path
    state: dict[str, Any]
    optimizer_tensors: dict[str, Tensor]
    rng_tensors: dict[str, Tensor]


def capture_rng_state(device: torch.device | str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Snapshots the torch CPU (and ``device``'s CUDA), numpy and python RNGs as (tensors, JSON scalars)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        # int64 holds uint32 keys exactly and every safetensors version supports it.
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
    }
    if device is not None and torch.device(device).type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(torch.device(device))
    scalars = {
        "numpy": {
            "name": np_name,
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    return tensors, scalars


def restore_rng_state(tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    n = scalars["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = scalars["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _param_index_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    # optimizer.state_dict() numbers parameters in param_group order; this maps that number to a name.
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def flatten_optimizer(
    optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Splits an optimizer state into safetensors-ready tensors and JSON scalars, keyed by parameter name.

    Args:
        optimizer: any ``torch.optim`` optimizer.
        names: ``id(param) -> parameter name``.
    """
    sd = optimizer.state_dict()
    index_names = _param_index_names(optimizer, names)
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        name = index_names[idx]
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state/{name}/{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = []
    for group in sd["param_groups"]:
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        g["params"] = [index_names[i] for i in group["params"]]
        groups.append(g)
    # Recorded so load_checkpoint can tell a truncated optimizer file from a fresh optimizer.
    tensor_params = sorted({k.split("/")[1] for k in tensors})
    tensor_keys = sorted({k.rsplit("/", 1)[1] for k in tensors})
    meta = {
        "param_groups": groups,
        "scalars": scalars,
        "tensor_params": tensor_params,
        "tensor_keys": tensor_keys,
    }
    return tensors, meta


def restore_optimizer(
    optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    """Loads what :func:`flatten_optimizer` produced into a freshly built optimizer with the same groups.

    Raises:
        ValueError: the parameter groups differ (e.g. a different freeze set) or a tensor is missing.
    """
    index_names = _param_index_names(optimizer, names)
    index_of = {name: i for i, name in enumerate(index_names)}
    saved_groups = meta["param_groups"]
    now = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if [g["params"] for g in saved_groups] != now:
        raise ValueError(
            "the checkpoint's optimizer covers different parameters than this run (a changed preset, "
            "model override or freeze set?); resume with the original settings"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, name, sub = key.split("/", 2) if key.count("/") >= 2 else ("", key, "")
        if name not in index_of:
            raise ValueError(f"optimizer tensor {key!r} names no trainable parameter of this model")
        state.setdefault(index_of[name], {})[sub] = value
    for name, extra in meta.get("scalars", {}).items():
        state.setdefault(index_of[name], {}).update(extra)
    expected = {k for st in optimizer.state_dict()["state"].values() for k in st}
    for idx, st in state.items():
        missing = expected - set(st)
        if missing:
            raise ValueError(
                f"optimizer state of {index_names[idx]} lacks {sorted(missing)}; the checkpoint is partial"
            )
    groups = []
    for saved, live in zip(saved_groups, optimizer.state_dict()["param_groups"]):
        g = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"}
        g["params"] = live["params"]
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


MODEL_WEIGHTS = "model.safetensors"


def _save_model(folder: Path, model: nn.Module) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
        return
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / MODEL_WEIGHTS))


def load_model_weights(model: nn.Module, folder: str | Path) -> None:
    """Loads ``folder/model.safetensors`` into ``model`` strictly (tied weights may be stored once).

    Raises:
        ValueError: a tensor is missing, unexpected or mis-shaped, naming it.
    """
    folder = Path(folder)
    state = _read_safetensors(folder, MODEL_WEIGHTS)
    expected = model.state_dict()
    # A tied parameter (lm_head tied to the embedding) is stored under its first name only.
    by_storage: dict[int, str] = {}
    for name, tensor in expected.items():
        by_storage.setdefault(tensor.data_ptr(), name)
    missing = [k for k in expected if k not in state and by_storage[expected[k].data_ptr()] == k]
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"checkpoint {folder}: model.safetensors does not fit this model (missing {missing[:3]}, "
            f"unexpected {unknown[:3]}); resume with the model the run was started with"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"checkpoint {folder}: tensor {name!r} has shape {tuple(tensor.shape)}, this model "
                f"expects {tuple(expected[name].shape)}; resume with the original model"
            )
    model.load_state_dict(state, strict=False)


def fsync_tree(folder: Path) -> None:
    """fsyncs every file in ``folder`` (recursively) and then the folder itself."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_tmp(root: str | Path) -> list[Path]:
    """Deletes ``last.tmp-<pid>`` / ``last.old-<pid>`` folders in ``root`` whose process is dead.

    Returns the removed paths. Folders of live processes (another run writing) are left alone.
    """
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        for marker in (f"{LAST}.tmp-", f"{LAST}.old-"):
            tail = path.name[len(marker) :]
            if path.name.startswith(marker) and tail.isdigit():
                pid = int(tail)
                if pid == os.getpid() or not _pid_alive(pid):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
    return removed


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); the previous checkpoint is intact."""


def _save_optimizer(folder: Path, tensors: dict[str, Tensor]) -> None:
    save_file(tensors, str(folder / OPTIMIZER_FILE))


def save_checkpoint(
    root: str | Path,
    model: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    param_names: dict[int, str],
    state: dict[str, Any],
    rng: tuple[dict[str, Tensor], dict[str, Any]],
    extra_tensors: dict[str, Tensor] | None = None,
    keep_previous: bool = True,
    optimizer_flat: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
    save_artifacts: Callable[[Path], None] | None = None,
) -> Path:
    """Writes ``<root>/last`` atomically (fsynced before the rename) and returns its path.

    Args:
        root: the checkpoints folder (``<out_dir>/checkpoints``).
        model: saved with ``save_pretrained(folder)`` when it has one, else as ``model.safetensors``.
        tokenizer: a ``tokenizers.Tokenizer``, or None (no tokenizer files).
        optimizer: its state goes to ``optimizer.safetensors``.
        param_names: ``id(param) -> name`` for the optimizer's parameters.
        state: JSON-able trainer state (step, scheduler, sampler scalars, config, history, ...).
        rng: :func:`capture_rng_state` output (taken by the caller at the point to resume from).
        extra_tensors: more tensors for ``rng_state.safetensors`` (the sampler's generator state).
        keep_previous: keep the replaced ``last`` as ``previous`` instead of deleting it.
        optimizer_flat: the optimizer state already flattened (and, under expert parallelism,
            gathered to full shapes); None flattens ``optimizer`` here.
        save_artifacts: writes more files into the folder (a data module's tokenizer).

    Raises:
        CheckpointWriteError: the disk is full (or over quota); ``last`` is untouched.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / LAST
    tmp = root / f"{LAST}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_model(tmp, model)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if save_artifacts is not None:
            save_artifacts(tmp)
        opt_tensors, opt_meta = optimizer_flat or flatten_optimizer(optimizer, param_names)
        _save_optimizer(tmp, opt_tensors)
        rng_tensors, rng_scalars = rng
        save_file({**rng_tensors, **(extra_tensors or {})}, str(tmp / RNG_FILE))
        files = sorted(p.name for p in tmp.iterdir()) + [STATE_FILE]
        full_state = {
            **state,
            "format_version": FORMAT_VERSION,
            "optimizer": opt_meta,
            "rng": rng_scalars,
            "files": sorted(set(files)),
            "rng_tensors": sorted({*rng_tensors, *(extra_tensors or {})}),
        }
        _write_json(tmp / STATE_FILE, full_state)
        fsync_tree(tmp)
    except BaseException as e:
        # Including KeyboardInterrupt: the half-written folder must not linger as if it were usable.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = (
                f"the previous checkpoint {final} is intact" if final.exists() else "no checkpoint was kept"
            )
            raise CheckpointWriteError(
                e.errno,
                f"no space left on the device of {root} while writing a checkpoint; {kept}. Free some "
                "space and continue with --resume",
            ) from e
        raise
    # A folder cannot be renamed onto a non-empty folder, so the old `last` moves aside first. Between
    # the two renames only `previous` (or the old copy) exists; find_checkpoint falls back to it.
    if final.exists():
        aside = root / PREVIOUS if keep_previous else root / f"{LAST}.old-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(tmp, final)
        if not keep_previous:
            shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    return final


def _read_safetensors(path: Path, name: str) -> dict[str, Tensor]:
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: {name} is unreadable ({e}); the checkpoint is corrupt") from e


@contextlib.contextmanager
def safe_open_checked(path: Path, name: str):
    """``safetensors.safe_open`` that turns a damaged file into a ValueError naming it."""
    try:
        handle = safe_open(str(path / name), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: {name} is unreadable ({e}); the checkpoint is corrupt") from e
    with handle as f:
        yield f


def find_checkpoint(path: str | Path) -> Path:
    """Resolves a checkpoint folder, or a run/checkpoints folder to its ``last`` (else ``previous``).

    Raises:
        FileNotFoundError: nothing resumable there.
    """
    path = Path(path)
    if (path / STATE_FILE).exists() or (path / "config.json").exists():
        return path
    for base in (path / "checkpoints", path):
        for name in (LAST, PREVIOUS):
            if (base / name).is_dir():
                return base / name
    raise FileNotFoundError(
        f"no checkpoint in {path} (looked for checkpoints/{LAST} and checkpoints/{PREVIOUS}); "
        "train without --resume first, or pass the run's --out folder"
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Reads and validates a checkpoint's optimizer, RNG and trainer state.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: a partial or corrupt checkpoint (missing file, bad JSON, missing key or tensor),
            with the file named.
    """
    path = find_checkpoint(path)
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"checkpoint {path} is incomplete: missing {[STATE_FILE]}; resume from "
            f"{path.parent / PREVIOUS} or start a new run"
        )
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"checkpoint {path}: {STATE_FILE} is not valid JSON ({e}); the checkpoint is corrupt"
        ) from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: {STATE_FILE} is not a JSON object")
    # Checkpoints list their files; older ones (no list) are LM checkpoints with a tokenizer.
    required = state.get("files") or REQUIRED_FILES
    missing = [f for f in required if not (path / f).is_file()]
    if missing:
        raise ValueError(
            f"checkpoint {path} is incomplete: missing {missing}; resume from "
            f"{path.parent / PREVIOUS} or start a new run"
        )
    absent = [k for k in REQUIRED_STATE_KEYS if k not in state]
    if absent:
        raise ValueError(f"checkpoint {path}: {STATE_FILE} lacks {absent}; the checkpoint is corrupt")
    if state["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format_version {state['format_version']}, this moekit reads {FORMAT_VERSION}"
        )
    opt_tensors = _read_safetensors(path, OPTIMIZER_FILE)
    rng_tensors = _read_safetensors(path, RNG_FILE)
    # The model weights are loaded by the model class; here only their header is checked, cheaply.
    with safe_open_checked(path, MODEL_WEIGHTS) as f:
        if not list(f.keys()):
            raise ValueError(
                f"checkpoint {path}: model.safetensors holds no tensors; the checkpoint is corrupt"
            )
    for key in state.get("rng_tensors") or ("torch_cpu", "numpy_keys", "sampler_generator"):
        if key not in rng_tensors:
            raise ValueError(f"checkpoint {path}: {RNG_FILE} lacks tensor {key!r}; the checkpoint is corrupt")
    expected = {
        f"state/{name}/{key}"
        for name in state["optimizer"].get("tensor_params", [])
        for key in state["optimizer"].get("tensor_keys", [])
    }
    lost = sorted(expected - set(opt_tensors))
    if lost:
        raise ValueError(
            f"checkpoint {path}: {OPTIMIZER_FILE} lacks tensors {lost[:4]}; the checkpoint is corrupt"
        )
    return Checkpoint(path, state, opt_tensors, rng_tensors)
