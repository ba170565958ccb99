"""Expert profiles and the mixture config: latency and energy models, JSON that users edit.

A mixture's whole deployment is one :class:`MixtureConfig` JSON file:

* ``experts``: one :class:`ExpertProfile` per model folder, with its latency model (a fixed
  ``overhead_s`` plus ``prefill_s_per_token`` per prompt token plus ``decode_s_per_token`` per
  new token, measured by :func:`measure_latency` / ``moekit mixture profile``) and its energy per
  generated token (``energy_j_per_token``, from a :class:`HardwareProfile`: energy cannot be
  metered on this machine, so it is the device's power times the measured time per token, or a
  number the user writes for their own device);
* ``latency_classes``: request category -> latency bound in seconds (the paper's ``D_c``), with
  ``top_k`` experts at most per request in that class;
* ``energy_budget_j_per_token``: the global budget (the paper's ``E``), and ``selected``: the
  subset ``moekit mixture select`` chose under it;
* ``gate``: the gate folder ``moekit mixture train`` wrote.

Every class here is a :class:`~moekit.config.JsonConfig`: it round-trips JSON, and a bad value is
a ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from moekit.config import JsonConfig, check_choice

AGGREGATIONS = ("mixture", "best")


def _missing(kind: type, data: dict) -> None:
    """``ValueError`` naming the required fields ``data`` lacks (dataclasses raise TypeError)."""
    required = [
        f.name
        for f in dataclasses.fields(kind)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    absent = [n for n in required if n not in data]
    if absent:
        raise ValueError(f"{kind.__name__}: missing required field(s) {absent}")


def _nested(cls_name: str, name: str, value, kind: type[JsonConfig]):
    """A JSON list or object of ``kind`` objects as configs; errors name the element."""

    def one(where, v):
        if not isinstance(v, dict):
            return v  # the type check refuses it, naming the field
        try:
            _missing(kind, v)
            return kind.from_dict(v)
        except ValueError as err:
            raise ValueError(f"{cls_name}.{name}{where}: {err}") from None

    if isinstance(value, list):
        return [one(f"[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: one(f"[{k!r}]", v) for k, v in value.items()}
    return value


class _NestedConfig(JsonConfig):
    """A JsonConfig whose ``NESTED`` fields are lists or dicts of configs (JSON in and out)."""

    NESTED: dict[str, type[JsonConfig]] = {}

    @classmethod
    def from_dict(cls, data):
        if isinstance(data, dict):
            _missing(cls, data)
            data = {
                k: _nested(cls.__name__, k, v, cls.NESTED[k]) if k in cls.NESTED else v
                for k, v in data.items()
            }
        return super().from_dict(data)

    def to_dict(self):
        out = super().to_dict()
        for name in self.NESTED:
            value = out[name]
            if isinstance(value, dict):
                out[name] = {k: v.to_dict() if isinstance(v, JsonConfig) else v for k, v in value.items()}
        return out


def _check_nonneg(cls: str, name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{cls}.{name} must be a finite number >= 0, got {value!r}")


@dataclass(kw_only=True)
class ExpertProfile(JsonConfig):
    """One expert: where it is, how long it takes, how much energy it uses.

    Attributes:
        name: unique id (responses and ``/health`` report experts by it).
        path: a folder :func:`moekit.from_pretrained` opens (relative paths are relative to the
            config file's folder).
        prefill_s_per_token: seconds per prompt token (prefill).
        decode_s_per_token: seconds per generated token (one decode step).
        overhead_s: fixed seconds per request (transmission, aggregation, start-up).
        energy_j_per_token: joules per generated token on its device.
        device: free-form device name (the :class:`HardwareProfile` entry it was priced with).
    """

    name: str
    path: str
    prefill_s_per_token: float = 0.0
    decode_s_per_token: float = 0.0
    overhead_s: float = 0.0
    energy_j_per_token: float = 0.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ExpertProfile.name must be a non-empty string")
        for f in ("prefill_s_per_token", "decode_s_per_token", "overhead_s", "energy_j_per_token"):
            _check_nonneg("ExpertProfile", f, getattr(self, f))

    def latency_s(self, prompt_tokens: int, new_tokens: int) -> float:
        """Predicted seconds for one request: ``overhead + P * prefill + T * decode``."""
        return (
            self.overhead_s + prompt_tokens * self.prefill_s_per_token + new_tokens * self.decode_s_per_token
        )


@dataclass(kw_only=True)
class LatencyClass(JsonConfig):
    """A request category (the paper's application class ``c``).

    Attributes:
        bound_s: the latency bound ``D_c`` in seconds for a whole request.
        top_k: experts per request at most (the gate's top-k within the fitting experts).
    """

    bound_s: float
    top_k: int = 2

    def __post_init__(self) -> None:
        if not math.isfinite(self.bound_s) or self.bound_s <= 0:
            raise ValueError(f"LatencyClass.bound_s must be a finite number > 0, got {self.bound_s!r}")
        if self.top_k < 1:
            raise ValueError(f"LatencyClass.top_k must be >= 1, got {self.top_k}")


@dataclass(kw_only=True)
class MixtureConfig(_NestedConfig):
    """A mixture of experts over whole models (see the module doc).

    Attributes:
        experts: the expert profiles (at least one; names unique).
        gate: the gate folder (``moekit mixture train --out``), or None for uniform weights.
        aggregation: ``"mixture"`` (the gated mixture of next-token distributions, the paper's
            aggregation) or ``"best"`` (only the highest-weighted expert answers).
        latency_classes: category name -> :class:`LatencyClass`.
        default_class: the category of a request that names none (a key of ``latency_classes``,
            or None: no latency bound).
        energy_budget_j_per_token: the global energy budget (None: unbounded).
        selected: the expert names ``moekit mixture select`` chose (None: all experts).
    """

    NESTED: ClassVar[dict] = {"experts": ExpertProfile, "latency_classes": LatencyClass}

    experts: list[ExpertProfile]
    gate: str | None = None
    aggregation: str = "mixture"
    latency_classes: dict[str, LatencyClass] = field(default_factory=dict)
    default_class: str | None = None
    energy_budget_j_per_token: float | None = None
    selected: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("MixtureConfig.experts must list at least one expert")
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"MixtureConfig.experts: duplicate expert name(s) {dup}")
        check_choice("MixtureConfig", "aggregation", self.aggregation, AGGREGATIONS)
        if self.default_class is not None and self.default_class not in self.latency_classes:
            raise ValueError(
                f"MixtureConfig.default_class={self.default_class!r} is not a key of latency_classes "
                f"{sorted(self.latency_classes)}"
            )
        if self.energy_budget_j_per_token is not None:
            _check_nonneg("MixtureConfig", "energy_budget_j_per_token", self.energy_budget_j_per_token)
        if self.selected is not None:
            unknown = sorted(set(self.selected) - set(names))
            if unknown or not self.selected:
                raise ValueError(
                    f"MixtureConfig.selected must name experts of this config {names}; got {self.selected}"
                )

    @property
    def names(self) -> list[str]:
        """Expert names in config order (the gate's output order)."""
        return [e.name for e in self.experts]

    def expert(self, name: str) -> ExpertProfile:
        """The profile called ``name`` (``ValueError`` naming the known ones otherwise)."""
        for e in self.experts:
            if e.name == name:
                return e
        raise ValueError(f"no expert {name!r} in this mixture; it has {self.names}")


def load_mixture_config(path: str | Path) -> tuple[MixtureConfig, Path]:
    """Reads a mixture config file; returns it and the folder relative paths are relative to.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or a bad field (one line naming the file and the field).
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"mixture config {path} does not exist (write one with `moekit mixture profile`)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        return MixtureConfig.from_dict(data), path.parent
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def resolve_path(base: Path, path: str) -> Path:
    """``path`` as written in a config, relative to the config's folder ``base``."""
    p = Path(path)
    return p if p.is_absolute() else base / p


@dataclass(kw_only=True)
class DeviceProfile(JsonConfig):
    """What a device costs to run.

    Attributes:
        watts: average power while generating (energy per token = watts x seconds per token).
        joules_per_token: a measured energy per token instead (overrides ``watts`` when set).
    """

    watts: float = 15.0
    joules_per_token: float | None = None

    def __post_init__(self) -> None:
        _check_nonneg("DeviceProfile", "watts", self.watts)
        if self.joules_per_token is not None:
            _check_nonneg("DeviceProfile", "joules_per_token", self.joules_per_token)


@dataclass(kw_only=True)
class HardwareProfile(_NestedConfig):
    """The hardware-profile JSON users edit for their devices.

    Attributes:
        devices: device name -> :class:`DeviceProfile`.
        assignment: expert name -> device name (experts not listed run on ``default_device``).
        default_device: a key of ``devices``.
    """

    NESTED: ClassVar[dict] = {"devices": DeviceProfile}

    devices: dict[str, DeviceProfile] = field(default_factory=lambda: {"cpu": DeviceProfile()})
    assignment: dict[str, str] = field(default_factory=dict)
    default_device: str = "cpu"

    def __post_init__(self) -> None:
        for expert, device in {**self.assignment, "<default>": self.default_device}.items():
            if device not in self.devices:
                where = "default_device" if expert == "<default>" else f"assignment[{expert!r}]"
                raise ValueError(
                    f"HardwareProfile.{where}={device!r} is not a key of devices {sorted(self.devices)}"
                )

    def energy(self, expert: str, decode_s_per_token: float) -> tuple[str, float]:
        """``(device name, joules per token)`` of ``expert`` given its measured decode time."""
        name = self.assignment.get(expert, self.default_device)
        device = self.devices[name]
        if device.joules_per_token is not None:
            return name, device.joules_per_token
        return name, device.watts * decode_s_per_token


@torch.no_grad()
def measure_latency(
    model, vocab_size: int, prompt_tokens: int = 64, new_tokens: int = 32, repeats: int = 3, seed: int = 0
) -> tuple[float, float]:
    """Measures ``(prefill s/token, decode s/token)`` of ``model`` through a
    :class:`~moekit.models.decode.DecodeSession` (the path generation takes), best of ``repeats``.

    The prompt is random ids (latency does not depend on the text); one warm-up run first.
    """
    from moekit.models.decode import DecodeSession

    gen = torch.Generator().manual_seed(seed)
    ids_1P = torch.randint(0, vocab_size, (1, prompt_tokens), generator=gen)
    best_prefill, best_decode = math.inf, math.inf
    for i in range(repeats + 1):
        session = DecodeSession(model, ids_1P, max_new_tokens=new_tokens)
        t0 = time.perf_counter()
        logits = session.prefill()
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            logits = session.step(logits.argmax(-1))
        t2 = time.perf_counter()
        if i:  # the first run warms caches and allocators
            best_prefill = min(best_prefill, (t1 - t0) / prompt_tokens)
            best_decode = min(best_decode, (t2 - t1) / max(new_tokens, 1))
    return best_prefill, best_decode


__all__ = [
    "AGGREGATIONS",
    "DeviceProfile",
    "ExpertProfile",
    "HardwareProfile",
    "LatencyClass",
    "MixtureConfig",
    "load_mixture_config",
    "measure_latency",
    "resolve_path",
]
