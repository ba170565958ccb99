"""The server's generation engine: admission queue, tokenization, one model worker, text events.

* Continuous batching (``max_batch`` > 1, the default 8): up to ``max_batch`` requests decode
  together, joining and leaving the running batch at token boundaries
  (:mod:`moekit.infer.server_batch`); later ones wait for a place in arrival order. With
  ``max_batch=1``, with ``compile`` (the compiled step is batch-1) or for a model whose rows are
  not independent (:func:`~moekit.models.batch_decode.batch_decode_supported`), one generation
  runs at a time: admitted requests wait on an ``asyncio.Lock`` in arrival order.
* Every model call runs on one dedicated worker thread, so the model is never used
  concurrently even when a cancelled request's last token is still being computed.
* Admission is bounded: past ``max_batch + max_queue`` admitted requests (``1 + max_queue``
  without batching; running, waiting or still tokenizing) a new one gets 429 with
  ``Retry-After`` instead of joining an unbounded FIFO.
* Tokenization runs on a thread with the GIL released (``encode_batch``), so the event loop
  (``/health``, other requests' streams) keeps answering while a long prompt is tokenized.
* Generation advances one token at a time (one batch step, or one worker call without
  batching); between tokens the handler checks
  ``await request.is_disconnected()``, so a client that goes away stops its generation after at
  most one more token.
* Stop sequences: text that could be the start of a stop sequence is held back until it is not;
  when generation ends any other way (EOS, length) the held-back tail is sent.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from moekit.infer.server_batch import BatchRow, BatchScheduler
from moekit.infer.server_requests import RequestError
from moekit.models.batch_decode import batch_decode_supported
from moekit.models.decode import DecodeSession
from moekit.models.generation import Sampler, iter_tokens


@dataclass
class ServerStats:
    """Counters exposed on ``/health``."""

    requests: int = 0
    generated_tokens: int = 0
    cancelled: int = 0
    active: int = 0
    queued: int = 0
    rejected_busy: int = 0
    errors: int = 0
    last_request_tokens: int = 0
    started: float = field(default_factory=time.time)


@dataclass
class TokenInfo:
    """One generated (or echoed) token with its log-probability.

    Attributes:
        token: its text (bytes that are not whole characters: ``"bytes:\\xe2\\x80"``).
        token_bytes: its UTF-8 bytes.
        logprob: log-probability under the model (None for a prompt's first token).
        top: the most likely alternatives at that position, ``(text, bytes, logprob)``.
        offset: character offset of the token's start in the returned text.
    """

    token: str
    token_bytes: list[int]
    logprob: float | None
    top: list[tuple[str, list[int], float]]
    offset: int


def _gpt2_byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (a printable character per byte) back to bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class _Recorder:
    """A score source that remembers the last scores it returned (for log-probabilities)."""

    def __init__(self, source) -> None:
        self.source, self.last_BV = source, None

    def prefill(self):
        self.last_BV = self.source.prefill()
        return self.last_BV

    def step(self, next_B):
        self.last_BV = self.source.step(next_B)
        return self.last_BV


class Slot:
    """An admitted request's place in the queue; :meth:`release` is idempotent."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.released, self.t0 = engine, False, time.monotonic()

    def release(self) -> None:
        """Frees the place (call once the response is finished, however it finished)."""
        if not self.released:
            self.released = True
            self.engine.admitted -= 1
            elapsed = time.monotonic() - self.t0
            self.engine.mean_request_s = 0.8 * self.engine.mean_request_s + 0.2 * elapsed


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could start a stop sequence (not yet safe to send)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


class Engine:
    """Model, tokenizer and one worker thread; turns a request into a stream of text events.

    Args:
        model: the language model (eval mode; possibly offloaded).
        tokenizer: a ``tokenizers.Tokenizer``.
        max_context: prompt + completion bound; None uses the model's positions. Larger than the
            model's ``max_position_embeddings`` is a ``ValueError``.
        max_tokens_limit: the largest completion a request may ask for.
        max_queue: admitted requests that may wait behind the running ones.
        eos_token_id: the end-of-text id.
        token_delay_s: sleep after each token (tests and demos of cancellation only).
        compile: decode with a compiled step (see :class:`DecodeSession`); requests then run one
            at a time.
        image_preprocess: a VLM's image preprocessing (default: its tower's).
        max_batch: requests decoded together at most (continuous batching); 1 runs one at a time.
        prefill_chunk: continuous batching's chunked prefill: prompt tokens prefilled per decode
            step at most (None: each joining prompt in one go). See :mod:`moekit.infer.server_batch`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_context: int | None,
        max_tokens_limit: int,
        max_queue: int,
        eos_token_id: int,
        token_delay_s: float = 0.0,
        compile: bool = False,
        image_preprocess=None,
        max_batch: int = 8,
        prefill_chunk: int | None = None,
    ) -> None:
        from moekit.models.vision.llava import MoELLaVA
        from moekit.models.vision.llava import image_preprocess as default_preprocess

        #: the VLM's image preprocessing, or None for a text-only model
        self.vision = None
        if isinstance(model, MoELLaVA):
            self.vision = image_preprocess or default_preprocess(model.config)
        positions = (model.config.text if self.vision is not None else model.config).max_position_embeddings
        if max_context is not None and max_context > positions:
            raise ValueError(
                f"max_context={max_context} exceeds the model's {positions} positions; "
                f"use at most {positions}"
            )
        self.model, self.tokenizer, self.eos = model, tokenizer, eos_token_id
        self.max_context = max_context or positions
        self.max_tokens_limit, self.max_queue = max_tokens_limit, max_queue
        self.token_delay_s, self.compile = token_delay_s, compile
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-generate")
        # Calls handed to the worker that it has not begun: the batch gives the worker back
        # between ticks while one waits (see ``call``).
        self._waiting_calls: set = set()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        lm = model.language_model if self.vision is not None else model
        #: the continuous batch, or None when requests run one at a time
        self.scheduler = None
        if max_batch > 1 and not compile and batch_decode_supported(lm):
            self.scheduler = BatchScheduler(
                model,
                vision=self.vision is not None,
                eos_token_id=eos_token_id,
                max_batch=max_batch,
                call=self.call,
                stats=None,
                token_delay_s=token_delay_s,
                others_waiting=lambda: bool(self._waiting_calls),
                prefill_chunk=prefill_chunk,
            )
        self.lock = asyncio.Lock()
        self.stats = ServerStats()
        if self.scheduler is not None:
            self.scheduler.stats = self.stats
        self.admitted = 0
        self.mean_request_s = 1.0
        vocab = tokenizer.get_vocab()
        # A token covers at most this many UTF-8 bytes (4 per character is the UTF-8 maximum), so a
        # prompt of more than max_context times this many bytes cannot fit and needs no tokenizing.
        self.max_token_bytes = 4 * max((len(t) for t in vocab), default=1)
        decoder = type(getattr(tokenizer, "decoder", None)).__name__
        self.byte_decoder = _gpt2_byte_decoder() if decoder == "ByteLevel" else None

    # -- admission and tokenization (event loop side) --

    def admit(self) -> Slot:
        """A place in the queue, or a 429 :class:`RequestError` with ``Retry-After`` when full."""
        running = 1 if self.scheduler is None else self.scheduler.max_batch
        if self.admitted >= running + self.max_queue:
            self.stats.rejected_busy += 1
            retry = max(1, math.ceil(self.mean_request_s * self.admitted / running))
            raise RequestError(
                429,
                f"the server is busy ({self.admitted} requests running or queued); retry after {retry} s",
                None,
                "rate_limit_exceeded",
                kind="requests",
                # The body is not read, so the connection cannot be reused for the next request.
                headers={"Retry-After": str(retry), "Connection": "close"},
            )
        self.admitted += 1
        return Slot(self)

    def _encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not).
        ids = self.tokenizer.encode_batch([text])[0].ids
        return ids or [self.eos]  # an empty prompt starts from the document separator

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, computed off the event loop; 400 when it cannot fit the context."""
        num_bytes = len(text.encode("utf-8"))
        if num_bytes > self.max_context * self.max_token_bytes:
            raise RequestError(
                400,
                f"the prompt ({num_bytes} bytes) cannot fit the context length ({self.max_context} tokens)",
                "prompt",
                "context_length_exceeded",
            )
        return await asyncio.to_thread(self._encode, text)

    def check_limits(self, body, prompt_len: int, default_max: int) -> int:
        """The effective max_tokens, or a 400 :class:`RequestError`.

        An explicit ``max_tokens`` (or ``max_completion_tokens``) must fit both the server's limit
        and the room left in the context; the default is clamped to that room.
        """
        room = self.max_context - prompt_len
        asked = body.requested_max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if room < 1:
            raise RequestError(
                400,
                f"the prompt ({prompt_len} tokens) leaves no room in the context length "
                f"({self.max_context} tokens); shorten the prompt",
                "messages" if hasattr(body, "messages") else "prompt",
                "context_length_exceeded",
            )
        if asked is None:
            return min(default_max, self.max_tokens_limit, room)
        if asked > self.max_tokens_limit:
            raise RequestError(
                400, f"{param}={asked} exceeds this server's limit of {self.max_tokens_limit}", param
            )
        if asked > room:
            raise RequestError(
                400,
                f"the prompt ({prompt_len} tokens) plus {param} ({asked}) exceeds the context length "
                f"({self.max_context} tokens); shorten the prompt or lower {param}",
                param,
                "context_length_exceeded",
            )
        return asked

    # -- token text and log-probabilities --

    def token_bytes(self, token_id: int) -> list[int]:
        """The UTF-8 bytes a token stands for (a special token: its name)."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:  # an id past the tokenizer's vocabulary (the model's can be larger): no text
            return []
        if self.byte_decoder is not None and all(c in self.byte_decoder for c in piece):
            return [self.byte_decoder[c] for c in piece]
        return list(piece.encode("utf-8"))

    @staticmethod
    def token_text(raw: list[int]) -> str:
        """A token's text; bytes that are not whole characters are written ``bytes:\\xe2\\x80`` (as OpenAI does)."""
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _info(self, token_id: int, logprobs_V, top: int, offset: int) -> TokenInfo:
        raw = self.token_bytes(token_id)
        alternatives = []
        if top and logprobs_V is not None:
            values, ids = logprobs_V.topk(min(top, logprobs_V.shape[-1]))
            for v, i in zip(values.tolist(), ids.tolist(), strict=True):
                alt = self.token_bytes(i)
                alternatives.append((self.token_text(alt), alt, v))
        lp = None if logprobs_V is None else float(logprobs_V[token_id])
        return TokenInfo(self.token_text(raw), raw, lp, alternatives, offset)

    def prompt_infos(self, prompt_ids: list[int], top: int) -> list[TokenInfo]:
        """Echoed prompt tokens with their log-probabilities (one forward pass; worker thread)."""
        with torch.no_grad():
            logits_SV = self.model(torch.tensor([prompt_ids])).logits[0].float()
        logprobs_SV = logits_SV.log_softmax(-1)
        infos = []
        for i, tid in enumerate(prompt_ids):
            offset = len(self.tokenizer.decode(prompt_ids[:i]).rstrip("\ufffd"))
            infos.append(self._info(tid, None if i == 0 else logprobs_SV[i - 1], top, offset))
        return infos

    # -- generation (worker thread side, then the async driver) --

    def vision_prompt(self, prompt: str, images: list[bytes], text_ids: list[int]):
        """A VLM prompt's ``(ids with image placeholders, pixel_values [N, C, H, W] or None)``.

        ``prompt`` holds one image marker per image (where its content part was); ``text_ids``
        is the plain encoding, used when there are no images. 400 for unreadable images or a
        prompt that holds the image token itself.
        """
        from moekit.data.images import preprocess_images, read_image
        from moekit.models.vision.llava import image_prompt_ids

        cfg = self.model.config
        pixel_values = None
        if images:
            try:
                arrays = [read_image(b, name=f"image {i + 1}") for i, b in enumerate(images)]
                pixel_values = torch.cat([preprocess_images(a[None], self.vision) for a in arrays])
                ids = image_prompt_ids(
                    lambda t: self.tokenizer.encode_batch([t])[0].ids, prompt, len(images), cfg
                )
            except ValueError as e:
                raise RequestError(400, f"image content: {e}", "messages") from None
            pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        else:
            ids = text_ids
        if ids.count(cfg.image_token_id) != len(images) * cfg.image_seq_length:
            raise RequestError(400, "the prompt text holds the image placeholder token itself", "messages")
        return ids, pixel_values

    def start(
        self, prompt_ids: list[int], body, max_tokens: int, want_logprobs: bool, pixel_values=None
    ) -> Iterator:
        """The request's token source: a :class:`BatchRow` to join the continuous batch, or (one
        request at a time) a blocking iterator of ``(token_id, logprobs [V] or None)`` (worker
        thread; one ``next`` per token)."""
        sampler = self.request_sampler(body)
        if self.scheduler is not None:
            return BatchRow(prompt_ids, sampler, max_tokens, want_logprobs, pixel_values)
        ids = torch.tensor([prompt_ids])
        if self.vision is not None:  # the LM decodes after a prefill of the spliced embeddings
            session = DecodeSession(
                self.model.language_model,
                ids,
                max_new_tokens=max_tokens,
                inputs_embeds=self.model.spliced_embeds(ids, pixel_values),
            )
        else:
            session = DecodeSession(self.model, ids, max_new_tokens=max_tokens, compile=self.compile)
        return self.session_tokens(session, max_tokens, sampler, want_logprobs)

    @staticmethod
    def request_sampler(body) -> Sampler:
        """The request's sampler: its temperature and top-p, and a generator seeded from ``seed``
        (a random seed when the request names none)."""
        seed = body.seed if body.seed is not None else random.randrange(2**63)
        return Sampler(
            temperature=body.temperature,
            top_p=None if body.top_p >= 1.0 else body.top_p,
            generator=torch.Generator().manual_seed(seed),
        )

    def session_tokens(self, session, max_tokens: int, sampler: Sampler, want_logprobs: bool) -> Iterator:
        """A blocking iterator of ``(token_id, float32 logprobs [V] or None)`` over a score source
        (``prefill``/``step``, e.g. a :class:`DecodeSession`), counting tokens in the stats."""
        source = _Recorder(session) if want_logprobs else session
        delay, stats = self.token_delay_s, self.stats

        def tokens():
            for next_B in iter_tokens(source, max_tokens, sampler, eos_token_id=self.eos):
                stats.generated_tokens += 1
                if delay:
                    time.sleep(delay)
                logprobs_V = source.last_BV[0].float().log_softmax(-1) if want_logprobs else None
                yield int(next_B[0]), logprobs_V

        return tokens()

    async def call(self, fn, *args):
        """Runs ``fn(*args)`` on the model's worker thread."""

        token = object()

        def job():
            self._waiting_calls.discard(token)
            return fn(*args)

        self._waiting_calls.add(token)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, job)
        finally:
            self._waiting_calls.discard(token)  # also when cancelled before it began

    async def run(
        self, request, prompt_ids: list[int], body, max_tokens: int, top: int | None, pixel_values=None
    ) -> AsyncIterator[tuple]:
        """Yields ``("text", piece, infos)`` as text becomes final, then ``("end", finish_reason, num_tokens)``.

        ``top`` is None without log-probabilities, else how many alternatives each token lists;
        ``infos`` are the :class:`TokenInfo` of the tokens that start inside ``piece``. Holds the
        engine lock for the whole generation; stops early when the client disconnects.
        """
        stops: list[str] = body.stop or []
        done = object()
        # Text requests keep start's four-argument call (tests script the engine through it).
        extra = () if pixel_values is None else (pixel_values,)
        it = row = None
        if self.scheduler is not None:  # start is cheap here: it builds the row, the batch prefills it
            it = await self.call(self.start, prompt_ids, body, max_tokens, top is not None, *extra)
            if isinstance(it, BatchRow):
                row, it = it, None
        locked = row is None
        if locked:
            self.stats.queued += 1
            try:
                await self.lock.acquire()
            finally:
                self.stats.queued -= 1
        self.stats.requests += 1
        self.stats.active += 1
        generated: list[int] = []
        pending: list[TokenInfo] = []
        sent, text, finish = 0, "", "length"
        try:
            if row is not None:
                self.scheduler.submit(row)
            elif it is None:
                it = await self.call(self.start, prompt_ids, body, max_tokens, top is not None, *extra)
            while True:
                if row is not None:
                    item = await row.queue.get()
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                else:
                    item = await self.call(next, it, done)
                    if item is done:
                        break
                token, logprobs_V = item
                if token == self.eos:
                    finish = "stop"
                    break
                if top is not None:
                    pending.append(self._info(token, logprobs_V, top, len(text.rstrip("\ufffd"))))
                generated.append(token)
                text = self.tokenizer.decode(generated)
                if await request.is_disconnected():
                    self.stats.cancelled += 1
                    return
                if text.endswith("\ufffd"):
                    continue  # the rest of a multi-byte character is still to come
                found = [i for i in (text.find(s, max(0, sent - len(s) + 1)) for s in stops) if i >= 0]
                if found:
                    cut = min(found)
                    infos = [p for p in pending if p.offset < cut]
                    if cut > sent or infos:
                        yield "text", text[sent:cut], infos
                    yield "end", "stop", len(generated)
                    return
                safe = len(text) - _stop_holdback(text, stops)
                if safe > sent:
                    infos = [p for p in pending if p.offset < safe]
                    pending = pending[len(infos) :]
                    yield "text", text[sent:safe], infos
                    sent = safe
            # EOS or the length limit: nothing more can complete a stop sequence, so the held-back
            # tail (and any incomplete character) is final.
            text = self.tokenizer.decode(generated)
            if len(text) > sent or pending:
                yield "text", text[sent:], pending
            yield "end", finish, len(generated)
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.cancelled += 1
            raise
        finally:
            if row is not None:
                row.cancelled = True  # a no-op once it finished; else the next tick drops it
            self.stats.active -= 1
            self.stats.last_request_tokens = len(generated)
            if locked:
                self.lock.release()
