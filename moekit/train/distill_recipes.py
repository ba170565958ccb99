"""Distillation recipes run by the one engine: mimic, preference, Mixture-of-Students.

``distill(DistillConfig, student=None, resume=False) -> DistillResult``:

* ``mimic`` (LLaVA-MoD stage 2): CE on the corpus + ``kd_weight`` x KD against the teacher. The
  student is a preset (vocabulary taken from the teacher), a model folder, or a model the caller
  built (e.g. upcycled from a smaller dense model: ``moekit distill --upcycle-experts``).
* ``mos`` (DeepSpeed-MoE Mixture-of-Students): as mimic, with a preset student turned into a PR-MoE
  (:func:`pr_moe_config`: fewer layers than the teacher, more experts in the last MoE layers,
  residual MoE) and staged KD (``kd_stop_step``, default half the steps).
* ``preference`` (LLaVA-MoD stage 3): pairs of the student's own samples ranked by the teacher,
  trained with DPO/KTO with the teacher as the reference; reports reward margins and the
  teacher-judged preference rate against the student before this stage.

The run folder is a normal ``moekit train`` run folder: ``train_config.json`` is a
:class:`~moekit.train.TrainConfig` describing the student and the data (so ``eval``, ``trace``,
``report``, ``generate`` open it), checkpoints hold the student and the teacher's tokenizer,
``distill_config.json`` holds the distillation settings and ``distill_summary.json`` the results.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.config import JsonConfig, check_choice
from moekit.train.distill import KD_KINDS, PREFERENCE_LOSSES, summary_json

RECIPES = ("mimic", "preference", "mos")


@dataclass(kw_only=True)
class DistillConfig(JsonConfig):
    """A distillation run (every ``moekit distill`` flag is one field).

    Models:
        teacher: the teacher folder (run, checkpoint, moekit or Hugging Face folder).
        student: a student folder; or None with ``student_preset``.
        student_preset: a preset name for a new student (its vocabulary becomes the teacher's).
        student_overrides: ModelConfig fields changed on the preset (nested dicts merge).
        recipe: ``"mimic"``, ``"preference"`` or ``"mos"``.
        mos_num_layers: the Mixture-of-Students student's depth; None is the teacher's minus 1/8
            (at least one layer fewer).
        upcycle_experts: ``student`` is a smaller dense model to upcycle into this many experts
            first. The caller does the upcycling (``moekit distill`` does, with
            :mod:`moekit.surgery`) and passes the model to :func:`distill`; it is recorded here so
            a resume rebuilds the same student.

    KD (mimic, mos): kd_kind, kd_beta, temperature (see :func:`~moekit.train.distill.kd_loss`),
        kd_weight, ce_weight, kd_stop_step (None: KD throughout; mos defaults to half the steps),
        top_k_logits (KD on the teacher's top-k; with cache_teacher the teacher runs once).

    Preference: num_prompts, num_samples, prompt_len, response_len, pref_beta, pref_loss_type
        (``"kto_pair"`` as LLaVA-MoD, or ``"sigmoid"`` DPO), pref_val_fraction.

    Data and loop: as :class:`~moekit.train.TrainConfig` (corpus, max_corpus_bytes, val_fraction,
        cache_dir, seq_len, batch_size, grad_accum, max_steps, lr, min_lr, warmup_steps,
        weight_decay, grad_clip, eval_interval, eval_steps, log_interval, save_interval,
        time_limit_s, seed, out_dir).
    """

    teacher: str
    student: str | None = None
    student_preset: str | None = None
    student_overrides: dict[str, Any] = field(default_factory=dict)
    recipe: str = "mimic"
    mos_num_layers: int | None = None
    upcycle_experts: int | None = None

    kd_kind: str = "forward_kl"
    kd_beta: float = 0.5
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    kd_stop_step: int | None = None
    top_k_logits: int | None = None
    cache_teacher: bool = False

    num_prompts: int = 32
    num_samples: int = 4
    prompt_len: int = 16
    response_len: int = 16
    pref_beta: float = 0.1
    pref_loss_type: str = "kto_pair"
    pref_val_fraction: float = 0.25

    corpus: list[str] | None = None
    max_corpus_bytes: int | None = 12_000_000
    val_fraction: float = 0.05
    cache_dir: str | None = None
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 50
    eval_steps: int = 4
    log_interval: int = 10
    save_interval: int = 50
    time_limit_s: float | None = None
    seed: int = 0
    out_dir: str = "runs/distill"

    def __post_init__(self) -> None:
        name = "DistillConfig"
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        check_choice(name, "recipe", self.recipe, RECIPES)
        check_choice(name, "kd_kind", self.kd_kind, KD_KINDS)
        check_choice(name, "pref_loss_type", self.pref_loss_type, PREFERENCE_LOSSES)
        if (self.student is None) == (self.student_preset is None):
            raise ValueError(f"{name}: give exactly one of student (a folder) and student_preset")
        if self.temperature <= 0:
            raise ValueError(f"{name}.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.kd_beta <= 1:
            raise ValueError(f"{name}.kd_beta must be in [0, 1], got {self.kd_beta}")
        if self.cache_teacher and self.top_k_logits is None:
            raise ValueError(
                f"{name}.cache_teacher needs top_k_logits (the cache stores the teacher's top-k)"
            )
        for f in (
            "max_steps",
            "seq_len",
            "batch_size",
            "grad_accum",
            "num_prompts",
            "prompt_len",
            "response_len",
        ):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")

    @property
    def resolved_kd_stop_step(self) -> int | None:
        """``kd_stop_step``, or half the steps for ``mos`` when unset."""
        if self.kd_stop_step is None and self.recipe == "mos":
            return max(1, self.max_steps // 2)
        return self.kd_stop_step


@dataclass
class DistillResult:
    """What :func:`distill` returns: the engine's :class:`~moekit.train.FitResult` plus the summary
    written to ``distill_summary.json``."""

    fit: Any
    summary: dict[str, Any]
    out_dir: Path


def pr_moe_config(base: Any, num_layers: int) -> Any:
    """A PR-MoE ModelConfig from ``base`` (which must have ``moe``): ``num_layers`` layers, every layer
    MoE, residual MoE (dense MLP + top-1 expert as DeepSpeed-MoE), and a pyramid: the last
    ``max(1, round(L / 6))`` MoE layers get twice the experts (350M PR-MoE: 10 x 32 then 2 x 64)."""
    if base.moe is None:
        raise ValueError("the Mixture-of-Students student needs an MoE preset (its moe template)")
    if num_layers < 1:
        raise ValueError(f"the Mixture-of-Students student needs >= 1 layer, got {num_layers}")
    num_wide = max(1, round(num_layers / 6)) if num_layers > 1 else 0  # one layer: no pyramid
    e = base.moe.num_experts
    experts = tuple([e] * (num_layers - num_wide) + [2 * e] * num_wide)
    moe = base.moe.replace(residual_moe=True, top_k=1)
    return base.replace(
        num_layers=num_layers,
        moe=moe,
        moe_placement="all",
        experts_per_layer=experts,
        ffn_dim=base.moe.ffn_dim,
    )


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def student_model_config(config: DistillConfig, teacher_config: Any) -> Any:
    """The ModelConfig of a preset student: the preset (PR-MoE for ``mos``) with ``student_overrides``
    and the teacher's vocabulary size."""
    from moekit.models import ModelConfig, get_preset

    assert config.student_preset is not None
    base = get_preset(config.student_preset)
    if config.recipe == "mos":
        depth = config.mos_num_layers
        if depth is None:
            depth = teacher_config.num_layers - max(1, round(teacher_config.num_layers / 8))
        base = pr_moe_config(base, max(1, depth))
    merged = _deep_merge(
        base.to_dict(), {**config.student_overrides, "vocab_size": teacher_config.vocab_size}
    )
    return ModelConfig.from_dict(merged)


def check_same_vocabulary(
    teacher: nn.Module, student: nn.Module, teacher_tok: Any, student_dir: Path | None
) -> None:
    """Raises ``ValueError("vocabulary mismatch: ...")`` unless teacher and student share a tokenizer."""
    from moekit.data import tokenizer_hash
    from moekit.loader import load_tokenizer

    t_vocab, s_vocab = teacher.config.vocab_size, student.config.vocab_size
    if t_vocab != s_vocab:
        raise ValueError(
            f"vocabulary mismatch: the teacher has {t_vocab} tokens and the student {s_vocab}; "
            "teacher and student must share a tokenizer"
        )
    has_tok = student_dir is not None and (student_dir / "tokenizer.json").is_file()
    if has_tok and tokenizer_hash(load_tokenizer(student_dir)) != tokenizer_hash(teacher_tok):
        raise ValueError(
            f"vocabulary mismatch: {student_dir}/tokenizer.json differs from the teacher's tokenizer; "
            "teacher and student must share a tokenizer"
        )


def train_config_of(config: DistillConfig, student_config: Any, teacher_dir: Path) -> Any:
    """The :class:`~moekit.train.TrainConfig` that describes the student and data of this run (its
    ``train_config.json``, so every verb opens the run folder as an LM run)."""
    from moekit.train.config import TrainConfig

    return TrainConfig(
        preset=config.student_preset or "moe-small",
        init_from=config.student,
        model_overrides=student_config.to_dict() if config.student_preset else {},
        corpus=config.corpus,
        max_corpus_bytes=config.max_corpus_bytes,
        val_fraction=config.val_fraction,
        tokenizer_dir=str(teacher_dir),
        cache_dir=config.cache_dir,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        max_steps=config.max_steps,
        time_limit_s=config.time_limit_s,
        lr=config.lr,
        min_lr=config.min_lr,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        eval_interval=config.eval_interval,
        eval_steps=config.eval_steps,
        log_interval=config.log_interval,
        save_interval=config.save_interval,
        seed=config.seed,
        out_dir=config.out_dir,
    )


def distill(
    config: DistillConfig,
    student: nn.Module | None = None,
    resume: bool = False,
    progress: bool = True,
    judge: Any = None,
    device: torch.device | str | None = None,
) -> DistillResult:
    """Runs ``config.recipe`` through :func:`moekit.train.fit` and writes the run folder.

    Args:
        student: a student the caller built (e.g. upcycled); None builds it from ``config``. It must
            be built the same way on resume (weights then come from the checkpoint).
        resume: continue ``out_dir/checkpoints/last`` exactly (KD stage, cache and data included).
        judge: preference recipe only: ``judge(prompt [L], responses [N, R]) -> [N]`` instead of the
            teacher's log-likelihood.
    """
    from moekit.data import TextDataModule, load_token_data
    from moekit.data import corpus as data_mod
    from moekit.loader import from_pretrained, inspect_folder, load_tokenizer
    from moekit.models import MoEForCausalLM
    from moekit.models.objectives import LossWeights
    from moekit.train import checkpoint as ckpt
    from moekit.train.engine import fit, seed_everything
    from moekit.train.loop_config import LoopConfig

    out_dir = Path(config.out_dir)
    if resume:
        saved = ckpt.load_checkpoint(out_dir / "checkpoints").state.get("distill")
        if saved is not None:
            _check_resume(config, saved)
    teacher_dir = inspect_folder(config.teacher).model_dir
    teacher = from_pretrained(config.teacher)
    tok = load_tokenizer(teacher_dir)
    seed_everything(config.seed)
    student_dir = inspect_folder(config.student).model_dir if config.student is not None else None
    if config.upcycle_experts is not None and student is None:
        raise ValueError("upcycle_experts: pass the upcycled student (moekit distill --upcycle-experts does)")
    if student is None:
        if config.student is not None:
            student = from_pretrained(config.student)
        else:
            student = MoEForCausalLM(student_model_config(config, teacher.config))
    student.train()
    check_same_vocabulary(teacher, student, tok, student_dir)
    if config.seq_len + 1 > student.config.max_position_embeddings:
        raise ValueError(
            f"seq_len={config.seq_len} exceeds the student's max_position_embeddings="
            f"{student.config.max_position_embeddings}; pass a smaller --seq-len"
        )
    run_config = train_config_of(config, student.config, teacher_dir)
    loop = LoopConfig(
        max_steps=config.max_steps,
        items_per_step=config.batch_size * config.seq_len * config.grad_accum,
        grad_accum=config.grad_accum,
        grad_clip=config.grad_clip,
        lr=config.lr,
        min_lr=config.min_lr,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        eval_interval=config.eval_interval,
        log_interval=config.log_interval,
        save_interval=config.save_interval,
        time_limit_s=config.time_limit_s,
    )
    docs = data_mod.resolve_corpus(config.corpus, config.max_corpus_bytes)
    train_docs, val_docs = data_mod.split_documents(docs, config.val_fraction)
    tokens = load_token_data(tok, train_docs, val_docs, config.cache_dir, config.val_fraction)
    text = TextDataModule(tok, tokens, config.seq_len, config.batch_size, config.eval_steps, config.seed)
    weights = LossWeights.from_model_config(student.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "distill_config.json").write_text(
        json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    )
    if config.recipe == "preference":
        return _run_preference(
            config, student, teacher, text, loop, weights, run_config, resume, progress, judge, device
        )
    return _run_kd(config, student, teacher, text, loop, weights, run_config, resume, progress, device, fit)


@torch.no_grad()
def routing_overlap(student: nn.Module, teacher: nn.Module, batches: list[Any]) -> list[dict[str, float]]:
    """How the student's routing relates to the teacher's on the same tokens, per MoE layer pair.

    Student MoE layer i is paired with the teacher MoE layer at the same relative depth. For each
    pair: ``nmi``, the normalised mutual information of the two top-1 expert choices (needs no
    correspondence between the two expert sets, so it is meaningful for any two MoE models), and
    ``same_top1`` / ``topk_overlap`` (share of tokens with the same top-1 expert / mean share of
    the student's top-k set the teacher also picked), meaningful only when the experts correspond
    (a student pruned or upcycled from the teacher). Empty unless both models are MoE.

    Args:
        batches: ``[B, S + 1]`` token batches (or :class:`~moekit.train.distill.DistillDataModule` dicts).
    """
    ids_s: list[list[Tensor]] = []
    ids_t: list[list[Tensor]] = []
    for batch in batches:
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        for model, acc in ((student, ids_s), (teacher, ids_t)):
            routing = model(tokens[:, :-1]).routing or []
            for i, info in enumerate(routing):
                if i == len(acc):
                    acc.append([])
                acc[i].append(info.expert_ids)
    if not ids_s or not ids_t:
        return []
    out = []
    n_s, n_t = len(ids_s), len(ids_t)
    for i in range(n_s):
        j = round(i * (n_t - 1) / max(n_s - 1, 1))
        a_TK, b_TK = torch.cat(ids_s[i]), torch.cat(ids_t[j])
        k = min(a_TK.shape[1], b_TK.shape[1])
        same = (a_TK[:, :, None] == b_TK[:, None, :k]).any(-1)[:, :k].float().mean()
        out.append(
            {
                "student_layer": i,
                "teacher_layer": j,
                "nmi": _nmi(a_TK[:, 0], b_TK[:, 0]),
                "same_top1": float((a_TK[:, 0] == b_TK[:, 0]).float().mean()),
                "topk_overlap": float(same),
            }
        )
    return out


def _nmi(a: Tensor, b: Tensor) -> float:
    """Normalised mutual information ``I(a; b) / sqrt(H(a) H(b))`` of two ``[T]`` id vectors (1 when
    each determines the other, 0 when independent; 1 when both are constant)."""
    _, a = torch.unique(a, return_inverse=True)
    _, b = torch.unique(b, return_inverse=True)
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(a.shape[0], dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)

    def entropy(p: Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    mi = entropy(pa) + entropy(pb) - entropy(joint.flatten())
    h = (entropy(pa) * entropy(pb)) ** 0.5
    return 1.0 if h == 0 else max(0.0, mi / h)


def _check_resume(config: DistillConfig, saved: dict[str, Any]) -> None:
    fixed = ("teacher", "student", "student_preset", "student_overrides", "recipe", "corpus", "kd_kind",
             "top_k_logits", "num_prompts", "num_samples", "upcycle_experts")  # fmt: skip
    now = config.to_dict()
    changed = [f for f in fixed if f in saved and saved[f] != now[f]]
    if changed:
        detail = ", ".join(f"{f}: {saved[f]!r} -> {now[f]!r}" for f in changed)
        raise ValueError(f"cannot resume: {detail} differ from the run's; resume with the original values")


def _run_kd(
    config, student, teacher, text, loop, weights, run_config, resume, progress, device, fit
) -> DistillResult:
    from moekit.train.distill import DistillDataModule, DistillObjective, TeacherLogitCache, teacher_agreement

    out_dir = Path(config.out_dir)
    data = DistillDataModule(text, config.grad_accum)
    if device is not None:
        teacher.to(device)
    cache = None
    t_cache = 0.0
    if config.cache_teacher:
        path = out_dir / "teacher_cache" / "topk.safetensors"
        num_batches = config.max_steps * config.grad_accum
        if path.is_file():
            cache = TeacherLogitCache.load(path)
        if cache is None or not cache.matches(config.top_k_logits, config.temperature, num_batches):
            t0 = time.perf_counter()
            cache = TeacherLogitCache.build(
                teacher, data, num_batches, config.top_k_logits, config.temperature, path
            )
            t_cache = time.perf_counter() - t0
    objective = DistillObjective(
        teacher,
        kd_kind=config.kd_kind,
        temperature=config.temperature,
        beta=config.kd_beta,
        kd_weight=config.kd_weight,
        ce_weight=config.ce_weight,
        kd_stop_step=config.resolved_kd_stop_step,
        top_k_logits=config.top_k_logits,
        cache=cache,
        weights=weights,
    )
    result = fit(
        student, objective, data, loop, out_dir, resume=resume, progress=progress, device=device,
        run_config=run_config.to_dict(),
        state_extra={"unigram_val_loss": text.unigram_loss, "tokenizer_hash": text.tokenizer_hash,
                     "distill": config.to_dict()},
        start_extra={"model_config": student.config.to_dict(), "loss_weights": weights.to_dict(),
                     "recipe": config.recipe, "distill": objective.describe(),
                     "teacher_num_params": sum(p.numel() for p in teacher.parameters())},
        dist_context=None,
    )  # fmt: skip
    val = data.val_batches()
    from moekit.models.objectives import CausalLMObjective

    student.eval()
    teacher_val = CausalLMObjective(weights).evaluate(teacher, [b["tokens"] for b in val])
    summary = {
        "recipe": config.recipe,
        "step": result.step,
        "stop_reason": result.stop_reason,
        "val_loss": result.val_loss,
        "teacher_val_loss": teacher_val,
        "unigram_val_loss": text.unigram_loss,
        "top1_agreement": teacher_agreement(student, teacher, val),
        "kd": objective.describe(),
        "seconds_per_step": result.elapsed_s / max(result.num_steps_run, 1) if result.num_steps_run else None,
        "teacher_cache_build_s": t_cache,
        "student_num_params": sum(p.numel() for p in student.parameters()),
        "teacher_num_params": sum(p.numel() for p in teacher.parameters()),
        "routing_overlap": routing_overlap(student, teacher, val),
        "process_peak_rss_mb": _peak_rss_mb(),
    }
    summary_json(out_dir / "distill_summary.json", summary)
    return DistillResult(result, summary, out_dir)


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _prompts(stream: Any, num: int, length: int, seed: int) -> torch.Tensor:
    """``[num, length]`` prompt windows of a token stream, at seeded random offsets."""
    ids = torch.as_tensor(stream, dtype=torch.long)
    if ids.numel() <= length:
        raise ValueError(f"the corpus split has {ids.numel()} tokens, too few for {length}-token prompts")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (num,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def _run_preference(
    config, student, teacher, text, loop, weights, run_config, resume, progress, judge, device
):
    from moekit.train.distill import freeze_teacher
    from moekit.train.distill_preference import (
        PreferenceDataModule,
        PreferenceObjective,
        build_preference_pairs,
        preference_rate,
        preference_stats,
    )
    from moekit.train.engine import fit

    out_dir = Path(config.out_dir)
    freeze_teacher(teacher)
    before = copy.deepcopy(student).eval()
    # Pairs come from the student as it is before this stage, so a resume (weights loaded inside fit)
    # rebuilds the same pairs from the same starting student.
    prompts = _prompts(text.tokens.train, config.num_prompts, config.prompt_len, config.seed)
    pairs = build_preference_pairs(
        before, teacher, prompts, config.num_samples, config.response_len, config.seed, judge
    )
    num_val = max(1, round(len(pairs) * config.pref_val_fraction)) if len(pairs) > 1 else 0
    train_pairs, val_pairs = pairs.subset(slice(num_val, None)), pairs.subset(slice(0, num_val))
    data = PreferenceDataModule(train_pairs, val_pairs, config.batch_size, config.seed)
    objective = PreferenceObjective(config.pref_beta, config.pref_loss_type, weights)
    loop = loop.replace(items_per_step=data.batch_size * config.grad_accum)
    stats_before = preference_stats(before, val_pairs, config.pref_beta, config.pref_loss_type)
    result = fit(
        student, objective, data, loop, out_dir, resume=resume, progress=progress, device=device,
        run_config=run_config.to_dict(),
        state_extra={"unigram_val_loss": text.unigram_loss, "tokenizer_hash": text.tokenizer_hash,
                     "distill": config.to_dict()},
        start_extra={"model_config": student.config.to_dict(), "recipe": "preference",
                     "pref_beta": config.pref_beta, "pref_loss_type": config.pref_loss_type},
        dist_context=None,
    )  # fmt: skip
    student.eval()
    held_out = _prompts(text.tokens.val, max(4, num_val), config.prompt_len, config.seed + 1)
    summary = {
        "recipe": "preference",
        "step": result.step,
        "stop_reason": result.stop_reason,
        "val_pref_loss": result.val_loss,
        "num_pairs": len(pairs),
        "judge": "callable" if judge is not None else "teacher_log_likelihood",
        "before": stats_before,
        "after": preference_stats(student, val_pairs, config.pref_beta, config.pref_loss_type),
        "teacher_judged": preference_rate(
            before, student, teacher, held_out, config.response_len, config.seed, judge
        ),
    }
    summary_json(out_dir / "distill_summary.json", summary)
    return DistillResult(result, summary, out_dir)


__all__ = [
    "RECIPES",
    "DistillConfig",
    "DistillResult",
    "check_same_vocabulary",
    "distill",
    "pr_moe_config",
    "routing_overlap",
    "student_model_config",
    "train_config_of",
]
