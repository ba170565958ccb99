"""The server's continuous batch: requests join a running decode batch and leave it at token boundaries.

Shape legend: B = rows in the batch, V = vocabulary.

* A request becomes a :class:`BatchRow` (its sampler with its own seeded ``torch.Generator``,
  ``max_tokens``, whether it wants log-probabilities) and waits in :attr:`BatchScheduler.waiting`.
* One driver task on the event loop runs :meth:`BatchScheduler.run_ticks` on the engine's single
  worker thread while any row is waiting or running. It ticks back to back, handing each tick's
  tokens to the event loop without waiting for it (a round trip through the event loop per step
  costs two thread wake-ups, about as long as a small model's step on a busy machine), and gives
  the worker back between ticks when another model call (an echo's prompt log-probabilities, a
  one-at-a-time request) is waiting for it. A tick: drops rows that
  finished or whose client went away; starts prefilling waiting rows while there is room under
  ``max_batch`` (running plus prefilling rows); prefills them alone (batch 1, so a joining prompt
  never pads the others), samples the first token of each whose prompt is done and lets it join;
  then runs one :class:`~moekit.models.batch_decode.DecodeBatch` step over every running row and
  samples each row's next token with that row's own sampler.
* Chunked prefill (``prefill_chunk``): a tick prefills at most ``prefill_chunk`` prompt tokens,
  in chunks of a :class:`~moekit.models.batch_decode.ChunkedPrefill` (whole chunks, in arrival
  order; short prompts share a tick's budget), so a long prompt is ingested over several ticks
  while the running rows keep getting one token per tick. Without it every waiting prompt is
  prefilled in one go, and the running rows wait for the whole prompt.
* Tokens go back to each request's handler through its own ``asyncio.Queue``; the handler turns
  them into text, stop sequences and log-probabilities exactly as for a request decoded alone.
  A handler that stops early (stop sequence, disconnect, cancellation) sets
  :attr:`BatchRow.cancelled`; the next tick drops the row.

A row's tokens do not depend on which other rows share its steps: rows never pad each other, a
prompt's chunks are set by its length and ``prefill_chunk`` alone, the step treats rows independently (:func:`~moekit.models.batch_decode.batch_decode_supported`),
and each row samples from its own generator in its own order. A request therefore gets the same
tokens batched as alone, greedy or seeded (``tests/test_server_batching.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import torch

from moekit.models.batch_decode import ChunkedPrefill, DecodeBatch
from moekit.models.generation import Sampler


@dataclass
class BatchStats:
    """Counters of the continuous batch, on ``/health`` under ``batch``."""

    steps: int = 0
    row_steps: int = 0
    prefills: int = 0
    prefill_chunks: int = 0
    largest: int = 0


class BatchRow:
    """One request in the continuous batch.

    Args:
        prompt_ids: the prompt's token ids.
        sampler: the request's own sampler (its generator seeded from the request's ``seed``).
        max_tokens: tokens to produce at most.
        want_logprobs: also send each token's log-probabilities ``[V]``.
        pixel_values: a VLM request's images (``[N, C, H, W]``) or None.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        sampler: Sampler,
        max_tokens: int,
        want_logprobs: bool,
        pixel_values=None,
    ) -> None:
        self.prompt_ids, self.sampler, self.max_tokens = prompt_ids, sampler, max_tokens
        self.want_logprobs, self.pixel_values = want_logprobs, pixel_values
        #: ``(token_id, logprobs [V] or None)`` items, then None at the end (or an exception)
        self.queue: asyncio.Queue = asyncio.Queue()
        #: set by the handler when it needs no more tokens; the next tick drops the row
        self.cancelled = False
        #: set by the scheduler once the row produced EOS or max_tokens tokens
        self.finished = False
        self.num_generated = 0
        self.next_token = -1

    @property
    def done(self) -> bool:
        """Whether the row needs no more steps."""
        return self.finished or self.cancelled


