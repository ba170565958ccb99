"""The server engine for ``moekit serve --mixture CONFIG``.

:class:`MixtureEngine` is the server's :class:`~moekit.infer.server_engine.Engine` with one
change: a request is answered by the gated mixture of the experts its latency class allows
(:meth:`moekit.mixture.Mixture.choose`), decoded through one KV-cached session per expert. It
plugs into :func:`moekit.infer.server.create_app` through its ``engine`` argument, so the server
itself knows nothing about mixtures; it only calls the engine's optional hooks:

* ``describe_request(request, body, prompt_ids, max_tokens)`` (async): the choice for this
  request, added to the response (and every streamed chunk) as ``"mixture"``; a request names
  its class in the ``X-Latency-Class`` header (default: the config's ``default_class``; an unknown
  class is a 400 naming the known ones);
* ``health_fields()``: the mixture's experts, classes and per-expert request counts on ``/health``.
"""

from __future__ import annotations

from collections import OrderedDict

from moekit.infer.server_engine import Engine
from moekit.infer.server_requests import RequestError
from moekit.mixture.runtime import Mixture

LATENCY_HEADER = "x-latency-class"


class _Recorder:
    """A score source that remembers its last scores (for log-probabilities)."""

    def __init__(self, source) -> None:
        self.source, self.last_BV = source, None

    def prefill(self):
        self.last_BV = self.source.prefill()
        return self.last_BV

    def step(self, next_B):
        self.last_BV = self.source.step(next_B)
        return self.last_BV


class MixtureEngine(Engine):
    """Serves a :class:`~moekit.mixture.Mixture` (see the module doc).

    Args:
        mixture: the loaded mixture.
        **kwargs: :class:`Engine`'s limits (``max_context``, ``max_tokens_limit``, ``max_queue``,
            ``token_delay_s``); ``max_context`` defaults to the smallest expert's positions.
    """

    def __init__(self, mixture: Mixture, **kwargs) -> None:
        first = mixture.models[mixture.config.names[0]]
        positions = min(m.config.max_position_embeddings for m in mixture.models.values())
        kwargs["max_context"] = min(kwargs.get("max_context") or positions, positions)
        kwargs.setdefault("eos_token_id", mixture.eos_token_id)
        # One request at a time: a mixture step runs several experts' sessions, which the
        # continuous batch (one model's rows) does not cover.
        kwargs["max_batch"] = 1
        super().__init__(first, mixture.tokenizer, **kwargs)
        self.mixture = mixture
        # id(body) -> Choice, from describe_request to start. A request that ends in between
        # (a client gone while queued) leaves its entry, so the oldest ones are dropped past a bound.
        self._choices: OrderedDict[int, object] = OrderedDict()
        self._max_choices = 4 * (1 + self.max_queue)
        self.expert_requests = dict.fromkeys(mixture.config.names, 0)

    def _choose(self, header: str | None, prompt_ids: list[int], max_tokens: int):
        try:
            return self.mixture.choose(prompt_ids, max_tokens, header)
        except ValueError as err:
            raise RequestError(400, str(err), "X-Latency-Class") from None

    async def describe_request(self, request, body, prompt_ids: list[int], max_tokens: int) -> dict:
        """The request's expert choice (runs the gate on the worker thread); a 400 for a bad class."""
        header = request.headers.get(LATENCY_HEADER)
        choice = await self.call(self._choose, header, prompt_ids, max_tokens)
        self._choices[id(body)] = choice
        while len(self._choices) > self._max_choices:
            self._choices.popitem(last=False)
        return {"mixture": choice.as_dict()}

    def health_fields(self) -> dict:
        """What ``/health`` adds: experts, selected subset, classes, requests per expert."""
        cfg = self.mixture.config
        return {
            "mixture": {
                "experts": cfg.names,
                "selected": cfg.selected or cfg.names,
                "aggregation": cfg.aggregation,
                "latency_classes": {k: v.to_dict() for k, v in cfg.latency_classes.items()},
                "default_class": cfg.default_class,
                "requests_per_expert": dict(self.expert_requests),
            }
        }

    def start(self, prompt_ids: list[int], body, max_tokens: int, want_logprobs: bool, pixel_values=None):
        """Like :meth:`Engine.start`, over the mixture's chosen experts."""
        choice = self._choices.pop(id(body), None)
        if choice is None:  # a caller that skipped describe_request: the default class
            choice = self.mixture.choose(prompt_ids, max_tokens)
        for name in choice.experts:
            self.expert_requests[name] += 1
        session = self.mixture.session(prompt_ids, choice, max_tokens)
        return self.session_tokens(session, max_tokens, self.request_sampler(body), want_logprobs)

    def prompt_infos(self, prompt_ids: list[int], top: int):
        """Echoed prompt log-probabilities are not defined for a mixture (the choice needs the
        prompt first); refused with a 400."""
        raise RequestError(400, "echo with logprobs is not supported by a mixture server", "echo")


__all__ = ["LATENCY_HEADER", "MixtureEngine"]
