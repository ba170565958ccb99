"""Preference distillation (LLaVA-MoD stage 3): pairs ranked by the teacher, DPO/KTO with the teacher
as the reference model.

:func:`build_preference_pairs` samples several student responses per prompt, scores them with the
teacher's log-likelihood (or a judge callable) and keeps the best and worst as (chosen, rejected),
with the teacher's log-probabilities of both (the reference). :class:`PreferenceDataModule` serves
them; :class:`PreferenceObjective` trains with :func:`~moekit.train.distill.preference_loss`.
:func:`preference_stats` and :func:`preference_rate` are the before/after report.

Shape legend: P = prompts (pairs), L = prompt tokens, R = response tokens, S = L + R, N = samples
per prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.data import DataModule
from moekit.models.objectives import LossWeights, Objective, ObjectiveOutput
from moekit.train.distill import PREFERENCE_LOSSES, completion_logps, preference_loss, sequence_logps

# judge(prompt_ids [L], responses [N, R]) -> [N] scores, higher is better.
Judge = Callable[[Tensor, Tensor], Tensor]


@dataclass
class PreferencePairs:
    """(chosen, rejected) completions of P prompts with the reference (teacher) log-probabilities.

    Attributes:
        chosen, rejected: ``[P, S]`` prompt + response ids (every row the same length).
        prompt_lengths: ``[P]`` L of each row.
        ref_chosen_logps, ref_rejected_logps: ``[P]`` the teacher's completion log-probabilities.
        chosen_scores, rejected_scores: ``[P]`` the judge's (or teacher's) scores.
    """

    chosen: Tensor
    rejected: Tensor
    prompt_lengths: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    def subset(self, rows: Tensor | slice) -> PreferencePairs:
        """The pairs at ``rows``."""
        return PreferencePairs(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def batch(self, rows: Tensor | slice) -> dict[str, Tensor]:
        """The batch dict :class:`PreferenceObjective` reads."""
        sub = self.subset(rows)
        return {
            "chosen": sub.chosen,
            "rejected": sub.rejected,
            "prompt_lengths": sub.prompt_lengths,
            "ref_chosen_logps": sub.ref_chosen_logps,
            "ref_rejected_logps": sub.ref_rejected_logps,
        }


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompts: Tensor,
    num_samples: int,
    response_len: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> Tensor:
    """``[P, N, R]`` sampled responses (no early stop, so every response has R tokens) to ``[P, L]`` prompts."""
    from moekit.models.generation import generate

    repeated = prompts.repeat_interleave(num_samples, dim=0)
    out = generate(
        model,
        repeated,
        max_new_tokens=response_len,
        do_sample=True,
        temperature=temperature,
        generator=generator,
    )
    return out[:, prompts.shape[1] :].reshape(prompts.shape[0], num_samples, response_len)


@torch.no_grad()
def teacher_scores(teacher: nn.Module, prompt: Tensor, responses: Tensor) -> Tensor:
    """``[N]`` teacher log-likelihood of each of ``responses`` ``[N, R]`` after ``prompt`` ``[L]``."""
    ids = torch.cat([prompt.expand(responses.shape[0], -1), responses], dim=1)
    mask = torch.ones_like(ids)
    lengths = torch.full((ids.shape[0],), prompt.shape[0], dtype=torch.long)
    return sequence_logps(teacher, ids, mask, lengths)


@torch.no_grad()
def build_preference_pairs(
    student: nn.Module,
    teacher: nn.Module,
    prompts: Tensor,
    num_samples: int = 4,
    response_len: int = 16,
    seed: int = 0,
    judge: Judge | None = None,
) -> PreferencePairs:
    """Samples ``num_samples`` student responses per prompt; the best and worst by ``judge`` (default:
    the teacher's log-likelihood, :func:`teacher_scores`) become (chosen, rejected).

    Args:
        prompts: ``[P, L]`` prompt ids.
    """
    if num_samples < 2:
        raise ValueError(f"build_preference_pairs: num_samples must be >= 2 to rank, got {num_samples}")
    gen = torch.Generator().manual_seed(seed)
    responses = sample_responses(student, prompts, num_samples, response_len, gen)
    chosen, rejected, c_scores, r_scores = [], [], [], []
    for p in range(prompts.shape[0]):
        scores = (judge or (lambda pr, rs: teacher_scores(teacher, pr, rs)))(prompts[p], responses[p])
        best, worst = int(scores.argmax()), int(scores.argmin())
        chosen.append(torch.cat([prompts[p], responses[p, best]]))
        rejected.append(torch.cat([prompts[p], responses[p, worst]]))
        c_scores.append(scores[best].float())
        r_scores.append(scores[worst].float())
    chosen_t, rejected_t = torch.stack(chosen), torch.stack(rejected)
    lengths = torch.full((prompts.shape[0],), prompts.shape[1], dtype=torch.long)
    mask = torch.ones_like(chosen_t)
    # The teacher is the reference model (LLaVA-MoD), so its log-probabilities are computed once here.
    ref_c = sequence_logps(teacher, chosen_t, mask, lengths).float()
    ref_r = sequence_logps(teacher, rejected_t, mask, lengths).float()
    return PreferencePairs(
        chosen_t, rejected_t, lengths, ref_c, ref_r, torch.stack(c_scores), torch.stack(r_scores)
    )


class PreferenceDataModule(DataModule):
    """Random batches of training pairs (its own generator), fixed validation pairs.

    Args:
        train, val: the pairs.
        batch_size: pairs per batch.
        seed: the generator's seed.
    """

    def __init__(self, train: PreferencePairs, val: PreferencePairs, batch_size: int, seed: int) -> None:
        if len(train) == 0:
            raise ValueError("PreferenceDataModule needs at least one training pair")
        self.train, self.val = train, val
        self.batch_size = min(batch_size, len(train))
        self.generator = torch.Generator().manual_seed(seed)
        self.num_batches = 0

    def next_train_batch(self) -> dict[str, Tensor]:
        """``batch_size`` pairs drawn without replacement within the batch."""
        rows = torch.randperm(len(self.train), generator=self.generator)[: self.batch_size]
        self.num_batches += 1
        return self.train.batch(rows)

    def val_batches(self) -> list[dict[str, Tensor]]:
        """The validation pairs in batches of ``batch_size``."""
        n = len(self.val)
        return [self.val.batch(slice(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        """``{"num_batches", "generator"}``."""
        return {"num_batches": self.num_batches, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.num_batches = int(state["num_batches"])
        self.generator.set_state(state["generator"])

    def describe(self) -> dict[str, Any]:
        """Pair counts."""
        return {"num_train_pairs": len(self.train), "num_val_pairs": len(self.val)}


class PreferenceObjective(Objective):
    """:func:`~moekit.train.distill.preference_loss` of the student (policy) against the teacher's
    precomputed log-probabilities (reference), plus the student's weighted MoE aux losses (as
    LLaVA-MoD adds them). Logged: ``pref_loss``, ``reward_margin``, ``reward_accuracy``, ``aux_loss``.
    Validation scores the preference loss on the validation pairs.
    """

    def __init__(
        self, beta: float = 0.1, loss_type: str = "kto_pair", weights: LossWeights | None = None
    ) -> None:
        if loss_type not in PREFERENCE_LOSSES:
            raise ValueError(
                f"PreferenceObjective.loss_type={loss_type!r}; use one of {list(PREFERENCE_LOSSES)}"
            )
        self.beta, self.loss_type = beta, loss_type
        self.weights = weights if weights is not None else LossWeights()

    def forward(
        self, model: nn.Module, batch: dict[str, Tensor], moe_k: int | None = None
    ) -> tuple[Any, Tensor, Tensor]:
        """One pass over ``[2P, S]`` (chosen then rejected); returns (output, chosen logps, rejected logps)."""
        ids = torch.cat([batch["chosen"], batch["rejected"]])
        mask = torch.ones_like(ids)
        out = model(ids, moe_k=moe_k)
        logps = completion_logps(out.logits, ids, mask, batch["prompt_lengths"].repeat(2))
        chosen, rejected = logps.chunk(2)
        return out, chosen, rejected

    def _pref(self, output, batch) -> tuple[Tensor, Tensor, Tensor]:
        _, chosen, rejected = output
        return preference_loss(
            chosen,
            rejected,
            batch["ref_chosen_logps"],
            batch["ref_rejected_logps"],
            self.beta,
            self.loss_type,
        )

    def loss(self, output, batch) -> ObjectiveOutput:
        """``pref_loss + aux``."""
        pref, c_rew, r_rew = self._pref(output, batch)
        out = output[0]
        aux_losses = out.aux_losses or {}
        aux = self.weights.weighted(aux_losses, pref)
        return ObjectiveOutput(
            loss=pref + aux,
            metrics={
                "pref_loss": pref,
                "reward_margin": (c_rew - r_rew).mean(),
                "reward_accuracy": (c_rew > r_rew).float().mean(),
                "aux_loss": aux,
            },
            aux_losses=aux_losses,
            routing=list(out.routing or []),
        )

    def eval_loss(self, output, batch) -> tuple[Tensor, int]:
        """Preference loss of the validation pairs and their number."""
        return self._pref(output, batch)[0], int(batch["chosen"].shape[0])


@torch.no_grad()
def preference_stats(
    model: nn.Module, pairs: PreferencePairs, beta: float, loss_type: str
) -> dict[str, float]:
    """``{"loss", "reward_margin", "reward_accuracy"}`` of ``model`` as the policy on ``pairs``
    (rewards relative to the teacher reference). Runs in eval mode."""
    was = model.training
    model.eval()
    try:
        objective = PreferenceObjective(beta, loss_type)
        batch = pairs.batch(slice(None))
        loss, c_rew, r_rew = objective._pref(objective.forward(model, batch), batch)
    finally:
        model.train(was)
    return {
        "loss": float(loss),
        "reward_margin": float((c_rew - r_rew).mean()),
        "reward_accuracy": float((c_rew > r_rew).float().mean()),
    }


@torch.no_grad()
def preference_rate(
    before: nn.Module,
    after: nn.Module,
    teacher: nn.Module,
    prompts: Tensor,
    response_len: int,
    seed: int = 0,
    judge: Judge | None = None,
) -> dict[str, float]:
    """How often the judge (default: the teacher's log-likelihood) prefers ``after``'s response to
    ``before``'s on each of ``prompts`` ``[P, L]`` (one sample each, same seed; ties count half).

    Returns ``{"preference_rate", "score_before", "score_after"}`` (mean scores).
    """
    scores = []
    for model in (before, after):
        gen = torch.Generator().manual_seed(seed)
        responses = sample_responses(model, prompts, 1, response_len, gen)[:, 0]
        per_prompt = [
            (judge or (lambda pr, rs: teacher_scores(teacher, pr, rs)))(prompts[p], responses[p : p + 1])[0]
            for p in range(prompts.shape[0])
        ]
        scores.append(torch.stack(per_prompt).float())
    b, a = scores
    rate = float(((a > b).float() + 0.5 * (a == b).float()).mean())
    return {"preference_rate": rate, "score_before": float(b.mean()), "score_after": float(a.mean())}


__all__ = [
    "Judge",
    "PreferenceDataModule",
    "PreferenceObjective",
    "PreferencePairs",
    "build_preference_pairs",
    "preference_rate",
    "preference_stats",
    "sample_responses",
    "teacher_scores",
]
