"""One ``generate`` and one sampler for the decoder LM (Hugging Face calling conventions).

Shape legend: B = batch, S = prompt length (left-padded), N = new tokens, V = vocabulary.

:func:`generate` (also ``model.generate``) decodes with a :class:`~moekit.models.decode.DecodeSession`,
whose fast path is taken wherever the model allows it (:func:`~moekit.models.decode.fast_decode_supported`)
and gives the same tokens as the general layers (``tests/test_generation.py``). ``use_cache=False``
recomputes the whole sequence per token through ``model.forward``: the slow, obvious reference.

Sampling, stopping and streaming live in :func:`iter_tokens` (a generator, so a server can run it
one token at a time and stop early) and :class:`Sampler` (the one sampler: greedy, temperature,
top-k, top-p).

Compile policy (``compile="auto"``, the default). The compiled batch-1 decode step
(:func:`~moekit.models.decode._static_decode_step`) runs 20-25% faster than the eager fast path on
the Mixtral-shaped benchmark (16.4 against 20.7 ms/token, 4 layers, one thread, on this 2-core
machine under load), but the first compile in a process costs 11 s of CPU (45 s wall under load;
inductor's on-disk cache shortens it in later processes). One short call never pays that back,
a long session or a server does. So "auto" works like a JIT (rent or buy): a batch-1 CPU
session on the fast path compiles once the tokens this model has decoded eagerly at batch 1,
plus the call's ``max_new_tokens``, reach :data:`AUTO_COMPILE_TOKENS`; from then on every such
call of the model runs compiled (the graph is cached: ``model.decode_compiled``). Batched,
general-path and non-CPU sessions stay eager. ``compile=True``/``False`` decides per call;
``MOEKIT_COMPILE=0`` turns "auto" off. If compiling fails under "auto" (e.g. no C++ compiler),
decoding continues eagerly with a warning.

With the native fp32 decode kernels (:mod:`moekit.kernels.linear`) the eager step is as fast as
the compiled one or faster: on issue 19's ~100 MB Mixtral-shaped model, eager with kernels gave
122 tok/s at 1 thread and 178 at 2, compiled with kernels 111 and 154 (``benchmarks/
bench_kernels.py --generate``, 5 interleaved rounds), because the weight streaming, not the per-operator overhead, is
now the step's cost, and inductor's 2-thread code adds its own parallel regions. So "auto" never
compiles a float32 model while those kernels are loaded: it takes the fastest path and skips the
compile's seconds. ``compile=True`` still compiles (the graph then calls the same ops).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moekit.kernels.linear import native_available
from moekit.models.decode import DecodeSession, compiled_step_supported
from moekit.models.decoder import MoEForCausalLM

# Rent-or-buy: ~2048 eager tokens of the benchmark model (20 ms each, ~40 s) cost about what one
# compile does (11 s CPU, 15-45 s wall here), so compiling then is never worse than 2x the best
# choice in hindsight. Measured with benchmarks/bench_decode.py's model (see the module docstring).
AUTO_COMPILE_TOKENS = 2048
COMPILE_CHOICES = (True, False, "auto")


def filter_logits(logits_BV: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Masks logits outside the top-k and outside the top-p nucleus with -inf."""
    if top_k is not None and 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        # Drop a token when the mass before it already reaches p; the top token always stays.
        drop_BV = (probs_BV.cumsum(-1) - probs_BV) >= top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV


@dataclass(kw_only=True)
class Sampler:
    """Turns next-token scores into token ids.

    Attributes:
        temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: sample among the k highest-scoring tokens (None: all).
        top_p: sample from the smallest nucleus with mass >= p (None or 1.0: all).
        generator: RNG for sampling (a seeded ``torch.Generator`` makes runs repeatable).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax."""
        return self.temperature == 0

    def __call__(self, scores_BV: Tensor) -> Tensor:
        """``[B, V]`` float scores (logits or log-probs; -inf = banned) -> ``[B]`` int64 ids."""
        if self.greedy:
            return scores_BV.argmax(-1)
        scores_BV = filter_logits(scores_BV / self.temperature, self.top_k, self.top_p)
        return torch.multinomial(scores_BV.softmax(-1), 1, generator=self.generator).squeeze(-1)


