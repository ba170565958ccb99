"""Distillation into MoE students: the losses, a frozen teacher, and the distillation objective.

Pure losses (no state, any float dtype; computed in float32 at least):

* :func:`kd_loss` -- forward KL, reverse KL or generalized JSD (GKD) between the student's and the
  teacher's next-token distributions at temperature T, averaged over unmasked tokens, times T².
* :func:`preference_loss` -- DPO (``"sigmoid"``) or ``"kto_pair"`` (LLaVA-MoD's default) with the
  teacher as the reference model; returns the loss and the implicit rewards.
* :func:`completion_logps` / :func:`sequence_logps` -- log-probability of each completion with the
  prompt masked: the one helper the preference loss and the pair builder both use.

:class:`DistillObjective` is an :class:`~moekit.models.objectives.Objective`: CE on the data plus
``kd_weight`` x KD against a frozen teacher, with staged KD (Mixture-of-Students: the KD term stops
at ``kd_stop_step``) and optional top-k teacher logits (:class:`TeacherLogitCache` writes them to
safetensors so the teacher runs once). :class:`DistillDataModule` wraps any LM data module so each
batch carries its draw index and optimizer step, which keeps staged KD and the cache lookup exact
across resume (both are functions of the data state, which the engine checkpoints).

Recipes (mimic, preference, Mixture-of-Students) are in :mod:`moekit.train.distill_recipes`.

Shape legend: B = batch, S = sequence length, V = vocabulary, K = top-k teacher logits kept,
N = cached batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.data import DataModule
from moekit.models.objectives import LossWeights, Objective, ObjectiveOutput, token_cross_entropy

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
PREFERENCE_LOSSES = ("sigmoid", "kto_pair")


def _float(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def kd_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> Tensor:
    """Per-token divergence ``[...]`` between ``softmax(teacher / T)`` and ``softmax(student / T)``.

    Args:
        student_logits, teacher_logits: ``[..., V]``.
        kind: ``"forward_kl"`` KL(teacher || student), ``"reverse_kl"`` KL(student || teacher), or
            ``"jsd"``: the generalized JSD of GKD (Agarwal et al. 2024, as trl's
            ``generalized_jsd_loss``): with the mixture ``m = beta * p_T + (1 - beta) * p_S``,
            ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``; ``beta=0`` is taken as forward KL
            and ``beta=1`` as reverse KL (trl's convention; the formula itself tends to 0 there).
        beta: the JSD interpolation, in [0, 1].
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd_loss: kind={kind!r}; use one of {list(KD_KINDS)}")
    if temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"kd_loss: beta must be in [0, 1], got {beta}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; teacher and student must share the vocabulary"
        )
    log_s = F.log_softmax(_float(student_logits) / temperature, dim=-1)
    log_t = F.log_softmax(_float(teacher_logits).to(log_s.dtype) / temperature, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    b = torch.tensor(beta, dtype=log_s.dtype, device=log_s.device)
    log_m = torch.logaddexp(log_s + torch.log1p(-b), log_t + torch.log(b))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last axis from log-probabilities; 0 * log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
    mask: Tensor | None = None,
) -> Tensor:
    """Knowledge-distillation loss: :func:`kd_divergence` averaged over unmasked tokens, times T².

    Args:
        student_logits, teacher_logits: ``[..., V]`` (e.g. ``[B, S, V]``) aligned positions.
        temperature: T; both distributions are ``softmax(logits / T)``. The T² factor keeps the
            gradient scale independent of T (Hinton et al. 2015).
        kind, beta: see :func:`kd_divergence`.
        mask: ``[...]`` (e.g. ``[B, S]``), True/1 for tokens that count; None counts every token.

    Returns:
        Scalar (float32, or float64 for float64 inputs). A mask with no token gives 0, not NaN.
    """
    div = kd_divergence(student_logits, teacher_logits, temperature, kind, beta)
    if mask is None:
        return div.mean() * temperature**2
    keep = mask.to(torch.bool).to(div.device)
    if keep.shape != div.shape:
        raise ValueError(f"kd_loss: mask {tuple(keep.shape)} does not match the tokens {tuple(div.shape)}")
    return (div * keep).sum() / keep.sum().clamp_min(1) * temperature**2


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """Preference-optimisation loss over ``[P]`` pairs of sequence log-probabilities.

    With log-ratios ``r_c = policy_chosen - reference_chosen`` and ``r_r = policy_rejected -
    reference_rejected``:

    * ``"sigmoid"`` (DPO): ``mean(-log sigmoid(beta * (r_c - r_r)))``.
    * ``"kto_pair"`` (KTO's paired form, LLaVA-MoD's default): with batch KL estimates
      ``KL_c = max(mean(r_c), 0)`` and ``KL_r = max(mean(r_r), 0)``, the mean over the ``2P`` terms
      ``1 - sigmoid(beta * (r_c - KL_r))`` and ``1 - sigmoid(beta * (KL_c - r_r))`` (each KL
      estimate comes from the other half, as in the KTO report).

    In LLaVA-MoD the reference is the teacher, not the policy's initialisation.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the scalar loss and the ``[P]`` implicit rewards
        ``beta * r_c`` and ``beta * r_r`` (detached).
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"preference_loss: loss_type={loss_type!r}; use one of {list(PREFERENCE_LOSSES)}")
    r_c = _float(policy_chosen_logps) - _float(reference_chosen_logps)
    r_r = _float(policy_rejected_logps) - _float(reference_rejected_logps)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (r_c - r_r)).mean()
    else:
        kl_c = r_c.mean().clamp(min=0)
        kl_r = r_r.mean().clamp(min=0)
        terms = torch.cat((1 - torch.sigmoid(beta * (r_c - kl_r)), 1 - torch.sigmoid(beta * (kl_c - r_r))))
        loss = terms.mean()
    return loss, (beta * r_c).detach(), (beta * r_r).detach()


def completion_mask(attention_mask: Tensor, prompt_lengths: Tensor) -> Tensor:
    """``[B, S]`` bool: the real tokens at positions ``>= prompt_lengths[b]`` (right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions[None, :] >= prompt_lengths.to(attention_mask.device)[:, None]) & attention_mask.bool()


