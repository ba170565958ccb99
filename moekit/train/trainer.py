"""The training loop: :class:`TrainConfig` in, :class:`TrainResult` (metrics and paths) out.

Order of one run: seed -> corpus -> tokenizer (cached) -> token streams (cached) -> model (preset +
overrides, or the checkpoint) -> freeze -> AdamW -> (resume) -> steps -> final eval -> checkpoint.

One optimizer step: ``grad_accum`` micro-batches of B windows, each ``loss = lm_loss + aux_loss``
(the model weights its aux losses with the ModelConfig coefficients) divided by ``grad_accum``; then
gradient clipping, the lr of this step (linear warmup, cosine decay to ``min_lr``), AdamW, and the
expert-bias update (when the model has aux-loss-free routers). Then log, evaluate, save, in that order,
so the RNG state a checkpoint records is the one the next step starts from.

Exact resume: the checkpoint holds the model, the AdamW state, the step, the sampler generator and all
global RNG states; the lr is a pure function of the step. A resumed run therefore computes the same
losses bit for bit as the uninterrupted run (same machine, same thread count).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import JsonConfig, check_choice
from moekit.train import checkpoint as ckpt
from moekit.train import data as data_mod
from moekit.train.tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer

K_SCHEDULE_TYPES = ("linear", "cosine", "step", "constant")
DTYPES = ("fp32", "bf16")

# Named freeze groups: name -> (regex on parameter names, invert). Parameter names look like
# ``embed_tokens.weight``, ``layers.3.self_attn.q_proj.weight``, ``layers.3.mlp.router.weight``,
# ``layers.3.mlp.experts.w_in``, ``layers.3.mlp.shared.w_in.weight``, ``layers.0.mlp.w_in.weight``
# (a dense FFN), ``norm.weight``, ``lm_head.weight``. An inverted group freezes what does NOT match.
_ROUTER = r"\.mlp\.router\."
# Routed experts, including MoE++ constant experts (their gate and vector are per-expert weights).
_EXPERTS = r"\.mlp\.(experts\.|const_gate$|const_vec$)"
# Always-on dense branches inside an MoE layer: shared expert(s) and PR-MoE's residual MLP.
_SHARED = r"\.mlp\.(shared|shared_gate|residual_mlp|residual_coef)\."
FREEZE_GROUPS: dict[str, tuple[str, bool]] = {
    "router": (_ROUTER, False),
    "experts": (_EXPERTS, False),
    "shared": (_SHARED, False),
    "attention": (r"\.self_attn\.", False),
    "embeddings": (r"^(embed_tokens|lm_head)\.", False),
    "norms": (r"(^|\.)\w*norm\w*\.(weight|bias)$", False),
    # A dense FFN's projections hang directly off `mlp`, unlike experts/shared/router ones.
    "dense_ffn": (r"^layers\.\d+\.mlp\.w_\w+\.(weight|bias)$", False),
    # The backbone: everything that is not part of an MoE block's routing or experts.
    "non_experts": (f"{_ROUTER}|{_EXPERTS}|{_SHARED}", True),
    "all_but_router": (_ROUTER, True),
    "all_but_experts": (_EXPERTS, True),
}
RAW_REGEX_PREFIX = "re:"


@dataclass(kw_only=True)
class KSchedule(JsonConfig):
    """Experts per token over training, passed to the model as ``moe_k`` (SMoE-Dropout's progressive k).

    At step s, with progress ``t = min(s / horizon, 1)``:
    ``linear``: ``round(k_min + (k_max - k_min) * t)``; ``cosine``: the same with
    ``(1 - cos(pi t)) / 2`` in place of t; ``step``: each k in ``k_min..k_max`` for an equal share of the
    horizon; ``constant``: ``k_max``.

    Attributes:
        type: one of ``linear``, ``cosine``, ``step``, ``constant``.
        k_min: k at step 0.
        k_max: k from the horizon on.
        horizon: steps to reach ``k_max``; ``None`` means the whole run.
    """

    type: str = "linear"
    k_min: int = 1
    k_max: int = 2
    horizon: int | None = None

    def __post_init__(self) -> None:
        check_choice("KSchedule", "type", self.type, K_SCHEDULE_TYPES)
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(
                f"KSchedule needs 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}"
            )
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(
                f"KSchedule.horizon must be >= 1 (or None for the whole run), got {self.horizon}"
            )

    @classmethod
    def parse(cls, text: str) -> KSchedule:
        """Parses JSON (``{"type": "linear", "k_min": 1, "k_max": 4}``) or ``type:k_min:k_max[:horizon]``."""
        text = text.strip()
        if text.startswith("{"):
            return cls.from_json(text)
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(
                f"k schedule {text!r}: use TYPE:K_MIN:K_MAX[:HORIZON] (e.g. linear:1:4) or a JSON object"
            )
        try:
            nums = [int(p) for p in parts[1:]]
        except ValueError as e:
            raise ValueError(f"k schedule {text!r}: K_MIN, K_MAX and HORIZON must be integers") from e
        return cls(type=parts[0], k_min=nums[0], k_max=nums[1], horizon=nums[2] if len(nums) == 3 else None)

    def k_at(self, step: int, total_steps: int) -> int:
        """k for optimizer step ``step`` (0-based) of a ``total_steps`` run."""
        if self.type == "constant" or self.k_min == self.k_max:
            return self.k_max
        horizon = self.horizon or max(total_steps, 1)
        t = min(max(step, 0) / horizon, 1.0)
        span = self.k_max - self.k_min
        if self.type == "linear":
            return int(round(self.k_min + span * t))
        if self.type == "cosine":
            return int(round(self.k_min + span * (1 - math.cos(math.pi * t)) / 2))
        return min(self.k_min + int(t * (span + 1)), self.k_max)  # step


@dataclass(kw_only=True)
class TrainConfig(JsonConfig):
    """Everything that defines a training run. Every CLI flag of ``moekit train`` is one of these fields.

    The defaults are the ``moekit train`` default run: moe-small on the standard library, 320 steps of
    16 x 256 tokens (1.3M tokens, ~1.4 s per step on 2 idle cores), capped at 540 s.

    Model:
        preset: a ``moekit.models`` preset name.
        init_from: start from this model folder instead of a fresh preset (a surgery result, an
            imported Hugging Face model, a checkpoint); its tokenizer is used when it has one.
            ``preset`` and ``model_overrides`` are then ignored.
        model_overrides: ModelConfig fields to change (nested dicts merge, e.g. ``{"moe": {"top_k": 1}}``).
        aux_loss_coef, z_loss_coef: override the ModelConfig coefficients; ``None`` keeps the preset's.
        bias_update_rate: speed of the aux-loss-free expert-bias update for routers with
            ``use_expert_bias``; ``None`` means 1e-3 (DeepSeek-V3).
        k_schedule: experts per token over training (:class:`KSchedule`), ``None`` for the model's k.
        freeze: parameter groups to freeze: names in :data:`FREEZE_GROUPS` or ``"re:<regex>"``.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        dtype: ``"fp32"`` or ``"bf16"`` (autocast; weights and optimizer stay fp32).

    Data:
        corpus: files, folders or globs; ``None`` is the Python standard library's source.
        max_corpus_bytes: cap on the corpus size (a deterministic subset).
        val_fraction: share of documents (by path hash) held out for validation.
        tokenizer_dir: use this tokenizer instead of training one.
        tokenizer_sample_bytes: how much text the tokenizer is trained on.
        cache_dir: token and tokenizer cache; ``None`` is ``$MOEKIT_CACHE`` or ``~/.cache/moekit``.

    Budget and optimisation:
        seq_len, batch_size, grad_accum: tokens per step are ``seq_len * batch_size * grad_accum``.
        max_steps: optimizer steps; with ``max_tokens`` too, the smaller budget wins.
        max_tokens: the budget in training tokens instead of steps.
        time_limit_s: stop (with a checkpoint) after this much wall-clock time.
        lr, min_lr, warmup_steps: linear warmup to ``lr``, cosine decay to ``min_lr`` at the last step.
        weight_decay, betas: AdamW; norms, biases and embeddings get no weight decay.
        grad_clip: max global gradient norm (0 disables).

    Bookkeeping:
        eval_interval, eval_steps: evaluate every N steps on ``eval_steps`` fixed validation batches.
        log_interval: steps between ``train_log.jsonl`` records.
        save_interval: steps between checkpoints (one is always written at the end).
        keep_previous: keep the checkpoint before ``last`` as ``previous``.
        seed: seeds the model init, the sampler and every RNG.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` during the run.
        out_dir: run folder (checkpoints/, train_log.jsonl, train_config.json).
    """

    preset: str = "moe-small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    aux_loss_coef: float | None = None
    z_loss_coef: float | None = None
    bias_update_rate: float | None = None
    k_schedule: KSchedule | None = None
    freeze: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    dtype: str = "fp32"

    init_from: str | None = None

    corpus: list[str] | None = None
    max_corpus_bytes: int | None = 12_000_000
    val_fraction: float = 0.05
    tokenizer_dir: str | None = None
    tokenizer_sample_bytes: int = 3_000_000
    cache_dir: str | None = None

    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = 320
    max_tokens: int | None = None
    time_limit_s: float | None = 540.0
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0

    eval_interval: int = 80
    eval_steps: int = 4
    log_interval: int = 10
    save_interval: int = 100
    keep_previous: bool = True
    seed: int = 0
    deterministic: bool = True
    out_dir: str | None = None

    def __post_init__(self) -> None:
        name = "TrainConfig"
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if isinstance(self.k_schedule, dict):
            self.k_schedule = KSchedule.from_dict(self.k_schedule)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.freeze = list(self.freeze)
        check_choice(name, "dtype", self.dtype, DTYPES)
        for f in ("seq_len", "batch_size", "grad_accum", "eval_interval", "eval_steps", "log_interval"):
            if getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1, got {getattr(self, f)}")
        if self.save_interval < 1:
            raise ValueError(f"{name}.save_interval must be >= 1, got {self.save_interval}")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError(f"{name}: set max_steps or max_tokens (the training budget)")
        for f in ("max_steps", "max_tokens"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"{name}.{f} must be >= 1 (or None), got {getattr(self, f)}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"{name}.time_limit_s must be positive (or None), got {self.time_limit_s}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(
                f"{name} needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"{name}: warmup_steps, weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{name}.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"{name}.val_fraction must be in (0, 1), got {self.val_fraction}")
        for f in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, f) is not None and getattr(self, f) < 0:
                raise ValueError(
                    f"{name}.{f} must be >= 0 (or None to keep the model's), got {getattr(self, f)}"
                )
        if self.max_corpus_bytes is not None and self.max_corpus_bytes < 1:
            raise ValueError(
                f"{name}.max_corpus_bytes must be positive (or None), got {self.max_corpus_bytes}"
            )
        if self.tokenizer_sample_bytes < 1:
            raise ValueError(
                f"{name}.tokenizer_sample_bytes must be positive, got {self.tokenizer_sample_bytes}"
            )
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"{name}.model_overrides must be a dict of ModelConfig fields")
        for spec in self.freeze:
            freeze_pattern(spec)  # raises on unknown groups and bad regexes

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step (``seq_len * batch_size * grad_accum``)."""
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        """The step budget: ``max_steps`` or ``ceil(max_tokens / tokens_per_step)``, whichever is smaller."""
        budgets = []
        if self.max_steps is not None:
            budgets.append(self.max_steps)
        if self.max_tokens is not None:
            budgets.append(math.ceil(self.max_tokens / self.tokens_per_step))
        return min(budgets)

    def resolved_out_dir(self) -> Path:
        """``out_dir``, or ``runs/<preset>`` (``runs/<init_from folder name>`` when starting from a folder)."""
        if self.out_dir:
            return Path(self.out_dir)
        return Path("runs") / (Path(self.init_from).name if self.init_from else self.preset)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        step: optimizer steps done (including those before a resume).
        num_tokens: training tokens seen.
        train_loss: mean total loss of the last logged window of steps.
        val_loss, val_perplexity: the final evaluation (mean LM loss in nats/token, and ``exp``).
        unigram_loss: the context-free baseline on the same validation tokens.
        stop_reason: ``"max_steps"``, ``"time_limit"`` or ``"interrupted"``.
        elapsed_s: wall-clock seconds of this process's part of the run.
        tokens_per_s: training throughput of this process.
        out_dir, checkpoint_dir, log_path: where things went.
        losses: ``[(step, total loss)]`` of every step of this process (for comparisons and tests).
        history: the eval records (``{"step", "val_loss", "val_perplexity"}``) of the whole run.
    """

    step: int
    num_tokens: int
    train_loss: float
    val_loss: float
    val_perplexity: float
    unigram_loss: float
    stop_reason: str
    elapsed_s: float
    tokens_per_s: float
    out_dir: Path
    checkpoint_dir: Path
    log_path: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_at(step: int, config: TrainConfig, total_steps: int | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Linear warmup ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then cosine
    decay from ``lr`` to ``min_lr`` reached at the last step ``total_steps - 1``.
    """
    total = config.total_steps if total_steps is None else total_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(total - 1 - config.warmup_steps, 1)
    t = min((step - config.warmup_steps) / decay_steps, 1.0)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def freeze_pattern(spec: str) -> tuple[re.Pattern[str], bool]:
    """Compiles a freeze spec: a :data:`FREEZE_GROUPS` name or ``"re:<regex>"``; returns (regex, invert)."""
    if spec.startswith(RAW_REGEX_PREFIX):
        try:
            return re.compile(spec[len(RAW_REGEX_PREFIX) :]), False
        except re.error as e:
            raise ValueError(f"freeze regex {spec!r} does not compile: {e}") from e
    if spec not in FREEZE_GROUPS:
        raise ValueError(
            f"unknown freeze group {spec!r}; use one of {sorted(FREEZE_GROUPS)} or 're:<regex>' on parameter names"
        )
    regex, invert = FREEZE_GROUPS[spec]
    return re.compile(regex), invert


def select_frozen(names: list[str], specs: list[str]) -> set[str]:
    """The parameter names the freeze specs select (union over specs).

    Raises:
        ValueError: a spec matches no parameter (likely a typo), or the specs select every parameter.
    """
    frozen: set[str] = set()
    for spec in specs:
        pattern, invert = freeze_pattern(spec)
        hit = {n for n in names if bool(pattern.search(n)) != invert}
        if not hit:
            raise ValueError(f"freeze {spec!r} matches no parameter of this model (e.g. {names[:3]})")
        frozen |= hit
    if names and frozen >= set(names):
        raise ValueError(f"freeze {specs} freezes every parameter; nothing would train")
    return frozen


def apply_freeze(model: nn.Module, specs: list[str]) -> set[str]:
    """Sets ``requires_grad=False`` on the parameters selected by ``specs``; returns their names.

    Parameters that are already frozen by the model (e.g. a random-fixed router) stay frozen. Raises
    ``ValueError`` if nothing would remain trainable.
    """
    named = dict(model.named_parameters())
    frozen = select_frozen(list(named), specs)
    if specs and all(not p.requires_grad or n in frozen for n, p in named.items()):
        raise ValueError(f"freeze {specs} leaves no trainable parameter")
    for name in frozen:
        named[name].requires_grad_(False)
    return frozen


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, dict[int, str]]:
    """AdamW over the trainable parameters; returns it and ``id(param) -> name``.

    Weight decay applies to matrices only: norms, biases (1-D) and embeddings are excluded, because
    decaying them pulls scales and rare-token rows toward zero without regularising anything useful.
    """
    decay, no_decay, names = [], [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names[id(p)] = name
        if p.ndim < 2 or "embed" in name or re.search(FREEZE_GROUPS["norms"][0], name):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # foreach=False: the single-tensor path gives the same bits whatever the grouping of tensors.
    opt = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=False)
    return opt, names


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_model_config(config: TrainConfig, vocab_size: int | None = None):
    """The ModelConfig of a new run: the preset, ``model_overrides`` merged in, then coefficient overrides."""
    from moekit.models import ModelConfig, get_preset

    base = get_preset(config.preset)
    merged = _deep_merge(base.to_dict(), config.model_overrides)
    if config.aux_loss_coef is not None:
        merged["aux_loss_coef"] = config.aux_loss_coef
    if config.z_loss_coef is not None:
        merged["z_loss_coef"] = config.z_loss_coef
    if vocab_size is not None and "vocab_size" not in config.model_overrides:
        merged["vocab_size"] = vocab_size
    return ModelConfig.from_dict(merged)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_tokenizer(config: TrainConfig, train_docs: list[data_mod.Document], vocab_size: int):
    """Loads ``tokenizer_dir``, or a cached tokenizer trained on the same sample, or trains one."""
    import hashlib

    if config.tokenizer_dir:
        return load_tokenizer(config.tokenizer_dir)
    sample, total = [], 0
    for doc in train_docs:  # sorted by path: a deterministic sample
        if total >= config.tokenizer_sample_bytes:
            break
        text = data_mod.read_text(doc)[: config.tokenizer_sample_bytes - total]
        sample.append(text)
        total += len(text)
    key_src = f"{data_mod.corpus_fingerprint(train_docs)}|{vocab_size}|{config.tokenizer_sample_bytes}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache = (
        (Path(config.cache_dir) if config.cache_dir else data_mod.default_cache_dir()) / "tokenizers" / key
    )
    if (cache / "tokenizer.json").is_file():
        with contextlib.suppress(ValueError):
            return load_tokenizer(cache)
    tok = train_tokenizer(sample, vocab_size)
    save_tokenizer(tok, cache)
    return tok


def _autocast(config: TrainConfig):
    if config.dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lm_loss(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    # fp32 cross-entropy: bf16 log-softmax over a large vocabulary loses ~2 digits of the loss.
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Tensor], config: TrainConfig, moe_k: int | None = None) -> float:
    """Mean LM loss (nats/token) over fixed validation batches, in eval mode (no router noise)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            with _autocast(config):
                out = model(batch[:, :-1], moe_k=moe_k)
            n = batch[:, 1:].numel()
            total += float(_lm_loss(out.logits, batch[:, 1:])) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


class _NullLog:
    """The run log of a non-zero rank: writes nothing."""

    path = None

    def write(self, record: dict[str, Any]) -> None:
        """Discards ``record``."""


class _RunLog:
    """Appends JSON records to ``train_log.jsonl`` (flushed per record, so a crash loses nothing)."""

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            # A resumed run drops records an interrupted run wrote after its last checkpoint.
            kept = []
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _routing_stats(
    routing_sums: list[Tensor | None], entropies: list[float], num_micro: int
) -> dict[str, Any]:
    tpe = [t.tolist() if t is not None else [] for t in routing_sums]
    balance = []
    for t in routing_sums:
        if t is not None and t.numel() and float(t.mean()) > 0:
            balance.append(float(t.max() / t.mean()))
    return {
        "tokens_per_expert": tpe,
        "router_entropy": [e / max(num_micro, 1) for e in entropies],
        "max_over_mean_load": (sum(balance) / len(balance)) if balance else None,
    }


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Trains a model as ``config`` says and returns the final metrics and paths.

    Args:
        config: the run.
        resume: continue from ``<out_dir>/checkpoints/last`` (bit-exact when the config is unchanged).
        progress: show a tqdm bar (loss, tokens/s, max/mean expert load).

    Ctrl-C saves a checkpoint of the last completed step and returns with ``stop_reason="interrupted"``.
    """
    from moekit.layers import ExpertBiasBalancer, MoELayer
    from moekit.models import MoEForCausalLM
    from moekit.parallel import distributed as dist_mod

    t_start = time.perf_counter()
    # Under torchrun: data parallel over ranks, experts sharded over the same ranks.
    ctx = dist_mod.init_from_env()
    is_main = ctx is None or ctx.is_main
    out_dir = config.resolved_out_dir()
    ckpt_root = out_dir / "checkpoints"
    previous_det = torch.are_deterministic_algorithms_enabled()
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        loaded = ckpt.load_checkpoint(ckpt_root) if resume else None
        if loaded is not None:
            _check_resume_compatible(config, loaded.state["config"])
        _seed_everything(config.seed)

        docs = data_mod.resolve_corpus(config.corpus, config.max_corpus_bytes)
        train_docs, val_docs = data_mod.split_documents(docs, config.val_fraction)
        if loaded is not None:
            tok = load_tokenizer(loaded.path)
            model = MoEForCausalLM.from_pretrained(loaded.path)
        elif config.init_from is not None:
            from moekit.cli.common import resolve_model_dir

            source = resolve_model_dir(config.init_from)
            model = MoEForCausalLM.from_pretrained(source)
            if config.aux_loss_coef is not None or config.z_loss_coef is not None:
                model.config = model.config.replace(
                    aux_loss_coef=model.config.aux_loss_coef
                    if config.aux_loss_coef is None
                    else config.aux_loss_coef,
                    z_loss_coef=model.config.z_loss_coef
                    if config.z_loss_coef is None
                    else config.z_loss_coef,
                )
            has_tok = (source / "tokenizer.json").is_file() and not config.tokenizer_dir
            tok = (
                load_tokenizer(source)
                if has_tok
                else _prepare_tokenizer(config, train_docs, model.config.vocab_size)
            )
        else:
            vocab_size = build_model_config(config).vocab_size
            tok = _prepare_tokenizer(config, train_docs, vocab_size)
            torch.manual_seed(config.seed)  # model init does not depend on how the tokenizer was obtained
            model = MoEForCausalLM(build_model_config(config))
        if tok.get_vocab_size() > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tok.get_vocab_size()} tokens but the model only {model.config.vocab_size}; "
                "raise model_overrides.vocab_size or use a smaller tokenizer"
            )
        tokens = data_mod.load_token_data(tok, train_docs, val_docs, config.cache_dir, config.val_fraction)
        unigram = data_mod.unigram_loss(tokens.train, tokens.val, tokens.vocab_size)
        total_steps = config.total_steps
        if config.k_schedule is not None:
            _check_k_schedule(config.k_schedule, model)

        if ctx is not None and any(isinstance(m, MoELayer) for m in model.modules()):
            from moekit.parallel import parallelize_experts

            parallelize_experts(model)
        model.gradient_checkpointing = config.gradient_checkpointing
        model.train()
        apply_freeze(model, config.freeze)
        optimizer, param_names = build_optimizer(model, config)
        num_bias_layers = sum(
            1 for m in model.modules() if isinstance(m, MoELayer) and m.config.use_expert_bias
        )
        balancer = None
        if num_bias_layers:
            rate = 1e-3 if config.bias_update_rate is None else config.bias_update_rate
            balancer = ExpertBiasBalancer(model, rate)
            balancer.attach(optimizer)

        # Each rank draws its own windows: a different stream per rank from one seed.
        sampler_seed = config.seed if ctx is None else config.seed + 1_000_003 * ctx.rank
        sampler = data_mod.WindowSampler(tokens.train, config.seq_len, config.batch_size, sampler_seed)
        val_batches = data_mod.eval_batches(tokens.val, config.seq_len, config.batch_size, config.eval_steps)
        step, num_tokens, history = 0, 0, []
        if loaded is not None:
            st = loaded.state
            step, num_tokens = int(st["step"]), int(st["num_tokens"])
            history = list(st.get("history", []))
            opt_tensors = loaded.optimizer_tensors
            if ctx is not None:
                opt_tensors = dist_mod.slice_optimizer_tensors(model, opt_tensors)
            ckpt.restore_optimizer(optimizer, param_names, opt_tensors, st["optimizer"])
            sampler.load_state_dict({**st["sampler"], "generator": loaded.rng_tensors["sampler_generator"]})
            ckpt.restore_rng_state(loaded.rng_tensors, st["rng"])

        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            config.to_json(out_dir / "train_config.json")
        log = (
            _RunLog(out_dir / "train_log.jsonl", step if loaded is not None else None)
            if is_main
            else _NullLog()
        )
        if loaded is None:
            log.write(
                {
                    "event": "start",
                    "step": 0,
                    "unigram_val_loss": unigram,
                    "num_train_tokens": len(tokens.train),
                    "num_val_tokens": len(tokens.val),
                    "num_train_docs": tokens.num_train_docs,
                    "num_val_docs": tokens.num_val_docs,
                    "num_params": sum(p.numel() for p in model.parameters()),
                    "world_size": 1 if ctx is None else ctx.world_size,
                    "num_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "total_steps": total_steps,
                    "model_config": model.config.to_dict(),
                }
            )

        def save(rng_snapshot, sampler_snapshot) -> Path:
            state = {
                "step": step,
                "num_tokens": num_tokens,
                "scheduler": {"type": "warmup_cosine", "step": step, "total_steps": total_steps},
                "sampler": {k: v for k, v in sampler_snapshot.items() if k != "generator"},
                "config": config.to_dict(),
                "history": history,
                "unigram_val_loss": unigram,
                "tokenizer_hash": tokenizer_hash(tok),
            }
            if ctx is None:
                return ckpt.save_checkpoint(
                    ckpt_root,
                    model,
                    tok,
                    optimizer,
                    param_names,
                    state,
                    rng_snapshot,
                    extra_tensors={"sampler_generator": sampler_snapshot["generator"]},
                    keep_previous=config.keep_previous,
                )
            # Every rank gathers (collectives); rank 0 writes the single-device format.
            from moekit.parallel import full_state_dict

            full = full_state_dict(model)
            flat_tensors, flat_meta = ckpt.flatten_optimizer(optimizer, param_names)
            flat_tensors = dist_mod.gather_optimizer_tensors(model, flat_tensors)
            if is_main:
                shadow = MoEForCausalLM(model.config)
                shadow.load_state_dict(full)
                ckpt.save_checkpoint(
                    ckpt_root,
                    shadow,
                    tok,
                    optimizer,
                    param_names,
                    state,
                    rng_snapshot,
                    extra_tensors={"sampler_generator": sampler_snapshot["generator"]},
                    keep_previous=config.keep_previous,
                    optimizer_flat=(flat_tensors, flat_meta),
                )
            torch.distributed.barrier()
            return ckpt_root / ckpt.LAST

        losses: list[tuple[int, float]] = []
        window: list[dict[str, float]] = []
        stop_reason = "max_steps"
        t_loop = time.perf_counter()
        num_tokens_here = 0
        val_loss = float("nan")
        last_saved_step = step if loaded is not None else -1
        bar = _progress_bar(progress and is_main, step, total_steps)
        routing_sums: list[Tensor | None] = []
        entropies: list[float] = []
        try:
            while step < total_steps:
                # The state the step starts from: what a Ctrl-C checkpoint must record.
                rng_snapshot = ckpt.capture_rng_state()
                sampler_snapshot = copy.deepcopy(sampler.state_dict())
                t_step = time.perf_counter()
                moe_k = config.k_schedule.k_at(step, total_steps) if config.k_schedule else None
                lr = lr_at(step, config, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                rec = _train_step(model, optimizer, sampler, config, moe_k, balancer, ctx)
                step += 1
                world = 1 if ctx is None else ctx.world_size
                num_tokens += config.tokens_per_step * world
                num_tokens_here += config.tokens_per_step * world
                dt = time.perf_counter() - t_step
                losses.append((step, rec["loss"]))
                window.append(rec)
                if not routing_sums:
                    routing_sums = [None] * len(rec["_tpe"])
                    entropies = [0.0] * len(rec["_tpe"])
                for i, t in enumerate(rec["_tpe"]):
                    routing_sums[i] = t if routing_sums[i] is None else routing_sums[i] + t
                    entropies[i] += rec["_entropy"][i]
                if step % config.log_interval == 0 or step == total_steps:
                    record = _log_record(step, num_tokens, lr, moe_k, window, dt, config)
                    record.update(_routing_stats(routing_sums, entropies, len(window)))
                    log.write(record)
                    if bar is not None:
                        bal = record["max_over_mean_load"]
                        bar.set_postfix(
                            loss=f"{record['loss']:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}",
                            load=f"{bal:.2f}" if bal is not None else "-",
                        )
                    window, routing_sums, entropies = [], [], []
                if bar is not None:
                    bar.update(1)
                if step % config.eval_interval == 0 or step == total_steps:
                    val_loss = evaluate(model, val_batches, config, moe_k)
                    ev = {
                        "event": "eval",
                        "step": step,
                        "val_loss": val_loss,
                        "val_perplexity": _ppl(val_loss),
                    }
                    ev["unigram_val_loss"] = unigram
                    history.append(ev)
                    log.write(ev)
                out_of_time = (
                    config.time_limit_s is not None and time.perf_counter() - t_start >= config.time_limit_s
                )
                if ctx is not None:  # all ranks must stop at the same step, or collectives hang
                    flag = torch.tensor(float(out_of_time))
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    out_of_time = bool(flag.item())
                if step % config.save_interval == 0 or step == total_steps or out_of_time:
                    if out_of_time and step != total_steps and step % config.eval_interval != 0:
                        val_loss = evaluate(model, val_batches, config, moe_k)
                        ev = {
                            "event": "eval",
                            "step": step,
                            "val_loss": val_loss,
                            "val_perplexity": _ppl(val_loss),
                        }
                        history.append(ev)
                        log.write(ev)
                    save(ckpt.capture_rng_state(), sampler.state_dict())
                    last_saved_step = step
                if out_of_time and step < total_steps:
                    stop_reason = "time_limit"
                    break
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            if step != last_saved_step:
                optimizer.zero_grad(set_to_none=True)
                # The step in flight is dropped: the model and optimizer are still those of `step`.
                save(rng_snapshot, sampler_snapshot)
                print(f"\ninterrupted: saved {ckpt_root / ckpt.LAST} at step {step}", file=sys.stderr)
        finally:
            if bar is not None:
                bar.close()
        elapsed_loop = time.perf_counter() - t_loop
        if math.isnan(val_loss) and history:
            val_loss = float(history[-1]["val_loss"])
        train_loss = losses[-1][1] if losses else float("nan")
        log.write(
            {
                "event": "end",
                "step": step,
                "stop_reason": stop_reason,
                "val_loss": val_loss,
                "val_perplexity": _ppl(val_loss),
                "unigram_val_loss": unigram,
                "elapsed_s": time.perf_counter() - t_start,
            }
        )
        return TrainResult(
            step=step,
            num_tokens=num_tokens,
            train_loss=train_loss,
            val_loss=val_loss,
            val_perplexity=_ppl(val_loss),
            unigram_loss=unigram,
            stop_reason=stop_reason,
            elapsed_s=time.perf_counter() - t_start,
            tokens_per_s=num_tokens_here / max(elapsed_loop, 1e-9),
            out_dir=out_dir,
            checkpoint_dir=ckpt_root / ckpt.LAST,
            log_path=log.path,
            losses=losses,
            history=history,
        )
    finally:
        torch.use_deterministic_algorithms(previous_det)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 80.0)) if not math.isnan(loss) else float("nan")


def _progress_bar(progress: bool, step: int, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)


def _train_step(
    model, optimizer, sampler, config: TrainConfig, moe_k: int | None, balancer, ctx=None
) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
    totals: dict[str, float] = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0}
    aux_parts: dict[str, float] = {}
    tpe: list[Tensor] = []
    entropy: list[float] = []
    for _ in range(config.grad_accum):
        batch = sampler.next_batch()
        with _autocast(config):
            out = model(batch[:, :-1], moe_k=moe_k)
        lm_loss = _lm_loss(out.logits, batch[:, 1:])
        aux = out.aux_loss if out.aux_loss is not None else lm_loss.new_zeros(())
        loss = lm_loss + aux.float()
        (loss / config.grad_accum).backward()
        if balancer is not None:
            balancer.observe(out.routing)
        totals["loss"] += float(loss.detach()) / config.grad_accum
        totals["lm_loss"] += float(lm_loss.detach()) / config.grad_accum
        totals["aux_loss"] += float(aux.detach()) / config.grad_accum
        for name, value in (out.aux_losses or {}).items():
            aux_parts[name] = aux_parts.get(name, 0.0) + float(value.detach()) / config.grad_accum
        for i, info in enumerate(out.routing or []):
            counts = info.tokens_per_expert.detach().float()
            if i < len(tpe):
                tpe[i] = tpe[i] + counts
                entropy[i] += float(info.router_entropy) / config.grad_accum
            else:
                tpe.append(counts)
                entropy.append(float(info.router_entropy) / config.grad_accum)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if ctx is not None:
        from moekit.parallel import distributed as dist_mod

        dist_mod.sync_replicated_grads(model, ctx)
        grad_norm = dist_mod.clip_grad_norm_global(model, params, config.grad_clip, ctx)
    elif config.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=False))
    else:
        grad_norm = float(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**totals, "aux": aux_parts, "grad_norm": grad_norm, "_tpe": tpe, "_entropy": entropy}


def _log_record(step, num_tokens, lr, moe_k, window, dt, config: TrainConfig) -> dict[str, Any]:
    n = len(window)
    aux_names = sorted({k for r in window for k in r["aux"]})
    return {
        "event": "train",
        "step": step,
        "num_tokens": num_tokens,
        "loss": sum(r["loss"] for r in window) / n,
        "lm_loss": sum(r["lm_loss"] for r in window) / n,
        "aux_loss": sum(r["aux_loss"] for r in window) / n,
        "aux_losses": {k: sum(r["aux"].get(k, 0.0) for r in window) / n for k in aux_names},
        "lr": lr,
        "moe_k": moe_k,
        "grad_norm": sum(r["grad_norm"] for r in window) / n,
        "tokens_per_s": config.tokens_per_step / max(dt, 1e-9),
    }


def _check_k_schedule(schedule: KSchedule, model: nn.Module) -> None:
    from moekit.layers import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("k_schedule needs an MoE model; this model has no MoE layer")
    num_e = min(m.config.num_total_experts for m in layers)
    if schedule.k_max > num_e:
        raise ValueError(f"k_schedule.k_max={schedule.k_max} exceeds the experts per layer ({num_e})")


# Fields that define the model or the data: resuming with different values would not continue the run.
_RESUME_FIXED = (
    "preset",
    "init_from",
    "model_overrides",
    "corpus",
    "max_corpus_bytes",
    "val_fraction",
    "tokenizer_dir",
    "freeze",
)


def _check_resume_compatible(config: TrainConfig, saved: dict[str, Any]) -> None:
    now = config.to_dict()
    changed = [f for f in _RESUME_FIXED if f in saved and saved[f] != now[f]]
    if changed:
        detail = ", ".join(f"{f}: {saved[f]!r} -> {now[f]!r}" for f in changed)
        raise ValueError(
            f"cannot resume: {detail} differ from the checkpoint's run; resume with the original values "
            "or train into a new --out folder"
        )


def run_dir_files(out_dir: str | Path) -> dict[str, Path]:
    """The files of a run folder: ``checkpoint``, ``log``, ``config``."""
    out_dir = Path(out_dir)
    return {
        "checkpoint": out_dir / "checkpoints" / ckpt.LAST,
        "log": out_dir / "train_log.jsonl",
        "config": out_dir / "train_config.json",
    }


__all__ = [
    "FREEZE_GROUPS",
    "KSchedule",
    "TrainConfig",
    "TrainResult",
    "apply_freeze",
    "build_model_config",
    "build_optimizer",
    "evaluate",
    "freeze_pattern",
    "lr_at",
    "run_dir_files",
    "select_frozen",
    "train",
]