def _eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def iter_tokens(
    source,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Iterator[Tensor]:
    """Yields the ``[B]`` new ids of each step until ``max_new_tokens`` or every row hit EOS.

    The prompt is prefilled on the first ``next()``; each later ``next()`` decodes one token, so a
    caller (a server thread) can stop between tokens by simply not asking for more.

    Args:
        source: a :class:`~moekit.models.decode.DecodeSession`, or anything with
            ``prefill() -> [B, V]`` and ``step(ids_B) -> [B, V]`` scores (e.g.
            :class:`moekit.infer.decoding.SelfContrastSession`).
        max_new_tokens: tokens to produce at most (the session must have room for them).
        sampler: how scores become ids (default greedy).
        eos_token_id: a row stops after producing one of these; later rows get ``pad_token_id``.
        pad_token_id: fill for finished rows (default: the first EOS id, else 0).
    """
    sampler = sampler or Sampler()
    eos_ids = _eos_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if max_new_tokens <= 0:
        return
    scores_BV = source.prefill()
    batch = scores_BV.shape[0]
    finished_B = torch.zeros(batch, dtype=torch.bool, device=scores_BV.device)
    eos_E = torch.tensor(eos_ids, dtype=torch.long, device=scores_BV.device)
    for step in range(max_new_tokens):
        next_B = sampler(scores_BV)
        if eos_ids:
            next_B = torch.where(finished_B, pad, next_B)
            finished_B |= torch.isin(next_B, eos_E)
        yield next_B
        # On CPU there is no device queue to drain, so this check costs only a few microseconds.
        if (eos_ids and bool(finished_B.all())) or step + 1 == max_new_tokens:
            return
        scores_BV = source.step(next_B)


def _native_step(model: MoEForCausalLM) -> bool:
    """Whether the eager step's weights all go through the native fp32 kernels: stacked float32
    experts (not quantized or offloaded ones) and a float32 ``nn.Linear`` LM head."""
    if not native_available():
        return False
    for mlp in model.moe_layers:
        stacks = mlp.experts.stacked()
        if stacks is None or stacks[0].dtype != torch.float32:
            return False
    weight = getattr(model.lm_head, "weight", None)
    return weight is not None and weight.dtype == torch.float32


def auto_compile(model: MoEForCausalLM, input_ids: Tensor, max_new_tokens: int) -> bool:
    """The ``compile="auto"`` decision (see the module docstring); True means compile the decode step.

    Only batch-1 CPU sessions on the fast path compile. Among those: yes once this model has
    already run a compiled step (the graph is cached, so it is free), or once the batch-1 tokens
    it decoded eagerly plus this call's ``max_new_tokens`` reach :data:`AUTO_COMPILE_TOKENS`.
    Never for a float32 model while the native decode kernels are loaded (eager is faster then).
    ``MOEKIT_COMPILE=0`` (or false/off/no) makes it always no.
    """
    if os.environ.get("MOEKIT_COMPILE", "").strip().lower() in ("0", "false", "off", "no"):
        return False
    if input_ids.shape[0] != 1 or input_ids.device.type != "cpu" or not compiled_step_supported(model):
        return False
    if _native_step(model):
        return False  # the native fp32 kernels make the eager step the fast one (module doc)
    if model.decode_compiled:
        return True
    return model.num_eager_decode_tokens + max_new_tokens >= AUTO_COMPILE_TOKENS


def _emit(streamer: Any, ids_B: Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):  # transformers' streamer objects
        streamer.put(ids_B)
    else:
        streamer(ids_B)


class _RecomputeSource:
    """``use_cache=False``: every step runs ``model.forward`` over the whole sequence (the reference)."""

    def __init__(
        self, model: MoEForCausalLM, input_ids: Tensor, attention_mask: Tensor | None, moe_k
    ) -> None:
        self.model, self.moe_k, self.ids_BN = model, moe_k, input_ids
        self.mask_BN = (
            torch.ones_like(input_ids)
            if attention_mask is None
            else attention_mask.to(device=input_ids.device, dtype=torch.long)
        )

    def _scores(self) -> Tensor:
        out = self.model(self.ids_BN, attention_mask=self.mask_BN, moe_k=self.moe_k)
        return out.logits[:, -1].float()

    def prefill(self) -> Tensor:
        return self._scores()

    def step(self, next_B: Tensor) -> Tensor:
        self.ids_BN = torch.cat([self.ids_BN, next_B[:, None]], dim=1)
        self.mask_BN = torch.cat([self.mask_BN, self.mask_BN.new_ones(next_B.shape[0], 1)], dim=1)
        return self._scores()


def _record_decode(model: MoEForCausalLM, session: DecodeSession, num_tokens: int) -> None:
    """Updates the model's counters that ``compile="auto"`` reads."""
    if session.compiled:
        model.decode_compiled = model.decode_compiled or session.num_decoded > 0
    elif session.fast and session.input_ids.shape[0] == 1:
        model.num_eager_decode_tokens += num_tokens


@torch.no_grad()
def generate(
    model: MoEForCausalLM,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], Any] | None = None,
    *,
    sampler: Sampler | None = None,
    moe_k: int | None = None,
    compile: bool | str = "auto",
    source=None,
) -> Tensor:
    """Generates up to ``max_new_tokens`` tokens per row (what ``model.generate`` calls).

    Args:
        model: the language model (put in eval mode for the call, then restored).
        input_ids: ``[B, S]`` prompt ids, left-padded for ragged batches.
        attention_mask: ``[B, S]``, 1 for real tokens, 0 for the left padding; None means all real.
        max_new_tokens: tokens to add at most.
        do_sample: sample from the (filtered) distribution instead of taking the argmax.
        temperature: divides the logits before sampling (ignored unless ``do_sample``).
        top_k, top_p: sampling filters (top-k tokens, then the smallest nucleus with mass >= p);
            ``top_k=0`` means no top-k filter, as in transformers.
        eos_token_id: one id or several; a row stops after producing one.
        pad_token_id: fills rows that already stopped (defaults to the first eos id, else 0).
        use_cache: decode one token per step with a KV cache; False recomputes the whole
            sequence every step (slow; the reference the cached paths are tested against).
        generator: RNG for sampling.
        streamer: called with the ``[B]`` new ids after every step, or an object with
            ``put``/``end`` (transformers' streamers; ``end`` is called when generation stops).
        sampler: a :class:`Sampler` instead of ``do_sample``/``temperature``/``top_k``/``top_p``/
            ``generator`` (not both).
        moe_k: experts per token for every MoE layer (dynamic k); None keeps the model's top-k.
        compile: ``"auto"`` (see the module docstring), True (compile the batch-1 fast-path decode
            step; other sessions ignore it) or False.
        source: a prebuilt score source (e.g. :class:`moekit.infer.decoding.SelfContrastSession`)
            to decode from instead of a plain session.

    Returns:
        ``[B, S + N]`` ids (prompt then new tokens), ``N <= max_new_tokens`` (fewer when every
        row stopped early).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if sampler is None:
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        sampler = Sampler(
            temperature=temperature if do_sample else 0.0,
            top_k=top_k or None,
            top_p=top_p,
            generator=generator,
        )
    elif do_sample or top_k or top_p is not None or generator is not None or temperature != 1.0:
        raise ValueError("pass either sampler= or do_sample/temperature/top_k/top_p/generator, not both")
    was_training = model.training
    model.eval()
    try:
        if source is None and not use_cache:
            source = _RecomputeSource(model, input_ids, attention_mask, moe_k)
        elif source is None:
            if compile == "auto":
                compile = auto_compile(model, input_ids, max_new_tokens)
                optional = True
            else:
                optional = False
            source = DecodeSession(
                model,
                input_ids,
                attention_mask,
                max_new_tokens,
                moe_k=moe_k,
                compile=compile,
                compile_fallback=optional,
            )
        batch, prompt_len = input_ids.shape
        out_BC = input_ids.new_empty(batch, prompt_len + max_new_tokens)
        out_BC[:, :prompt_len] = input_ids
        num = 0
        for next_B in iter_tokens(source, max_new_tokens, sampler, eos_token_id, pad_token_id):
            out_BC[:, prompt_len + num] = next_B
            num += 1
            _emit(streamer, next_B)
        if isinstance(source, DecodeSession):
            _record_decode(model, source, num)
        return out_BC[:, : prompt_len + num]
    finally:
        model.train(was_training)
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
