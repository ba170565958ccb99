"""An OpenAI-compatible HTTP server for moekit models (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``: server-sent
events ``data: {...}\\n\\n`` then ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (status and
counters: requests, generated tokens, cancelled, queued and refused requests, and the continuous
batch's size and steps).

What the server promises (each is tested in ``tests/test_serve*.py``):

* Every error is a 4xx (or, for a bug, a 500) with OpenAI's body
  ``{"error": {"message", "type", "param", "code"}}``: bad JSON, a non-UTF-8 body, a wrong field
  type, 404, 405, 413, 429 and 401 alike. A 500 never closes the keep-alive connection, and a
  streamed response that fails after its 200 ends with an ``error`` event and ``[DONE]``, never a
  cut body. All validation happens before a stream starts.
* Bounded resources: bodies over ``max_body_bytes`` get 413 before they are read (by their
  ``Content-Length``, or as soon as a chunked body passes the limit); tokenization and chat-template
  rendering run off the event loop; past ``max_queue`` waiting requests a request gets 429 with
  ``Retry-After``. See :mod:`moekit.infer.server_engine` for the queue and the worker thread.
* ``max_tokens`` (or ``max_completion_tokens``) is bounded by ``max_tokens_limit`` and by the room
  left in the context; a request that omits it gets ``default_max_tokens`` (completions) or
  ``max_tokens_limit`` (chat), clamped to that room.
* ``logprobs`` (and ``top_logprobs``) of the chosen tokens, ``echo`` for completions; the
  ``developer`` role and ``[{"type": "text", "text": ...}]`` content parts in chat, and for a
  vision-language model ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``
  parts (placed where the part is; other URLs are refused with a 400, the server fetches nothing;
  image parts for a text-only model are a 400 naming it). Fields OpenAI
  defines but this server does not implement (penalties, ``logit_bias``, ``best_of``, ``suffix``,
  tools) are refused with a 400 that names them.
* With ``api_key`` set, ``/v1/*`` needs ``Authorization: Bearer <key>`` (401 otherwise);
  ``/health`` stays open for load balancers.
* Chat prompts use ``chat_template`` from the model folder's ``tokenizer_config.json`` (a Jinja
  template, rendered in a sandbox as transformers does) when present, else
  :data:`DEFAULT_CHAT_TEMPLATE`.

All server state lives in the app built by :func:`create_app` (``app.state``); nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass

# fastapi is the optional ``serve`` extra; this module is imported only by ``moekit serve``. The
# names are module-level because FastAPI resolves the handlers' (string) annotations here.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.infer.server_engine import Engine, ServerStats, TokenInfo
from moekit.infer.server_requests import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    error_body,
    parse_body,
)

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ServerConfig", "ServerStats", "chat_template_of", "create_app"]

log = logging.getLogger("moekit.serve")

# Documented default chat format for models without a chat template: one block per message,
# "<|role|>\n" + content + "\n", then "<|assistant|>\n" to prompt the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 401: "invalid_api_key"}


@dataclass(kw_only=True)
class ServerConfig:
    """What the server serves and its limits.

    Attributes:
        model_name: the id clients must send as ``model`` (and ``/v1/models`` lists).
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        max_context: prompt + ``max_tokens`` bound (None: the model's ``max_position_embeddings``;
            more than that is refused when the app is built).
        default_max_tokens: ``max_tokens`` when a completion request omits it (OpenAI's 16);
            chat requests default to ``max_tokens_limit``. Both are clamped to the room left.
        chat_template: a Jinja chat template (None: :data:`DEFAULT_CHAT_TEMPLATE`).
        max_body_bytes: larger request bodies get 413 without being read.
        max_queue: requests that may wait behind the running ones (``max_batch`` of them, or one
            without batching); more get 429 + ``Retry-After``.
        api_key: when set, ``/v1/*`` requests need ``Authorization: Bearer <api_key>``.
        token_delay_s: sleep after each token. For tests and demos of cancellation only.
        compile: decode with a ``torch.compile``-d step (see :class:`DecodeSession`); the first
            request pays the compilation. The compiled step is batch-1, so requests then run one
            at a time.
        max_batch: continuous batching: up to this many requests decode together, joining and
            leaving the running batch at token boundaries (1: one request at a time). See
            :mod:`moekit.infer.server_batch`.
        prefill_chunk: chunked prefill for continuous batching: a joining prompt is prefilled at
            most this many tokens per decode step, so running requests keep getting tokens while a
            long prompt is ingested (None: each prompt in one go). Ignored when requests run one
            at a time.
    """

    model_name: str
    max_tokens_limit: int = 512
    max_context: int | None = None
    default_max_tokens: int = 16
    chat_template: str | None = None
    max_body_bytes: int = 2 * 2**20
    max_queue: int = 16
    api_key: str | None = None
    token_delay_s: float = 0.0
    compile: bool = False
    max_batch: int = 8
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {self.max_context}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (or None), got {self.prefill_chunk}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string (or None for no key)")


def render_chat(template: str, messages: list[dict], eos_token: str) -> str:
    """Renders a Jinja chat template (sandboxed, like transformers) with a generation prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, eos_token=eos_token, bos_token=""
    )


def _json_error(status: int, message: str, param=None, code=None, kind=None, headers=None) -> JSONResponse:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, param, code, kind), status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: the API key check, and a JSON 500 for any exception that escapes a handler.

    Answering the 500 here (instead of letting the exception reach uvicorn) keeps the keep-alive
    connection open; an exception after the response started is logged and swallowed, since the
    stream generators already end their body cleanly.
    """

    def __init__(self, app, api_key: str | None, stats: ServerStats) -> None:
        self.app, self.api_key, self.stats = app, api_key, stats

    def _authorized(self, scope) -> bool:
        if self.api_key is None or not scope["path"].startswith("/v1"):
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode(), self.api_key.encode()
                )
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            response = _json_error(
                401,
                "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            self.stats.errors += 1
            log.exception("moekit serve: unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = _json_error(
                    500, f"internal server error ({type(exc).__name__}); see the server log"
                )
                await response(scope, receive, send)


class _SlotResponse(StreamingResponse):
    """A stream that frees its queue place when the response ends, however it ends."""

    def __init__(self, content, slot, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = RequestError(
        413,
        f"the request body exceeds this server's limit of {limit} bytes",
        None,
        "request_too_large",
        headers={"Connection": "close"},  # the rest of the body is never read
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _first_per_key(top: list[tuple[str, list[int], float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for text, _, lp in top:
        out.setdefault(text, lp)
    return out


def _completion_logprobs(infos: list[TokenInfo], base_offset: int) -> dict:
    """OpenAI's legacy completions ``logprobs`` object for ``infos``."""
    return {
        "tokens": [i.token for i in infos],
        "token_logprobs": [i.logprob for i in infos],
        # Keyed by text as OpenAI's format is; a repeated text keeps its likeliest entry.
        "top_logprobs": [_first_per_key(i.top) for i in infos],
        "text_offset": [base_offset + i.offset for i in infos],
    }


def _chat_logprobs(infos: list[TokenInfo]) -> dict:
    """OpenAI's chat ``logprobs`` object for ``infos``."""
    return {
        "content": [
            {
                "token": i.token,
                "logprob": i.logprob,
                "bytes": i.token_bytes,
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in i.top],
            }
            for i in infos
        ],
        "refusal": None,
    }


def create_app(
    model,
    tokenizer,
    config: ServerConfig,
    eos_token_id: int | None = None,
    on_shutdown=None,
    image_preprocess=None,
    engine=None,
):
    """Builds the FastAPI app serving ``model`` (a :class:`~moekit.models.MoEForCausalLM` or a
    :class:`~moekit.models.vision.llava.MoELLaVA`, in eval mode).

    Args:
        model: the model (possibly offloaded).
        tokenizer: a ``tokenizers.Tokenizer``.
        config: names, limits and the chat template.
        eos_token_id: the stop token (default: the tokenizer's ``<|endoftext|>``).
        on_shutdown: called once when the server shuts down (uvicorn re-raises SIGTERM after its
            shutdown, so code after ``uvicorn.run`` may never run; this does).
        image_preprocess: a VLM's :class:`~moekit.data.images.ImagePreprocess` (default: the
            tower's, :func:`moekit.models.vision.llava.image_preprocess`).
        engine: a ready engine to serve instead of an :class:`Engine` built from ``model`` (e.g.
            :class:`moekit.mixture.serve.MixtureEngine`). It may define ``async
            describe_request(request, body, prompt_ids, max_tokens) -> dict`` (fields added to the
            response) and ``health_fields() -> dict`` (fields added to ``/health``).

    Raises:
        ValueError: ``config.max_context`` beyond the model's positions.
    """
    from moekit.data.tokenizer import EOS_TOKEN, special_token_id

    eos = special_token_id(tokenizer) if eos_token_id is None else eos_token_id
    engine = engine or Engine(  # a prebuilt engine (an object, never falsy) is served as is
        model,
        tokenizer,
        max_context=config.max_context,
        max_tokens_limit=config.max_tokens_limit,
        max_queue=config.max_queue,
        eos_token_id=eos,
        token_delay_s=config.token_delay_s,
        compile=config.compile,
        image_preprocess=image_preprocess,
        max_batch=config.max_batch,
        prefill_chunk=config.prefill_chunk,
    )
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
    app.add_middleware(_Guard, api_key=config.api_key, stats=engine.stats)

    @app.exception_handler(RequestError)
    async def _request_error(_, exc: RequestError):
        return _json_error(exc.status, exc.message, exc.param, exc.code, exc.kind, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = {
            404: f"no route {request.url.path!r}; this server has /v1/completions, /v1/chat/completions, "
            "/v1/models and /health",
            405: f"method {request.method} is not allowed on {request.url.path!r}",
        }.get(exc.status_code, str(exc.detail))
        return _json_error(
            exc.status_code, message, None, _HTTP_CODES.get(exc.status_code), headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):  # only for routes with typed params
        return _json_error(400, "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request")

    @app.get("/health")
    async def health():
        s = engine.stats
        batch = engine.scheduler.health() if engine.scheduler is not None else None
        return {
            "status": "ok",
            "model": config.model_name,
            "requests": s.requests,
            "generated_tokens": s.generated_tokens,
            "cancelled": s.cancelled,
            "active": s.active,
            "queued": s.queued + (batch["waiting"] if batch else 0),
            "rejected_busy": s.rejected_busy,
            "errors": s.errors,
            "last_request_tokens": s.last_request_tokens,
            "uptime_s": round(time.time() - s.started, 1),
            # continuous batching: max_batch, running and waiting rows, steps, mean rows per
            # step, the largest batch so far, prefills; None when requests run one at a time
            "batch": batch,
            **(engine.health_fields() if hasattr(engine, "health_fields") else {}),
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

    async def _respond(
        request: Request, body, prompt_ids: list[int], chat: bool, default_max: int, slot, pixel_values=None
    ):
        if body.model != config.model_name:
            raise RequestError(
                404,
                f"model {body.model!r} is not served here; use {config.model_name!r}",
                "model",
                "model_not_found",
            )
        if body.n != 1:
            raise RequestError(400, f"n={body.n} is not supported; this server returns one choice (n=1)", "n")
        max_tokens = engine.check_limits(body, len(prompt_ids), default_max)
        if chat:
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            top = body.logprobs
        echo = (not chat) and body.echo
        prefix, prompt_infos = "", []
        if echo:
            prefix = body.prompt
            if top is not None and body.prompt:
                prompt_infos = await engine.call(engine.prompt_infos, prompt_ids, top)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        base = {"id": rid, "created": int(time.time()), "model": config.model_name}
        if hasattr(engine, "describe_request"):
            base.update(await engine.describe_request(request, body, prompt_ids, max_tokens))
        events = engine.run(request, prompt_ids, body, max_tokens, top, pixel_values)

        def logprobs_of(infos: list[TokenInfo], offset: int):
            if top is None:
                return None
            return _chat_logprobs(infos) if chat else _completion_logprobs(infos, offset)

        if not body.stream:
            pieces, infos, finish, count = [], list(prompt_infos), "length", 0
            async for kind, *rest in events:
                if kind == "text":
                    pieces.append(rest[0])
                    infos.extend(
                        TokenInfo(i.token, i.token_bytes, i.logprob, i.top, i.offset + len(prefix))
                        for i in rest[1]
                    )
                else:
                    finish, count = rest
            text = "".join(pieces)
            usage = _usage(len(prompt_ids), count)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs_of(infos, 0),
                    "finish_reason": finish,
                }
                return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            choice = {
                "index": 0,
                "text": prefix + text,
                "logprobs": logprobs_of(infos, 0),
                "finish_reason": finish,
            }
            return {**base, "object": "text_completion", "choices": [choice], "usage": usage}

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, usage=None, role=False, logprobs=None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            payload = {**base, "object": obj, "choices": [choice]}
            if usage is not None:
                payload["usage"] = usage
            return _sse(payload)

        async def stream():
            offset = len(prefix)
            try:
                if chat:
                    yield chunk(None, None, role=True)
                if prefix:
                    yield chunk(prefix, None, logprobs=logprobs_of(prompt_infos, 0))
                async for kind, *rest in events:
                    if kind == "text":
                        yield chunk(rest[0], None, logprobs=logprobs_of(rest[1], offset))
                    else:
                        yield chunk(None, rest[0], _usage(len(prompt_ids), rest[1]))
            except Exception as exc:  # the 200 is already sent: end the body cleanly, say what failed
                engine.stats.errors += 1
                log.exception("moekit serve: error while streaming %s", rid)
                message = f"internal server error while streaming ({type(exc).__name__}); see the server log"
                yield _sse(error_body(message, kind="server_error"))
            yield "data: [DONE]\n\n"

        return _SlotResponse(
            stream(), slot, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _serve(request: Request, chat: bool):
        slot = engine.admit()
        handed_over = False
        try:
            raw = await _read_body(request, config.max_body_bytes)
            body = parse_body(ChatRequest if chat else CompletionRequest, raw)
            if chat:
                messages = [m.model_dump(exclude_none=True) for m in body.messages]
                try:
                    prompt = await asyncio.to_thread(render_chat, template, messages, EOS_TOKEN)
                except Exception as e:  # a broken template is the model folder's fault; say what failed
                    raise RequestError(
                        400, f"the chat template failed to render these messages: {e}", "messages"
                    ) from e
                default_max = config.max_tokens_limit
            else:
                prompt, default_max = body.prompt, config.default_max_tokens
            images = [img for m in body.messages for img in m.images] if chat else []
            prompt_ids = await engine.encode(prompt)
            pixel_values = None
            if engine.vision is not None:
                prompt_ids, pixel_values = await asyncio.to_thread(
                    engine.vision_prompt, prompt, images, prompt_ids
                )
            elif images:
                raise RequestError(
                    400,
                    f"model {config.model_name!r} is text-only; image content parts need a vision-language model",
                    "messages",
                )
            response = await _respond(request, body, prompt_ids, chat, default_max, slot, pixel_values)
            handed_over = isinstance(response, _SlotResponse)
            return response
        finally:
            if not handed_over:
                slot.release()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, chat=True)

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