def completion_logps(
    logits_BSV: Tensor, input_ids: Tensor, attention_mask: Tensor, prompt_lengths: Tensor
) -> Tensor:
    """``[B]`` summed log-probabilities of each row's completion under ``logits_BSV``.

    Args:
        logits_BSV: the model's logits on ``input_ids`` (position t predicts token t + 1).
        input_ids: ``[B, S]`` prompt then completion, right-padded.
        attention_mask: ``[B, S]``, 1 for real tokens.
        prompt_lengths: ``[B]`` prompt tokens of each row; only tokens after them are scored.
    """
    log_p = F.log_softmax(_float(logits_BSV[:, :-1]), dim=-1)
    token_lp = log_p.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    keep = completion_mask(attention_mask, prompt_lengths)[:, 1:]
    return (token_lp * keep).sum(-1)


def sequence_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_lengths: Tensor
) -> Tensor:
    """``[B]`` log-probability of each row's completion under ``model``, the prompt masked.

    Runs ``model(input_ids, attention_mask=...)`` (gradients flow if enabled) and applies
    :func:`completion_logps`. Rows are ``[B, S]`` prompt + completion, right-padded.
    """
    out = model(input_ids, attention_mask=attention_mask)
    return completion_logps(out.logits, input_ids, attention_mask, prompt_lengths)


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Puts ``teacher`` in eval mode with no parameter requiring a gradient; returns it."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@dataclass
class TopKLogits:
    """Top-k teacher logits of ``[..., S]`` positions.

    Attributes:
        values: ``[..., K]`` the K largest logits.
        indices: ``[..., K]`` their token ids (int64).
        log_z: ``[...]`` ``logsumexp(logits / T)`` over the whole vocabulary, so the kept tokens'
            probabilities are exact and the rest of the mass is known.
        vocab_size: V.
        temperature: the T ``log_z`` was computed at.
    """

    values: Tensor
    indices: Tensor
    log_z: Tensor
    vocab_size: int
    temperature: float

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float) -> TopKLogits:
        """The top ``k`` of ``logits`` ``[..., V]`` (float32) and their normaliser at ``temperature``."""
        logits = _float(logits)
        values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
        log_z = torch.logsumexp(logits / temperature, dim=-1)
        return cls(values, indices, log_z, logits.shape[-1], temperature)

    def as_logits(self) -> Tensor:
        """``[..., V]`` logits whose ``softmax(. / T)`` is the teacher's distribution with the K kept
        tokens exact and the remaining mass spread evenly over the other ``V - K`` tokens."""
        t = self.temperature
        log_p_kept = self.values / t - self.log_z[..., None]
        num_rest = self.vocab_size - self.values.shape[-1]
        rest = (1.0 - log_p_kept.exp().sum(-1)).clamp_min(torch.finfo(log_p_kept.dtype).tiny)
        log_p_rest = rest.log() - torch.log(torch.tensor(max(num_rest, 1), dtype=rest.dtype))
        if num_rest == 0:
            log_p_rest = torch.full_like(log_p_rest, float("-inf"))
        log_p = log_p_rest[..., None].expand(*self.log_z.shape, self.vocab_size).clone()
        log_p.scatter_(-1, self.indices, log_p_kept)
        # kd_loss divides by T: these logits give back exactly log_p after log_softmax(. / T).
        return log_p * t


