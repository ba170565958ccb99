"""The MoE² gate: a small network over a prompt embedding that weights the experts.

Shape legend: B = prompts, S = prompt length, D = embedding width, E = experts, N = scoring
windows, T = continuation tokens scored per window, V = vocabulary.

The gate sees one embedding per prompt (the mean over the prompt of a frozen *embedder* expert's
token embeddings, ``embedding="tokens"``, or of its final hidden states, ``"hidden"``), and
outputs logits over the E experts. A subset S of experts is applied by *masking*: logits outside
S are set to -inf before the softmax, so the weights renormalise over S (the paper trains the
gate once on all experts and reuses it for every subset; :func:`masking_gap` measures how far
that is from retraining on S).

Training minimises the mixture's NLL on held-out text. Each training window is a prompt of P
tokens and a continuation of T tokens; every expert's log-probability of each continuation token
is computed once (:func:`score_windows`, teacher forcing) and the gate is then trained on those
tensors alone, so a training step costs no expert forward pass:

    NLL = -mean_{n,t} log sum_e w_e(prompt_n) p_e(y_{n,t} | y_{n,<t})

The gate weights a *request* (constant over its continuation), as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import JsonConfig, check_choice

EMBEDDINGS = ("tokens", "hidden")
GATE_CONFIG, GATE_WEIGHTS = "gate_config.json", "gate.safetensors"


@dataclass(kw_only=True)
class GateConfig(JsonConfig):
    """The gate's shape and what it reads.

    Attributes:
        experts: expert names, in output order.
        embedder: the expert whose embeddings feed the gate (frozen).
        embedding: ``"tokens"`` (mean token embedding: no forward pass) or ``"hidden"`` (mean
            final hidden state: one forward of the embedder over the prompt).
        input_dim: the embedder's width D.
        hidden_dim: the gate's hidden width.
    """

    experts: list[str]
    embedder: str
    embedding: str = "tokens"
    input_dim: int
    hidden_dim: int = 64

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("GateConfig.experts must list at least one expert")
        if self.embedder not in self.experts:
            raise ValueError(f"GateConfig.embedder={self.embedder!r} is not one of experts {self.experts}")
        check_choice("GateConfig", "embedding", self.embedding, EMBEDDINGS)
        for f in ("input_dim", "hidden_dim"):
            if getattr(self, f) < 1:
                raise ValueError(f"GateConfig.{f} must be >= 1, got {getattr(self, f)}")


class MixtureGate(nn.Module):
    """``embedding [B, D] -> expert logits [B, E]``: normalise, linear, GELU, linear."""

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.input_dim, elementwise_affine=False)
        self.hidden = nn.Linear(config.input_dim, config.hidden_dim)
        self.out = nn.Linear(config.hidden_dim, len(config.experts))

    def forward(self, emb_BD: Tensor, mask_E: Tensor | None = None) -> Tensor:
        """Logits ``[B, E]``; experts where ``mask_E`` is False get -inf (weight 0 after softmax)."""
        logits_BE = self.out(F.gelu(self.hidden(self.norm(emb_BD.to(self.out.weight.dtype)))))
        return apply_mask(logits_BE, mask_E)

    def weights(self, emb_BD: Tensor, mask_E: Tensor | None = None) -> Tensor:
        """Mixture weights ``[B, E]`` (rows sum to 1 over the unmasked experts)."""
        return self(emb_BD, mask_E).softmax(-1)

    def save(self, folder: str | Path) -> None:
        """Writes ``gate_config.json`` and ``gate.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.to_json(folder / GATE_CONFIG)
        save_file(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / GATE_WEIGHTS)
        )

    @classmethod
    def load(cls, folder: str | Path) -> MixtureGate:
        """Reads a folder :meth:`save` wrote (``ValueError`` naming the file when it is damaged)."""
        from moekit.models.safetensors_io import load_safetensors

        folder = Path(folder)
        if not (folder / GATE_CONFIG).is_file():
            raise ValueError(f"{folder} has no {GATE_CONFIG}; pass the folder `moekit mixture train` wrote")
        try:
            config = GateConfig.from_json(folder / GATE_CONFIG)
        except ValueError as err:
            raise ValueError(f"{folder / GATE_CONFIG}: {err}") from None
        gate = cls(config)
        try:
            gate.load_state_dict(load_safetensors(folder / GATE_WEIGHTS))
        except (RuntimeError, FileNotFoundError) as err:
            raise ValueError(f"{folder / GATE_WEIGHTS}: {str(err).splitlines()[0]}") from None
        return gate.eval()


def apply_mask(logits_BE: Tensor, mask_E: Tensor | None) -> Tensor:
    """``logits`` with -inf outside ``mask_E`` (a bool ``[E]``; None keeps every expert)."""
    if mask_E is None:
        return logits_BE
    if not bool(mask_E.any()):
        raise ValueError("the expert mask selects no expert")
    return logits_BE.masked_fill(~mask_E.to(logits_BE.device), -math.inf)


def subset_mask(num_experts: int, subset) -> Tensor:
    """A bool ``[E]`` mask that is True on the expert indices in ``subset``."""
    mask_E = torch.zeros(num_experts, dtype=torch.bool)
    mask_E[list(subset)] = True
    return mask_E


