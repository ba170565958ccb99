"""Shared helpers for config dataclasses: JSON round-trips and field validation.

Every config in moekit is a dataclass that subclasses :class:`JsonConfig`. ``to_dict``/``from_dict``
round-trip through JSON, and ``from_dict`` rejects unknown keys with a message naming them, so a
typo in a config file is an error rather than a silently ignored setting.

Every field's value is checked against its annotation when the config is built (directly, by
``from_dict`` or by ``replace``), before the subclass's own ``__post_init__`` checks ranges. A wrong
type raises :class:`ConfigTypeError` (a ``ValueError``) naming the field and the type it wants:
``"64"`` for an ``int`` field, ``2.5`` for an ``int``, and ``True`` for an ``int`` (bool is not a count)
are all refused. An ``int`` is accepted where a ``float`` is declared, and a list where a tuple is
(JSON has no tuples). Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``Any``,
``Optional``/unions, ``Literal``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[K, V]``
and nested ``JsonConfig`` classes; a subclass using anything else must check it itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")


class ConfigTypeError(ValueError):
    """A config field holds a value of the wrong type.

    Attributes:
        field: the field's dotted name (``"ModelConfig.moe.num_experts"``).
        value: the offending value (the object itself, so callers can find where it came from).
        expected: the wanted type, in words (``"int"``, ``"float or None"``).
    """

    def __init__(self, field: str, value: Any, expected: str) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"{field}: expected {expected}, got {type(value).__name__} {shown}")
        self.field, self.value, self.expected = field, value, expected


def _describe(annotation: Any) -> str:
    """The annotation in words, for error messages."""
    if annotation is Any:
        return "any value"
    if annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a JSON object" if not args else f"a JSON object of {_describe(args[1])}"
    if isinstance(annotation, type):
        if issubclass(annotation, JsonConfig):
            return f"a {annotation.__name__} object"
        return annotation.__name__
    return str(annotation)


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but ``True`` as a layer count is a mistake, not a 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _matches(value: Any, annotation: Any) -> bool | str:
    """Whether ``value`` fits ``annotation``; a string names the failing element (``"[2]"``)."""
    if annotation is Any or annotation is typing.Any:
        return True
    if annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) is True for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return False
            kinds = args
        else:
            kinds = (args[0] if args else Any,) * len(value)
        for i, (item, kind) in enumerate(zip(value, kinds, strict=True)):
            if _matches(item, kind) is not True:
                return f"[{i}]"
        return True
    if origin is dict:
        if not isinstance(value, dict):
            return False
        key_kind, value_kind = args if args else (Any, Any)
        for k, v in value.items():
            if _matches(k, key_kind) is not True or _matches(v, value_kind) is not True:
                return f"[{k!r}]"
        return True
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this checker does not know: the subclass checks it


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of ``cls`` (memoised: a pure function of the class;
    unresolvable ones are skipped)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # a name only the defining scope knows: check what resolves
        return {}


def check_field_types(config: JsonConfig) -> None:
    """Raises :class:`ConfigTypeError` for the first field whose value does not fit its annotation."""
    hints = _hints(type(config))
    name = type(config).__name__
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        if f.name not in hints:
            continue
        value = getattr(config, f.name)
        verdict = _matches(value, hints[f.name])
        if verdict is not True:
            where = f"{name}.{f.name}" + (verdict if isinstance(verdict, str) else "")
            raise ConfigTypeError(where, value, _describe(hints[f.name]))


def _convert(value: Any, annotation: Any) -> Any:
    """Turns JSON values back into the field's type (nested configs, tuples)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        return None
    if isinstance(annotation, type) and issubclass(annotation, JsonConfig):
        return annotation.from_dict(value) if isinstance(value, dict) else value
    if origin is typing.Union or origin is types.UnionType:
        # A nested config in an Optional field: a dict becomes that config; anything else is left
        # for the type check to refuse with the field's name.
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, JsonConfig) and isinstance(value, dict):
                return arg.from_dict(value)
        if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in args):
            return tuple(value)
        return value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


class JsonConfig:
    """Mixin for dataclass configs: ``to_dict``, ``from_dict``, ``to_json``, ``from_json``.

    Subclasses get their fields type-checked (:func:`check_field_types`) on construction, before
    their own ``__post_init__`` runs.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")

        # Wrapping here (the class is created before @dataclass runs) makes the generated __init__
        # call the check. Only the instance's own class checks, so a chain of super() calls
        # checks once.
        def __post_init__(self, *args: Any) -> None:
            if type(self) is cls:
                check_field_types(self)
            if own is not None:
                own(self, *args)
            else:
                parent = getattr(super(cls, self), "__post_init__", None)
                if parent is not None:
                    parent(*args)

        __post_init__.__doc__ = own.__doc__ if own is not None else None
        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]

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
        hints = _hints(cls)
        kwargs = {}
        for name, value in data.items():
            try:
                kwargs[name] = _convert(value, hints.get(name, Any))
            except ConfigTypeError as e:  # a nested config's field: name the path from here
                raise ConfigTypeError(
                    f"{cls.__name__}.{name}.{e.field.split('.', 1)[-1]}", e.value, e.expected
                ) from None
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
