"""Shared helpers for config dataclasses: JSON round-trips and field validation.

Every config in moekit is a dataclass that subclasses :class:`JsonConfig`. ``to_dict``/``from_dict``
round-trip through JSON, and ``from_dict`` rejects unknown keys with a message naming them, so a
typo in a config file is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")


def _convert(value: Any, annotation: Any) -> Any:
    """Turns JSON values back into the field's type (nested configs, tuples)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        return None
    if isinstance(annotation, type) and issubclass(annotation, JsonConfig):
        return annotation.from_dict(value)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        for arg in args:
            if arg is type(None):
                continue
            return _convert(value, arg)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


class JsonConfig:
    """Mixin for dataclass configs: ``to_dict``, ``from_dict``, ``to_json``, ``from_json``."""

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict of the fields (nested configs become dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, JsonConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, list):
                value = [v.to_dict() if isinstance(v, JsonConfig) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Builds the config from a dict; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        kwargs = {name: _convert(value, hints.get(name, Any)) for name, value in data.items()}
        return cls(**kwargs)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialises to JSON; writes it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls: type[T], text_or_path: str | Path) -> T:
        """Parses a JSON string, or reads a JSON file when given a path that exists."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise ValueError(f"{cls.__name__}: {path} is neither a JSON object nor a JSON file")
            text = path.read_text()
        return cls.from_dict(json.loads(text))

    def replace(self: T, **changes: Any) -> T:
        """Returns a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def check_choice(cls_name: str, field: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{cls_name}.{field}={value!r} is not valid; choose one of {list(choices)}")