class BatchScheduler:
    """Runs the continuous batch for an :class:`~moekit.infer.server_engine.Engine`.

    Args:
        model: the served model (a :class:`~moekit.models.MoEForCausalLM`, or a
            :class:`~moekit.models.vision.llava.MoELLaVA` whose language model decodes).
        vision: whether ``model`` is a VLM (its prompts prefill from spliced image embeddings).
        eos_token_id: a row stops after producing it.
        max_batch: rows decoded together at most; more requests wait for a place.
        call: ``await call(fn, *args)`` runs ``fn`` on the engine's worker thread.
        stats: the server's counters (``generated_tokens`` is counted here).
        token_delay_s: sleep after each step (tests and demos of cancellation only).
        others_waiting: ``others_waiting() -> bool``, True when another call waits for the worker
            thread (then :meth:`run_ticks` returns after the current tick).
        prefill_chunk: prompt tokens prefilled per tick at most, in chunks of this size (None:
            each waiting prompt in one go).
    """

    def __init__(
        self,
        model,
        *,
        vision: bool,
        eos_token_id: int,
        max_batch: int,
        call,
        stats,
        token_delay_s: float = 0.0,
        others_waiting=None,
        prefill_chunk: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (or None), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model, self.vision, self.eos = model, vision, eos_token_id
        self.lm = model.language_model if vision else model
        self.max_batch, self.call, self.stats, self.token_delay_s = max_batch, call, stats, token_delay_s
        self.others_waiting = others_waiting or (lambda: False)
        self.batch = DecodeBatch(self.lm)
        self.device = next(self.lm.parameters()).device
        self.batch_stats = BatchStats()
        self.waiting: deque[BatchRow] = deque()
        #: the running rows, in the batch's row order (touched by the worker thread only)
        self.rows: list[BatchRow] = []
        #: rows whose prompt is being prefilled, in arrival order (worker thread only)
        self.prefilling: list[tuple[BatchRow, ChunkedPrefill]] = []
        self._driver: asyncio.Task | None = None

    def submit(self, row: BatchRow) -> None:
        """Queues ``row`` to join the batch (event loop side); starts the driver if it is idle."""
        self.waiting.append(row)
        if self._driver is None:
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    def health(self) -> dict:
        """The batch's part of ``/health``."""
        s = self.batch_stats
        return {
            "max_batch": self.max_batch,
            "prefill_chunk": self.prefill_chunk,
            "running": len(self.rows),
            "prefilling": len(self.prefilling),
            "waiting": sum(not r.cancelled for r in self.waiting),
            "steps": s.steps,
            "mean_rows_per_step": round(s.row_steps / s.steps, 2) if s.steps else 0.0,
            "largest": s.largest,
            "prefills": s.prefills,
            "prefill_chunks": s.prefill_chunks,
        }

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # Rows that arrive while run_ticks is returning are seen here (both on the event loop).
            while self.waiting or self.rows or self.prefilling:
                try:
                    await self.call(self.run_ticks, loop)
                except Exception as exc:  # noqa: BLE001 - a failed tick fails its rows, not the server
                    self._deliver([(row, exc) for row in self.rows + [r for r, _ in self.prefilling]])
                    self.rows, self.prefilling = [], []
                    self.batch = DecodeBatch(self.lm)
        finally:
            self._driver = None

    @staticmethod
    def _deliver(emitted: list) -> None:
        for row, item in emitted:
            row.queue.put_nowait(item)

    # -- worker thread side --

    def run_ticks(self, loop) -> None:
        """Ticks until no row is waiting or running, or another call waits for the worker thread.

        Each tick's tokens go to ``loop`` (the event loop) as soon as the tick ends.
        """
        while True:
            emitted = self.tick()
            if emitted:
                loop.call_soon_threadsafe(self._deliver, emitted)
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            if not (self.rows or self.waiting or self.prefilling) or self.others_waiting():
                return

    def _emit(self, row: BatchRow, logits_1V, out: list) -> None:
        """Samples ``row``'s next token from its ``[1, V]`` logits and queues it for the handler."""
        token = int(row.sampler(logits_1V)[0])
        row.num_generated += 1
        row.next_token = token
        self.stats.generated_tokens += 1
        logprobs_V = logits_1V[0].log_softmax(-1) if row.want_logprobs else None
        out.append((row, (token, logprobs_V)))
        if token == self.eos or row.num_generated >= row.max_tokens:
            row.finished = True
            out.append((row, None))

    def _start_prefill(self, row: BatchRow) -> ChunkedPrefill:
        ids = torch.tensor([row.prompt_ids], device=self.device)
        embeds = None
        if self.vision:
            embeds = self.model.spliced_embeds(ids, row.pixel_values)
        return ChunkedPrefill(self.lm, ids, self.prefill_chunk, inputs_embeds=embeds)

    def _drop_done(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) != len(self.rows):
            self.batch.keep(keep)
            self.rows = [self.rows[i] for i in keep]

    def _prefill_chunks(self, out: list) -> None:
        """Runs whole prefill chunks, oldest prompt first, within the tick's ``prefill_chunk`` budget;
        a prompt that finishes samples its first token and joins the batch."""
        spent = 0
        while self.prefilling:
            row, pre = self.prefilling[0]
            num = pre.next_chunk
            # The first chunk always runs (a chunk is at most the budget), so every tick advances.
            if self.prefill_chunk is not None and spent and spent + num > self.prefill_chunk:
                return
            try:
                logits_1V = pre.run_chunk()
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                self.prefilling.pop(0)
                out.append((row, exc))
                continue
            spent += num
            self.batch_stats.prefill_chunks += 1
            if logits_1V is None:
                continue
            self.prefilling.pop(0)
            self.batch_stats.prefills += 1
            self._emit(row, logits_1V, out)
            if not row.done:
                self.batch.join(pre)
                self.rows.append(row)

    @torch.no_grad()
    def tick(self) -> list[tuple[BatchRow, object]]:
        """Drops done rows, prefills waiting rows (within ``prefill_chunk``), runs one step; returns
        ``(row, item)`` to deliver."""
        out: list = []
        self._drop_done()
        self.prefilling = [(row, pre) for row, pre in self.prefilling if not row.cancelled]
        while self.waiting and len(self.rows) + len(self.prefilling) < self.max_batch:
            row = self.waiting.popleft()
            if row.cancelled:
                continue
            try:
                self.prefilling.append((row, self._start_prefill(row)))
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                out.append((row, exc))
        self._prefill_chunks(out)
        if self.rows:
            next_B = torch.tensor([row.next_token for row in self.rows], device=self.device)
            try:
                logits_BV = self.batch.step(next_B)
            except Exception as exc:  # noqa: BLE001 - the running rows fail; the server goes on
                out.extend((row, exc) for row in self.rows)
                self.rows = []
                self.batch = DecodeBatch(self.lm)
                return out
            s = self.batch_stats
            s.steps += 1
            s.row_steps += len(self.rows)
            s.largest = max(s.largest, len(self.rows))
            for i, row in enumerate(self.rows):
                self._emit(row, logits_BV[i : i + 1], out)
            self._drop_done()
        return out
