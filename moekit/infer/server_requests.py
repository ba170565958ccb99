"""Request bodies of the OpenAI-compatible server, validated strictly, and its error shape.

Bodies are parsed with pydantic in strict JSON mode, as OpenAI's API does: ``"max_tokens": "5"``,
``"max_tokens": true`` and ``"stream": "yes"`` are type errors (a bool is not an int), an int is
accepted where a float is wanted. Every error, whatever raised it, is answered with OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` (see :func:`error_body`).

Fields that OpenAI defines but this server does not implement are declared, so that a request
using them is refused with a 400 that says so instead of being silently ignored. Unknown fields
(``user``, ``metadata``, ``stream_options``, ...) are accepted and ignored, as OpenAI does.

To add a field: declare it on :class:`_Request` (both endpoints) or one endpoint's class with its
OpenAI name, type and range; if it is not implemented, list it in :data:`_UNSUPPORTED`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_STOP_SEQUENCES = 4
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for /v1/completions "logprobs"
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's bound for chat "top_logprobs"
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value


class RequestError(Exception):
    """A client (or server) error: becomes an OpenAI-style error response with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers


def error_body(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _check_text(value: str, what: str) -> str:
    # JSON may carry a lone surrogate (``"\ud800"``); no tokenizer can encode it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate at position {e.start})") from None
    return value


class _Request(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names, types and ranges)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return [_check_text(s, "a stop sequence") for s in stops]

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        for name, default in _UNSUPPORTED.items():
            value = getattr(self, name, default)
            if value is None or value == default or value == {} or value == []:
                continue
            raise RequestError(400, f"{name}={value!r} is not supported by this server", name)
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise RequestError(
                400,
                f"max_tokens={self.max_tokens} and max_completion_tokens={self.max_completion_tokens} "
                "disagree; send one of them",
                "max_completion_tokens",
            )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name), else ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# Fields OpenAI defines that this server does not implement, with the value that means "off".
_UNSUPPORTED: dict[str, Any] = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
    "best_of": 1,
    "suffix": None,
    "tools": None,
    "functions": None,
}


class CompletionRequest(_Request):
    """``POST /v1/completions`` body: ``prompt`` is a string (or a list holding one string).

    ``logprobs`` (0 to 5): the chosen tokens' log-probabilities and that many top alternatives.
    ``echo``: the reply starts with the prompt (with ``logprobs``, the prompt tokens get theirs too).
    """

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int = Field(default=1, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt per request is supported (batch prompts are not)")
            prompt = prompt[0]
        return _check_text(prompt, "the prompt")


class TextPart(BaseModel):
    """One text content part of a chat message."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """OpenAI's ``image_url`` object; only ``data:`` URLs (base64) are accepted: the server fetches nothing."""

    model_config = ConfigDict(extra="ignore", strict=True)

    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    """One image content part: ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["image_url"]
    image_url: ImageURL


# Where an image part sat in a message's text; the server expands it to the image's placeholders.
IMAGE_MARKER = "<image>"


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL; :class:`RequestError` (400) for any other URL."""
    if not url.startswith("data:"):
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise RequestError(
            400,
            f"image_url {shown!r} is not a data: URL; send the image inline as data:image/png;base64,... "
            "(this server fetches no URLs)",
            "messages",
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RequestError(400, "image_url data: URLs must be base64 (data:image/png;base64,...)", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "image_url: the data: URL's base64 payload is invalid", "messages") from None


class ChatMessage(BaseModel):
    """One chat message; ``content`` is a string or a list of text and image parts.

    Parts are joined into one string; each image part leaves :data:`IMAGE_MARKER` at its place and
    its decoded bytes in :attr:`images` (in order).
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: str | None = None
    _images: list[bytes] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _join_parts(self):
        if isinstance(self.content, list):
            pieces = []
            for part in self.content:
                if isinstance(part, ImagePart):
                    self._images.append(decode_data_url(part.image_url.url))
                    pieces.append(IMAGE_MARKER)
                else:
                    pieces.append(part.text)
            self.content = "".join(pieces)
        _check_text(self.content, "message content")
        return self

    @property
    def images(self) -> list[bytes]:
        """The decoded bytes of this message's image parts, in order."""
        return self._images


class ChatRequest(_Request):
    """``POST /v1/chat/completions`` body.

    ``logprobs`` (bool) and ``top_logprobs`` (0 to 20) as in OpenAI's chat API.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        return self


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "ImagePart", "ChatMessage"}


def _is_type_tag(part: Any) -> bool:
    # pydantic puts the union member tried into the error's location (``stop.list[str]``); the
    # client's field is what comes before it.
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "(" in part)


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Validates ``raw`` (the request body) as ``model``; :class:`RequestError` (400) otherwise.

    The message lists every problem as ``field: what is wrong``; ``param`` is the first field's
    dotted name, or None when the body is not JSON at all.
    """
    try:
        return model.model_validate_json(raw)
    except RequestError:
        raise
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":
            detail = errors[0].get("ctx", {}).get("error") or errors[0]["msg"]
            raise RequestError(
                400, f"the request body is not valid JSON (UTF-8): {detail}", None, "invalid_json"
            ) from None
        parts, param = [], None
        for err in errors:
            loc = ".".join(str(x) for x in err.get("loc", ()) if not _is_type_tag(x))
            if param is None and loc:
                param = loc
            msg = err.get("msg", "invalid")
            part = f"{loc or 'body'}: {msg.removeprefix('Value error, ')}"
            if part not in parts:
                parts.append(part)
        raise RequestError(400, "; ".join(parts), param) from None
    except ValueError as exc:  # a RequestError raised inside a validator arrives wrapped
        raise RequestError(400, str(exc)) from None
