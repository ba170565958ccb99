"""What a blind comparison compares: system specs (a model folder plus generation options) and prompts.

A SPEC on the command line is either

* ``PATH`` or ``PATH:key=value,key=value`` (the options start at the first ``:`` that is followed
  by ``key=``, so ``scmoe_weak=rank:3`` and Windows-free paths both work), e.g.
  ``runs/x:decode=scmoe,scmoe_beta=0.5,max_new_tokens=64``; or
* a JSON file ``{"model": "runs/x", "decode": "scmoe", ...}`` (any field of :class:`SystemSpec`).

Prompts are JSONL (one object a line with a ``prompt`` field, or ``instruction`` as in alpaca_eval,
plus an optional ``id``) or plain text, one prompt a line (blank lines skipped).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

DECODES = ("greedy", "sample", "scmoe")
_OPTIONS = re.compile(r"^(.*?):([A-Za-z_][A-Za-z0-9_]*=.*)$")


@dataclass(frozen=True, kw_only=True)
class SystemSpec:
    """One system of a comparison: a model folder and how it decodes.

    Attributes:
        model: a folder :func:`moekit.from_pretrained` opens (a run folder, a checkpoint, an HF folder).
        name: what reports call it (default: the folder name plus the options that differ from defaults).
        decode: ``greedy``, ``sample`` or ``scmoe`` (default: sample when temperature > 0, else greedy).
        temperature, top_k, top_p, seed: sampling (temperature 0 is greedy).
        max_new_tokens: tokens to generate at most per answer.
        scmoe_alpha, scmoe_beta, scmoe_weak: self-contrast decoding (see moekit.infer.decoding).
        k: experts per token at inference (None: the model's top-k).
        dtype: ``fp32``, ``bf16`` or ``fp16``.
    """

    model: str
    name: str = ""
    decode: str | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    max_new_tokens: int = 64
    scmoe_alpha: float = 0.1
    scmoe_beta: float = 0.5
    scmoe_weak: str = "rank:3"
    k: int | None = None
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("spec: model must name a folder")
        if self.decode is not None and self.decode not in DECODES:
            raise ValueError(f"spec: decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        if self.temperature < 0:
            raise ValueError(f"spec: temperature must be >= 0, got {self.temperature}")
        if self.decode == "sample" and self.temperature <= 0:
            raise ValueError("spec: decode=sample needs temperature > 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"spec: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"spec: dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if not self.name:
            object.__setattr__(self, "name", self.default_name())

    @property
    def decode_mode(self) -> str:
        """The decoding actually used (``decode`` resolved against the temperature)."""
        return self.decode or ("sample" if self.temperature > 0 else "greedy")

    def default_name(self) -> str:
        """``<folder>`` plus ``:key=value`` for each option that differs from the defaults."""
        defaults = SystemSpec(model=self.model, name="-")
        parts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name not in ("model", "name") and getattr(self, f.name) != getattr(defaults, f.name)
        ]
        base = Path(self.model).name or self.model
        return base + (":" + ",".join(parts) if parts else "")

    def to_dict(self) -> dict:
        """The JSON form (every field)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SystemSpec:
        """From the JSON form; an unknown field is a ValueError naming it."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"spec: unknown field {key!r} (known: {', '.join(known)})")
        return cls(**data)


def _coerce(key: str, text: str, field: dataclasses.Field):
    """A ``key=value`` option's value converted to the field's type."""
    kind = str(field.type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"spec: option {key}={text!r} is not a number") from None
    return text


def parse_spec(text: str) -> SystemSpec:
    """Parses a SPEC: ``PATH[:key=value,...]`` or a ``.json`` file (see the module docstring).

    Raises:
        ValueError: an unknown option, a bad value, or an unreadable JSON file (one line).
    """
    text = text.strip()
    if text.endswith(".json") and Path(text).is_file():
        try:
            data = json.loads(Path(text).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"spec file {text}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"spec file {text}: expected a JSON object")
        return SystemSpec.from_dict(data)
    match = _OPTIONS.match(text)
    path, options = (match.group(1), match.group(2)) if match else (text, "")
    fields = {f.name: f for f in dataclasses.fields(SystemSpec)}
    values: dict = {"model": path}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields or key == "model":
            raise ValueError(
                f"spec {text!r}: unknown option {item!r} (options: {', '.join(k for k in fields if k != 'model')})"
            )
        values[key] = _coerce(key, value.strip(), fields[key])
    return SystemSpec(**values)


@dataclass(frozen=True)
class Prompt:
    """One prompt: its id (from the file, else its 0-based line index) and text."""

    id: str
    text: str


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL file (``prompt`` or ``instruction`` field, optional ``id``) or a text file.

    A file whose first non-blank line starts with ``{`` is JSONL. Raises ValueError naming the file
    and line for a bad line, a missing text field, a duplicate id, or no prompts at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    nonblank = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    prompts: list[Prompt] = []
    jsonl = bool(nonblank) and nonblank[0][1].lstrip().startswith("{")
    for number, line in nonblank:
        if not jsonl:
            prompts.append(Prompt(str(len(prompts)), line))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        text = row.get("prompt", row.get("instruction")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path} line {number}: needs a non-empty 'prompt' (or 'instruction') string")
        prompts.append(Prompt(str(row.get("id", len(prompts))), text))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: prompt id {dup!r} appears more than once")
    return prompts
