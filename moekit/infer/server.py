"""An OpenAI-compatible HTTP server for moekit models (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``: server-sent
events ``data: {...}\\n\\n`` then ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (status and
counters: requests, generated tokens, cancelled requests).

* One generation runs at a time: requests wait on an ``asyncio.Lock`` in arrival order, and every
  model call runs on one dedicated worker thread, so the model is never used concurrently even
  when a cancelled request's last token is still being computed.
* Generation advances one token per worker call; between tokens the handler checks
  ``await request.is_disconnected()``, so a client that goes away stops its generation after at
  most one more token.
* Requests are pydantic models; a bad request gets a 4xx with an OpenAI-style error body
  (``{"error": {"message", "type", "param", "code"}}``), never a 500. ``n > 1`` is refused with 400.
* ``max_tokens`` is bounded by ``max_tokens_limit`` and prompt + ``max_tokens`` by the context
  length (400 beyond either).
* Chat prompts use ``chat_template`` from the model folder's ``tokenizer_config.json`` (a Jinja
  template, rendered in a sandbox as transformers does) when present, else
  :data:`DEFAULT_CHAT_TEMPLATE`.

All server state lives in the app built by :func:`create_app` (``app.state``); nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch

# fastapi is the optional ``serve`` extra; this module is imported only by ``moekit serve``. The
# names are module-level because FastAPI resolves the handlers' (string) annotations here.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from moekit.models.decode import DecodeSession
from moekit.models.generation import Sampler, iter_tokens

# Documented default chat format for models without a chat template: one block per message,
# "<|role|>\n" + content + "\n", then "<|assistant|>\n" to prompt the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MAX_STOP_SEQUENCES = 4


class _Request(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names and ranges)."""

    # Clients send many optional OpenAI fields (user, logit_bias, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None

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
        return stops