class TeacherLogitCache:
    """Top-k teacher logits of every training batch of a run, in one safetensors file.

    :meth:`build` draws the batches the run will see (putting the data module's state back), runs
    the teacher once on each and writes ``values`` ``[N, B, S, K]``, ``indices``, ``log_z``
    ``[N, B, S]`` and the batch tokens ``[N, B, S + 1]``; :meth:`lookup` returns batch ``i``'s
    :class:`TopKLogits` after checking its tokens match, so a cache of another run is refused.
    """

    def __init__(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.tensors = tensors
        self.meta = meta

    @property
    def num_batches(self) -> int:
        """N."""
        return int(self.tensors["tokens"].shape[0])

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module,
        data: DataModule,
        num_batches: int,
        k: int,
        temperature: float,
        path: str | Path,
    ) -> TeacherLogitCache:
        """Runs the teacher on the next ``num_batches`` training batches of ``data`` (a
        :class:`DistillDataModule` or any module yielding ``[B, S + 1]`` tokens) and writes ``path``."""
        from safetensors.torch import save_file

        from moekit.models.io import atomic_write

        state = data.state_dict()
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        parts: dict[str, list[Tensor]] = {"tokens": [], "values": [], "indices": [], "log_z": []}
        try:
            for _ in range(num_batches):
                batch = data.next_train_batch()
                tokens = batch["tokens"] if isinstance(batch, dict) else batch
                logits = teacher(tokens[:, :-1].to(device)).logits
                top = TopKLogits.from_logits(logits, k, temperature)
                parts["tokens"].append(tokens.cpu())
                parts["values"].append(top.values.float().cpu())
                parts["indices"].append(top.indices.to(torch.int32).cpu())
                parts["log_z"].append(top.log_z.float().cpu())
        finally:
            data.load_state_dict(state)
        tensors = {name: torch.stack(ts).contiguous() for name, ts in parts.items()}
        meta = {"k": str(k), "temperature": repr(float(temperature)), "vocab_size": str(logits.shape[-1])}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return cls(tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> TeacherLogitCache:
        """Reads a cache written by :meth:`build`."""
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = f.get_tensor(name)
        return cls(tensors, meta)

    def matches(self, k: int, temperature: float, num_batches: int) -> bool:
        """Whether this cache was built with these settings and holds at least ``num_batches``."""
        return (
            int(self.meta.get("k", -1)) == k
            and float(self.meta.get("temperature", "nan")) == float(temperature)
            and self.num_batches >= num_batches
        )

    def lookup(self, index: int, tokens: Tensor) -> TopKLogits:
        """Batch ``index``'s top-k logits, on ``tokens``' device; ValueError if its tokens differ."""
        if not 0 <= index < self.num_batches:
            raise ValueError(f"teacher cache holds {self.num_batches} batches, batch {index} was asked for")
        if not torch.equal(self.tensors["tokens"][index], tokens.cpu()):
            raise ValueError(
                f"teacher cache batch {index} holds other tokens than the run draws; delete the cache file "
                "and run again to rebuild it"
            )
        dev = tokens.device
        return TopKLogits(
            self.tensors["values"][index].to(dev),
            self.tensors["indices"][index].long().to(dev),
            self.tensors["log_z"][index].to(dev),
            int(self.meta["vocab_size"]),
            float(self.meta["temperature"]),
        )


class DistillDataModule(DataModule):
    """Wraps an LM data module: batches become ``{"tokens": [B, S + 1], "index": [], "step": []}``.

    ``index`` counts the training batches drawn so far (the cache key) and ``step`` is the
    optimizer step the batch belongs to (``index // grad_accum``, for staged KD). Both live in the
    data state, so a resumed run sees the same values. Validation batches have index and step -1.
    """

    def __init__(self, base: DataModule, grad_accum: int = 1) -> None:
        self.base = base
        self.grad_accum = grad_accum
        self.num_drawn = 0

    def next_train_batch(self) -> dict[str, Tensor]:
        """The base module's next batch with its draw index and optimizer step."""
        tokens = self.base.next_train_batch()
        index = self.num_drawn
        self.num_drawn += 1
        return {
            "tokens": tokens,
            "index": torch.tensor(index),
            "step": torch.tensor(index // self.grad_accum),
        }

    def val_batches(self) -> list[dict[str, Tensor]]:
        """The base module's validation batches, wrapped."""
        return [
            {"tokens": b, "index": torch.tensor(-1), "step": torch.tensor(-1)}
            for b in self.base.val_batches()
        ]

    def state_dict(self) -> dict[str, Any]:
        """The base state plus ``distill_num_drawn``."""
        return {**self.base.state_dict(), "distill_num_drawn": self.num_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        state = dict(state)
        self.num_drawn = int(state.pop("distill_num_drawn", 0))
        self.base.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        """The base module's facts."""
        return self.base.describe()

    def baselines(self) -> dict[str, float]:
        """The base module's baselines."""
        return self.base.baselines()

    def save_artifacts(self, folder: Path) -> None:
        """The base module's artifacts (the tokenizer)."""
        self.base.save_artifacts(folder)

    def __getattr__(self, name: str) -> Any:
        # unigram_loss, tokenizer_hash, tokenizer, ...: the LM module's facts read through.
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class DistillObjective(Objective):
    """Cross-entropy on the data plus weighted KD against a frozen teacher (mimic distillation).

    ``loss = ce_weight * CE + kd_weight * kd_loss(student, teacher) + weighted aux`` while the
    batch's step is below ``kd_stop_step``; from that step on (staged KD, Mixture-of-Students) the KD
    term is 0 and the teacher is not run. Batches are :class:`DistillDataModule` dicts (a plain
    ``[B, S + 1]`` tensor counts as step 0). Validation scores the student's CE alone, so a
    distilled student and one trained alone are compared on the same number.

    Args:
        teacher: any causal LM returning ``.logits`` ``[B, S, V]``; frozen here
            (:func:`freeze_teacher`) and never handed to the optimizer.
        kd_kind, temperature, beta: see :func:`kd_loss`.
        kd_weight, ce_weight: the weights of the two terms.
        kd_stop_step: first optimizer step without KD; None keeps KD throughout.
        top_k_logits: KD against the teacher's top-k logits only (:class:`TopKLogits`); None uses
            the full distribution.
        cache: a :class:`TeacherLogitCache` of this run's batches (needs ``top_k_logits``).
        weights: MoE aux-loss coefficients of the student.
    """

    def __init__(
        self,
        teacher: nn.Module,
        kd_kind: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        kd_stop_step: int | None = None,
        top_k_logits: int | None = None,
        cache: TeacherLogitCache | None = None,
        weights: LossWeights | None = None,
    ) -> None:
        if kd_kind not in KD_KINDS:
            raise ValueError(f"DistillObjective.kd_kind={kd_kind!r}; use one of {list(KD_KINDS)}")
        if kd_weight < 0 or ce_weight < 0:
            raise ValueError("DistillObjective: kd_weight and ce_weight must be >= 0")
        if top_k_logits is not None and top_k_logits < 1:
            raise ValueError(f"DistillObjective.top_k_logits must be >= 1, got {top_k_logits}")
        if cache is not None and top_k_logits is None:
            raise ValueError("DistillObjective: a teacher cache needs top_k_logits")
        self.teacher = freeze_teacher(teacher)
        self.kd_kind, self.temperature, self.beta = kd_kind, temperature, beta
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.kd_stop_step, self.top_k_logits, self.cache = kd_stop_step, top_k_logits, cache
        self.weights = weights if weights is not None else LossWeights()

    def kd_active(self, step: int) -> bool:
        """Whether optimizer step ``step`` has the KD term."""
        return self.kd_weight > 0 and (self.kd_stop_step is None or step < self.kd_stop_step)

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, int, int]:
        if isinstance(batch, dict):
            return batch["tokens"], int(batch["index"]), int(batch["step"])
        return batch, -1, 0

    @torch.no_grad()
    def teacher_logits(self, tokens: Tensor, index: int = -1) -> Tensor:
        """``[B, S, V]`` teacher logits on ``tokens[:, :-1]`` (top-k reconstructed when configured;
        from the cache when it has batch ``index``)."""
        if self.cache is not None and index >= 0:
            return self.cache.lookup(index, tokens).as_logits()
        if self.teacher.training:  # someone called .train() on it: teachers are always run in eval
            self.teacher.eval()
        logits = self.teacher(tokens[:, :-1]).logits
        if self.top_k_logits is None:
            return logits
        return TopKLogits.from_logits(logits, self.top_k_logits, self.temperature).as_logits()

    def forward(self, model: nn.Module, batch: Any, moe_k: int | None = None) -> tuple[Any, Tensor | None]:
        """``(student output, teacher logits or None)``; the teacher runs only in training steps with KD."""
        tokens, index, step = self._unpack(batch)
        out = model(tokens[:, :-1], moe_k=moe_k)
        teacher = self.teacher_logits(tokens, index) if model.training and self.kd_active(step) else None
        return out, teacher

    def loss(self, output: tuple[Any, Tensor | None], batch: Any) -> ObjectiveOutput:
        """``ce_weight * lm_loss + kd_weight * kd_loss + aux``; logs lm_loss, kd_loss, kd_active, aux_loss."""
        out, teacher = output
        tokens, _, _ = self._unpack(batch)
        lm_loss = token_cross_entropy(out.logits, tokens[:, 1:])
        if teacher is None:
            kd = lm_loss.new_zeros(())
        else:
            kd = kd_loss(out.logits, teacher, self.temperature, self.kd_kind, self.beta)
        aux_losses = out.aux_losses or {}
        aux = self.weights.weighted(aux_losses, lm_loss)
        total = self.ce_weight * lm_loss + (self.kd_weight * kd if teacher is not None else 0.0) + aux
        return ObjectiveOutput(
            loss=total,
            metrics={
                "lm_loss": lm_loss,
                "kd_loss": kd,
                "kd_active": lm_loss.new_tensor(float(teacher is not None)),
                "aux_loss": aux,
            },
            aux_losses=aux_losses,
            routing=list(out.routing or []),
        )

    def eval_loss(self, output: tuple[Any, Tensor | None], batch: Any) -> tuple[Tensor, int]:
        """The student's mean CE and the number of target tokens."""
        tokens, _, _ = self._unpack(batch)
        return token_cross_entropy(output[0].logits, tokens[:, 1:]), tokens[:, 1:].numel()

    def describe(self) -> dict[str, Any]:
        """The KD settings (for the run log's start record)."""
        return {
            "kd_kind": self.kd_kind,
            "temperature": self.temperature,
            "kd_beta": self.beta,
            "kd_weight": self.kd_weight,
            "ce_weight": self.ce_weight,
            "kd_stop_step": self.kd_stop_step,
            "top_k_logits": self.top_k_logits,
            "cached": self.cache is not None,
        }


@torch.no_grad()
def teacher_agreement(student: nn.Module, teacher: nn.Module, batches: list[Any]) -> float:
    """Share of positions where the student's top-1 next token equals the teacher's, over
    ``[B, S + 1]`` token batches (or :class:`DistillDataModule` dicts), both in eval mode."""
    was = student.training
    student.eval()
    same, total = 0, 0
    try:
        for batch in batches:
            tokens = batch["tokens"] if isinstance(batch, dict) else batch
            s = student(tokens[:, :-1]).logits.argmax(-1)
            t = teacher(tokens[:, :-1]).logits.argmax(-1)
            same += int((s == t).sum())
            total += s.numel()
    finally:
        student.train(was)
    return same / max(total, 1)


def summary_json(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` as indented JSON (NaN as null) to ``path``."""
    text = json.dumps(record, indent=2, sort_keys=True, default=float).replace("NaN", "null")
    path.write_text(text + "\n")


__all__ = [
    "KD_KINDS",
    "PREFERENCE_LOSSES",
    "DistillDataModule",
    "DistillObjective",
    "TeacherLogitCache",
    "TopKLogits",
    "completion_logps",
    "completion_mask",
    "freeze_teacher",
    "kd_divergence",
    "kd_loss",
    "preference_loss",
    "sequence_logps",
    "teacher_agreement",
]