@torch.no_grad()
def prompt_embedding(
    model, ids_BS: Tensor, kind: str = "tokens", attention_mask_BS: Tensor | None = None
) -> Tensor:
    """The gate's input for each prompt: ``[B, D]`` float32, a mean over the real prompt tokens.

    Args:
        model: the embedder (a :class:`~moekit.models.MoEForCausalLM`).
        ids_BS: prompt ids.
        kind: ``"tokens"`` (mean of ``model.embed(ids)``) or ``"hidden"`` (mean of the final
            normalised hidden states, captured from ``model.norm``).
        attention_mask_BS: 1 for real tokens (None: all real).
    """
    check_choice("prompt_embedding", "kind", kind, EMBEDDINGS)
    if kind == "tokens":
        states_BSD = model.embed(ids_BS)
    else:
        captured = []
        handle = model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            model(ids_BS, attention_mask=attention_mask_BS)
        finally:
            handle.remove()
        states_BSD = captured[-1]
    real_BS1 = (torch.ones_like(ids_BS) if attention_mask_BS is None else attention_mask_BS)[
        ..., None
    ].float()
    return (states_BSD.float() * real_BS1).sum(1) / real_BS1.sum(1).clamp_min(1.0)


@torch.no_grad()
def score_windows(model, windows_NL: Tensor, prompt_len: int, batch_size: int = 16) -> Tensor:
    """Each continuation token's log-probability under ``model``: ``[N, T]`` float64, ``T = L - P``.

    Window ``n`` is ``P`` prompt tokens then ``T`` continuation tokens; token ``P + t`` is scored
    given everything before it (teacher forcing, one forward per batch of windows).
    """
    if not 0 < prompt_len < windows_NL.shape[1]:
        raise ValueError(f"prompt_len={prompt_len} must be in (0, window length {windows_NL.shape[1]})")
    out = []
    for start in range(0, windows_NL.shape[0], batch_size):
        batch_BL = windows_NL[start : start + batch_size]
        logits_BLV = model(batch_BL[:, :-1]).logits[:, prompt_len - 1 :].double()
        logp_BTV = logits_BLV.log_softmax(-1)
        out.append(logp_BTV.gather(-1, batch_BL[:, prompt_len:, None])[..., 0])
    return torch.cat(out)


def mixture_nll(logits_NE: Tensor, logp_ENT: Tensor) -> Tensor:
    """Mean NLL per token of the gated mixture: ``-mean log sum_e softmax(logits)_e p_e(y)``.

    Masked experts (logits -inf) contribute nothing. Scalar, in ``logp``'s dtype.
    """
    logw_EN1 = logits_NE.to(logp_ENT.dtype).log_softmax(-1).T[..., None]
    return -torch.logsumexp(logw_EN1 + logp_ENT, dim=0).mean()


def uniform_nll(logp_ENT: Tensor, subset) -> Tensor:
    """NLL of the mixture with equal weights over ``subset`` (the no-gate baseline)."""
    idx = list(subset)
    return -(torch.logsumexp(logp_ENT[idx], dim=0) - math.log(len(idx))).mean()


def best_expert_nll(logits_NE: Tensor, logp_ENT: Tensor) -> Tensor:
    """NLL when only each prompt's highest-weighted expert answers (``aggregation="best"``)."""
    best_N = logits_NE.argmax(-1)
    return -logp_ENT[best_N, torch.arange(logp_ENT.shape[1])].mean()


def train_gate(
    config: GateConfig,
    emb_ND: Tensor,
    logp_ENT: Tensor,
    mask_E: Tensor | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[MixtureGate, list[float]]:
    """Trains a gate to minimise :func:`mixture_nll` (full batch, AdamW); returns it and the losses.

    ``mask_E`` restricts training to a subset (what :func:`masking_gap` compares against).
    """
    if logp_ENT.shape[:2] != (len(config.experts), emb_ND.shape[0]):
        raise ValueError(
            f"logp {tuple(logp_ENT.shape)} does not match {len(config.experts)} experts x {emb_ND.shape[0]} windows"
        )
    torch.manual_seed(seed)
    gate = MixtureGate(config)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    emb_ND = emb_ND.float()
    for _ in range(steps):
        loss = mixture_nll(gate(emb_ND, mask_E), logp_ENT)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return gate.eval(), losses


@dataclass
class MaskingGap:
    """Masked-once vs retrained gate on one subset (NLL in nats/token on the evaluation windows)."""

    subset: tuple[int, ...]
    masked_nll: float
    retrained_nll: float

    @property
    def gap(self) -> float:
        """``masked - retrained`` (> 0: retraining helps by that much)."""
        return self.masked_nll - self.retrained_nll


@torch.no_grad()
def _eval_nll(gate: MixtureGate, emb_ND: Tensor, logp_ENT: Tensor, mask_E: Tensor) -> float:
    return float(mixture_nll(gate(emb_ND.float(), mask_E), logp_ENT))


def masking_gap(
    gate: MixtureGate,
    train: tuple[Tensor, Tensor],
    evaluate: tuple[Tensor, Tensor],
    subsets,
    steps: int = 300,
    seed: int = 0,
) -> list[MaskingGap]:
    """For each subset: the all-experts ``gate`` masked to it, against a gate retrained on it.

    Args:
        gate: trained once on all experts.
        train: ``(emb [N, D], logp [E, N, T])`` it was trained on (the retrained gates use them too).
        evaluate: held-out ``(emb, logp)`` both are scored on.
        subsets: iterables of expert indices.
    """
    out = []
    num = len(gate.config.experts)
    for subset in subsets:
        mask_E = subset_mask(num, subset)
        retrained, _ = train_gate(gate.config, *train, mask_E=mask_E, steps=steps, seed=seed)
        out.append(
            MaskingGap(
                tuple(sorted(subset)),
                _eval_nll(gate, *evaluate, mask_E),
                _eval_nll(retrained, *evaluate, mask_E),
            )
        )
    return out


__all__ = [
    "EMBEDDINGS",
    "GateConfig",
    "MaskingGap",
    "MixtureGate",
    "apply_mask",
    "best_expert_nll",
    "masking_gap",
    "mixture_nll",
    "prompt_embedding",
    "score_windows",
    "subset_mask",
    "train_gate",
    "uniform_nll",
]