class CompletionRequest(_Request):
    """``POST /v1/completions`` body: ``prompt`` is a string (or a list holding one string)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt per request is supported (batch prompts are not)")
            return prompt[0]
        return prompt


class ChatMessage(BaseModel):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)


@dataclass(kw_only=True)
class ServerConfig:
    """What the server serves and its limits.

    Attributes:
        model_name: the id clients must send as ``model`` (and ``/v1/models`` lists).
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        max_context: prompt + ``max_tokens`` bound (None: the model's ``max_position_embeddings``).
        default_max_tokens: ``max_tokens`` when a completion request omits it (OpenAI's 16);
            chat requests default to ``max_tokens_limit``.
        chat_template: a Jinja chat template (None: :data:`DEFAULT_CHAT_TEMPLATE`).
        token_delay_s: sleep after each token. For tests and demos of cancellation only.
        compile: decode with a ``torch.compile``-d step (see :class:`DecodeSession`); the first
            request pays the compilation.
    """

    model_name: str
    max_tokens_limit: int = 512
    max_context: int | None = None
    default_max_tokens: int = 16
    chat_template: str | None = None
    token_delay_s: float = 0.0
    compile: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")


@dataclass
class ServerStats:
    """Counters exposed on ``/health``."""

    requests: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    active: int = 0
    last_request_tokens: int = 0
    started: float = field(default_factory=time.time)


class RequestError(Exception):
    """A client error: becomes an OpenAI-style error response with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(
    message: str, param: str | None = None, code: str | None = None, kind="invalid_request_error"
):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def render_chat(template: str, messages: list[dict], eos_token: str) -> str:
    """Renders a Jinja chat template (sandboxed, like transformers) with a generation prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, eos_token=eos_token, bos_token=""
    )


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could start a stop sequence (not yet safe to send)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


class _Engine:
    """Model, tokenizer and one worker thread; turns a request into a stream of text pieces."""

    def __init__(self, model, tokenizer, config: ServerConfig, eos_token_id: int) -> None:
        self.model, self.tokenizer, self.config, self.eos = model, tokenizer, config, eos_token_id
        self.max_context = config.max_context or model.config.max_position_embeddings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-generate")
        self.lock = asyncio.Lock()
        self.stats = ServerStats()

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        return ids or [self.eos]  # an empty prompt starts from the document separator

    def check_limits(self, body: _Request, prompt_len: int, default_max: int) -> int:
        """Returns the effective max_tokens or raises a 4xx :class:`RequestError`."""
        if body.model != self.config.model_name:
            raise RequestError(
                404,
                f"model {body.model!r} is not served here; use {self.config.model_name!r}",
                "model",
                "model_not_found",
            )
        if body.n != 1:
            raise RequestError(400, f"n={body.n} is not supported; this server returns one choice (n=1)", "n")
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max
        if max_tokens > self.config.max_tokens_limit:
            raise RequestError(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {self.config.max_tokens_limit}",
                "max_tokens",
            )
        if prompt_len + max_tokens > self.max_context:
            raise RequestError(
                400,
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the context length "
                f"({self.max_context} tokens); shorten the prompt or lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens

    def start(self, prompt_ids: list[int], body: _Request, max_tokens: int):
        """A blocking iterator of new token ids (runs on the worker thread, one ``next`` per token)."""
        seed = body.seed if body.seed is not None else random.randrange(2**63)
        sampler = Sampler(
            temperature=body.temperature,
            top_p=None if body.top_p >= 1.0 else body.top_p,
            generator=torch.Generator().manual_seed(seed),
        )
        session = DecodeSession(
            self.model, torch.tensor([prompt_ids]), max_new_tokens=max_tokens, compile=self.config.compile
        )
        delay = self.config.token_delay_s
        stats = self.stats

        def tokens():
            for next_B in iter_tokens(session, max_tokens, sampler, eos_token_id=self.eos):
                stats.generated_tokens += 1
                if delay:
                    time.sleep(delay)
                yield int(next_B[0])

        return tokens()

    async def run(
        self, request, prompt_ids: list[int], body: _Request, max_tokens: int
    ) -> AsyncIterator[tuple]:
        """Yields ``(text_piece, None)`` as text becomes final, then ``("", finish_reason, num_tokens)``.

        Holds the engine lock for the whole generation; stops early when the client disconnects.
        """
        loop = asyncio.get_running_loop()
        stops: list[str] = body.stop or []
        done = object()
        async with self.lock:
            self.stats.requests += 1
            self.stats.active += 1
            generated: list[int] = []
            sent = 0
            finish = "length"
            try:
                it = await loop.run_in_executor(self.executor, self.start, prompt_ids, body, max_tokens)
                while True:
                    token = await loop.run_in_executor(self.executor, next, it, done)
                    if token is done:
                        break
                    if token == self.eos:
                        finish = "stop"
                        break
                    generated.append(token)
                    text = self.tokenizer.decode(generated)
                    if text.endswith("\ufffd"):
                        continue  # the rest of a multi-byte character is still to come
                    cut = min(
                        (i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0),
                        default=-1,
                    )
                    if cut >= 0:
                        if cut > sent:
                            yield text[sent:cut], None
                        finish = "stop"
                        break
                    safe = len(text) - _stop_holdback(text, stops)
                    if safe > sent:
                        yield text[sent:safe], None
                        sent = safe
                    if await request.is_disconnected():
                        self.stats.cancelled += 1
                        return
                if finish == "length":
                    text = self.tokenizer.decode(generated)
                    if len(text) > sent:
                        yield text[sent:], None
                yield "", finish, len(generated)
            except (asyncio.CancelledError, GeneratorExit):
                self.stats.cancelled += 1
                raise
            finally:
                self.stats.active -= 1
                self.stats.last_request_tokens = len(generated)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def create_app(model, tokenizer, config: ServerConfig, eos_token_id: int | None = None, on_shutdown=None):
    """Builds the FastAPI app serving ``model`` (a :class:`~moekit.models.MoEForCausalLM` in eval mode).

    Args:
        model: the model (possibly offloaded).
        tokenizer: a ``tokenizers.Tokenizer``.
        config: names, limits and the chat template.
        eos_token_id: the stop token (default: the tokenizer's ``<|endoftext|>``).
        on_shutdown: called once when the server shuts down (uvicorn re-raises SIGTERM after its
            shutdown, so code after ``uvicorn.run`` may never run; this does).
    """
    from moekit.train.tokenizer import EOS_TOKEN, special_token_id

    eos = special_token_id(tokenizer) if eos_token_id is None else eos_token_id
    engine = _Engine(model, tokenizer, config, eos)
    template = config.chat_template or DEFAULT_CHAT_TEMPLATE

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.executor.shutdown(wait=False, cancel_futures=True)
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(
        title="moekit", description="OpenAI-compatible completions for a moekit model", lifespan=lifespan
    )
    app.state.engine = engine
    app.state.stats = engine.stats

    @app.exception_handler(RequestError)
    async def _request_error(_, exc: RequestError):
        return JSONResponse(_error_body(exc.message, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        # OpenAI answers malformed bodies with 400 and one readable message.
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = str(first[-1]) if first else None
        return JSONResponse(_error_body("; ".join(parts), param), status_code=400)

    @app.get("/health")
    async def health():
        s = engine.stats
        return {
            "status": "ok",
            "model": config.model_name,
            "requests": s.requests,
            "generated_tokens": s.generated_tokens,
            "cancelled": s.cancelled,
            "active": s.active,
            "last_request_tokens": s.last_request_tokens,
            "uptime_s": round(time.time() - s.started, 1),
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_name,
                    "object": "model",
                    "created": int(engine.stats.started),
                    "owned_by": "moekit",
                }
            ],
        }

    def _sse(payload) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def _respond(request: Request, body: _Request, prompt: str, chat: bool, default_max: int):
        prompt_ids = engine.encode(prompt)
        max_tokens = engine.check_limits(body, len(prompt_ids), default_max)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        base = {"id": rid, "created": created, "model": config.model_name}
        events = engine.run(request, prompt_ids, body, max_tokens)

        if not body.stream:
            pieces, finish, count = [], "length", 0
            async for event in events:
                if event[1] is None:
                    pieces.append(event[0])
                else:
                    finish, count = event[1], event[2]
            text = "".join(pieces)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                return {
                    **base,
                    "object": "chat.completion",
                    "choices": [choice],
                    "usage": _usage(len(prompt_ids), count),
                }
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {
                **base,
                "object": "text_completion",
                "choices": [choice],
                "usage": _usage(len(prompt_ids), count),
            }

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, usage: dict | None = None, role: bool = False) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload = {**base, "object": obj, "choices": [choice]}
            if usage is not None:
                payload["usage"] = usage
            return _sse(payload)

        async def stream():
            if chat:
                yield chunk(None, None, role=True)
            async for event in events:
                if event[1] is None:
                    yield chunk(event[0], None)
                else:
                    yield chunk(None, event[1], _usage(len(prompt_ids), event[2]))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _respond(request, body, body.prompt, chat=False, default_max=config.default_max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = render_chat(template, messages, EOS_TOKEN)
        except Exception as e:  # a broken template is the model folder's fault, but say what failed
            raise RequestError(
                400, f"the chat template failed to render these messages: {e}", "messages"
            ) from e
        return await _respond(request, body, prompt, chat=True, default_max=config.max_tokens_limit)

    return app


def chat_template_of(folder) -> str | None:
    """The ``chat_template`` of ``folder/tokenizer_config.json``, or None."""
    from pathlib import Path

    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return None
    template = json.loads(path.read_text()).get("chat_template")
    if isinstance(template, list):  # transformers also allows [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template or None
