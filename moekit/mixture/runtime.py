"""Running a mixture: load the experts, choose per request, decode the gated mixture.

Shape legend: B = batch (1 per request here), S = prompt length, E = experts, V = vocabulary.

The answer's next-token distribution is the paper's aggregation

    p(y) = sum_{e in chosen} w_e p_e(y)

with ``w`` the gate's weights renormalised over the chosen experts. :class:`MixtureSession` keeps
one :class:`~moekit.models.decode.DecodeSession` (KV cache) per chosen expert and feeds each the
token the mixture picked, so every step costs one cached decode step per expert, not a new
forward over the whole text. Its scores are the mixture's log-probabilities, so the usual
:class:`~moekit.models.generation.Sampler` and :func:`~moekit.models.generation.iter_tokens`
drive it. Experts whose vocabulary is smaller than the largest one get probability 0 for the
missing ids.

Per request (:meth:`Mixture.choose`): the candidates are the globally selected experts; those
whose predicted latency for this prompt length and ``max_tokens`` fits the request class's bound
are kept (none fits: the fastest one runs, and the choice says the bound is missed); the gate
weights them and the ``top_k`` highest are used (``aggregation="best"``: the highest alone).
Experts that run in parallel on their own devices (the paper's setting) make the request's
latency the slowest chosen expert's, which is what :attr:`Choice.predicted_latency_s` reports;
on one machine they run one after another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from moekit.loader import load_model_and_tokenizer
from moekit.mixture.bridge import BridgedSession, TextBridge
from moekit.mixture.gate import MixtureGate, prompt_embedding, subset_mask
from moekit.mixture.profiles import MixtureConfig, load_mixture_config, resolve_path
from moekit.models.decode import DecodeSession


@dataclass
class Choice:
    """Which experts answer one request, with what weights.

    Attributes:
        experts: chosen expert names, highest weight first.
        weights: their mixture weights (sum 1).
        latency_class: the request's class (None: unbounded).
        bound_s: that class's latency bound (None: unbounded).
        predicted_latency_s: the slowest chosen expert's predicted latency.
        bound_met: whether every chosen expert fits the bound.
        energy_j_per_token: the chosen experts' summed energy per token.
        bridged: the chosen experts that run through the text-level bridge.
    """

    experts: list[str]
    weights: list[float]
    latency_class: str | None
    bound_s: float | None
    predicted_latency_s: float
    bound_met: bool
    energy_j_per_token: float
    bridged: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """A JSON-ready dict (what the server reports)."""
        return {
            "experts": self.experts,
            "weights": [round(w, 6) for w in self.weights],
            "latency_class": self.latency_class,
            "bound_s": self.bound_s,
            "predicted_latency_s": round(self.predicted_latency_s, 6),
            "bound_met": self.bound_met,
            "energy_j_per_token": round(self.energy_j_per_token, 6),
            "bridged": self.bridged,
        }


def mix_logprobs(logits: list[Tensor], weights: Tensor) -> Tensor:
    """``log sum_e w_e softmax(logits_e)`` -> ``[B, V]`` float64 (V the largest vocabulary; an
    expert with a smaller one gives the missing ids probability 0).

    Args:
        logits: per expert ``[B, V_e]`` next-token logits.
        weights: ``[E]`` or ``[B, E]`` mixture weights (rows sum to 1).
    """
    vocab = max(x.shape[-1] for x in logits)
    dtype = torch.float64  # the mixing is cheap next to the experts; float64 keeps tiny weights exact
    parts = []
    for x in logits:
        logp = x.to(dtype).log_softmax(-1)
        if x.shape[-1] < vocab:
            logp = torch.nn.functional.pad(logp, (0, vocab - x.shape[-1]), value=-math.inf)
        parts.append(logp)
    logp_EBV = torch.stack(parts)
    w = weights.to(dtype)
    logw_EB1 = (w.T if w.dim() == 2 else w[:, None].expand(-1, logp_EBV.shape[1])).log()[..., None]
    return torch.logsumexp(logw_EB1 + logp_EBV, dim=0)


class MixtureSession:
    """Decodes the gated mixture of several experts, each through its own KV-cached session.

    Same interface as :class:`DecodeSession` (``prefill() -> [B, V]``, ``step(ids_B) -> [B, V]``);
    the scores are the mixture's log-probabilities. A :class:`~moekit.mixture.bridge.TextBridge`
    expert decodes through a :class:`~moekit.mixture.bridge.BridgedSession` (batch 1).
    """

    def __init__(self, models: list, weights: Tensor, input_ids: Tensor, max_new_tokens: int) -> None:
        if len(models) != weights.shape[-1]:
            raise ValueError(f"{len(models)} experts but {weights.shape[-1]} weights")
        self.weights = weights
        self.sessions = [
            BridgedSession(m, input_ids[0].tolist())
            if isinstance(m, TextBridge)
            else DecodeSession(m, input_ids, max_new_tokens=max_new_tokens)
            for m in models
        ]

    def prefill(self) -> Tensor:
        """Prefills every expert; returns the mixture's ``[B, V]`` log-probs for the first token."""
        return mix_logprobs([s.prefill() for s in self.sessions], self.weights)

    def step(self, next_B: Tensor) -> Tensor:
        """Feeds the chosen token to every expert; returns the next ``[B, V]`` log-probs."""
        return mix_logprobs([s.step(next_B) for s in self.sessions], self.weights)


class Mixture:
    """A loaded mixture: the config, every expert's model, the gate, the shared tokenizer.

    Build it with :meth:`load`. Attributes: ``config``, ``models`` (name -> model), ``gate``
    (None: uniform weights), ``tokenizer``, ``eos_token_id``.
    """

    def __init__(self, config: MixtureConfig, models: dict, gate: MixtureGate | None, tokenizer, eos: int):
        self.config, self.models, self.gate, self.tokenizer, self.eos_token_id = (
            config,
            models,
            gate,
            tokenizer,
            eos,
        )
        if gate is not None and gate.config.experts != config.names:
            raise ValueError(
                f"the gate was trained on experts {gate.config.experts}, but the config lists {config.names}"
            )

    @classmethod
    def load(cls, path: str | Path, dtype=None) -> Mixture:
        """Loads the mixture config at ``path`` and everything it names.

        An expert whose tokenizer differs from the first expert's is wrapped in a
        :class:`~moekit.mixture.bridge.TextBridge` (see its module for what that costs).

        Raises:
            ValueError: a bad config or an expert folder that does not open (one line).
        """
        config, base = load_mixture_config(path)
        models, tokenizer, eos, vocab = {}, None, None, None
        for e in config.experts:
            loaded = load_model_and_tokenizer(resolve_path(base, e.path), dtype=dtype)
            if tokenizer is None:  # the first expert's tokenizer is the mixture's
                tokenizer, eos, vocab = loaded.tokenizer, loaded.eos_token_id, loaded.model.config.vocab_size
                models[e.name] = loaded.model
            elif loaded.tokenizer.to_str() != tokenizer.to_str():
                models[e.name] = TextBridge(loaded.model, loaded.tokenizer, tokenizer, vocab)
            else:
                models[e.name] = loaded.model
        gate = MixtureGate.load(resolve_path(base, config.gate)) if config.gate else None
        return cls(config, models, gate, tokenizer, eos)

    # -- choosing --

    def candidates(self) -> list[int]:
        """Indices of the globally selected experts (all when ``selected`` is None)."""
        names = self.config.names
        chosen = self.config.selected or names
        return [i for i, n in enumerate(names) if n in chosen]

    @torch.no_grad()
    def gate_logits(self, prompt_ids: list[int]) -> Tensor:
        """The gate's logits ``[E]`` for one prompt (zeros without a gate: uniform weights)."""
        num = len(self.config.experts)
        if self.gate is None:
            return torch.zeros(num)
        cfg = self.gate.config
        emb_1D = prompt_embedding(self.models[cfg.embedder], torch.tensor([prompt_ids]), cfg.embedding)
        return self.gate(emb_1D)[0].double()

    def choose(self, prompt_ids: list[int], max_new_tokens: int, latency_class: str | None = None) -> Choice:
        """The per-request level (see the module doc)."""
        cfg = self.config
        cls_name = latency_class if latency_class is not None else cfg.default_class
        if cls_name is not None and cls_name not in cfg.latency_classes:
            raise ValueError(
                f"latency class {cls_name!r} is not defined; this mixture has {sorted(cfg.latency_classes)}"
            )
        klass = cfg.latency_classes.get(cls_name) if cls_name is not None else None
        bound = klass.bound_s if klass is not None else None
        cands = self.candidates()
        lat = {i: cfg.experts[i].latency_s(len(prompt_ids), max_new_tokens) for i in cands}
        fitting = [i for i in cands if bound is None or lat[i] <= bound]
        met = bool(fitting)
        if not fitting:
            fitting = [min(cands, key=lambda i: (lat[i], i))]
        logits_E = self.gate_logits(prompt_ids)
        mask_E = subset_mask(len(cfg.experts), fitting)
        weights_E = logits_E.masked_fill(~mask_E, -math.inf).softmax(-1)
        k = 1 if cfg.aggregation == "best" else (klass.top_k if klass is not None else len(fitting))
        order = sorted(fitting, key=lambda i: (-float(weights_E[i]), i))[:k]
        w = weights_E[order]
        w = w / w.sum()
        return Choice(
            experts=[cfg.experts[i].name for i in order],
            weights=[float(x) for x in w],
            latency_class=cls_name,
            bound_s=bound,
            predicted_latency_s=max(lat[i] for i in order),
            bound_met=met,
            energy_j_per_token=sum(cfg.experts[i].energy_j_per_token for i in order),
            bridged=[
                cfg.experts[i].name for i in order if isinstance(self.models[cfg.experts[i].name], TextBridge)
            ],
        )

    # -- decoding --

    def session(self, prompt_ids: list[int], choice: Choice, max_new_tokens: int) -> MixtureSession:
        """A :class:`MixtureSession` over the chosen experts for one prompt."""
        models = [self.models[n] for n in choice.experts]
        weights = torch.tensor(choice.weights, dtype=torch.float64)
        return MixtureSession(models, weights, torch.tensor([prompt_ids]), max_new_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (an empty text starts from the end-of-text token)."""
        return self.tokenizer.encode(text).ids or [self.eos_token_id]

    @torch.no_grad()
    def generate(
        self, prompt: str, max_new_tokens: int = 32, latency_class: str | None = None, sampler=None
    ) -> tuple[str, Choice]:
        """Generates a completion of ``prompt``; returns ``(text, choice)``."""
        from moekit.models.generation import iter_tokens

        ids = self.encode(prompt)
        choice = self.choose(ids, max_new_tokens, latency_class)
        session = self.session(ids, choice, max_new_tokens)
        out = []
        for next_B in iter_tokens(session, max_new_tokens, sampler, eos_token_id=self.eos_token_id):
            token = int(next_B[0])
            if token == self.eos_token_id:
                break
            out.append(token)
        return self.tokenizer.decode(out), choice


__all__ = ["Choice", "Mixture", "MixtureSession", "mix_logprobs"]
