"""The training engine: one loop for every model family.

``fit(model, objective, data, config, out_dir)`` trains any ``nn.Module`` with any
:class:`~moekit.models.objectives.Objective` on any :class:`~moekit.data.DataModule`. The LM's
``train(TrainConfig)`` is a thin function on top (:mod:`moekit.train.trainer`).

One optimizer step: ``grad_accum`` micro-batches, each ``objective.forward`` (under bf16 autocast
when asked) then ``objective.loss`` divided by ``grad_accum`` and backpropagated; then gradient
clipping, the lr of this step (linear warmup, cosine decay to ``min_lr``), AdamW, and the
expert-bias update (for aux-loss-free routers). Then log, evaluate, save, in that order.

Exact resume. Right after the parameter update the loop takes a *commit*: the RNG states and the
data module's state that the next step starts from. The model, the optimizer, ``step`` and the
commit change together, so whatever is saved (periodic, time limit, Ctrl-C, SIGTERM) is one
consistent unit. Evaluation runs with the RNG states put back afterwards, so it cannot shift the
next step. A resumed run therefore computes the same losses bit for bit as the uninterrupted run
(same machine, same thread count). SIGINT/SIGTERM stop at the end of the step in flight; a second
Ctrl-C (or a KeyboardInterrupt raised anywhere) drops the step in flight and saves the last
finished one, except inside the parameter update itself, where nothing consistent exists to save.

Under torchrun: data parallel over ranks, experts sharded over the same ranks (expert parallel);
rank 0 writes single-device checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.data import DataModule
from moekit.models.objectives import Objective
from moekit.train import checkpoint as ckpt
from moekit.train import step as step_mod
from moekit.train.freeze import apply_freeze, build_optimizer
from moekit.train.loop_config import DTYPES, FitResult, LoopConfig
from moekit.train.runlog import (
    NullLog,
    RunLog,
    StopSignals,
    perplexity,
    progress_bar,
    routing_stats,
    to_device,
)
from moekit.train.schedules import KSchedule, lr_at


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch. Call it before building the model: :func:`fit` does not seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def check_k_schedule(schedule: KSchedule, model: nn.Module) -> None:
    """Raises ``ValueError`` when the model has no MoE layer or fewer experts than ``k_max``."""
    from moekit.layers import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("k_schedule needs an MoE model; this model has no MoE layer")
    num_e = min(m.config.num_total_experts for m in layers)
    if schedule.k_max > num_e:
        raise ValueError(f"k_schedule.k_max={schedule.k_max} exceeds the experts per layer ({num_e})")


@dataclass
class _Commit:
    """The RNG and data state the next step starts from (taken right after each update)."""

    rng: tuple[dict[str, Tensor], dict[str, Any]]
    data: dict[str, Any]


class _NoSignals:
    requested = None


def _take_commit(data: DataModule, device: torch.device) -> _Commit:
    return _Commit(ckpt.capture_rng_state(device), copy.deepcopy(data.state_dict()))


def _split_data_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    # Tensors (generator states) go to rng_state.safetensors as sampler_<key>, the rest to JSON.
    scalars = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    tensors = {f"sampler_{k}": v for k, v in state.items() if torch.is_tensor(v)}
    return scalars, tensors


def _join_data_state(scalars: dict[str, Any], rng_tensors: dict[str, Tensor]) -> dict[str, Any]:
    tensors = {k[len("sampler_") :]: v for k, v in rng_tensors.items() if k.startswith("sampler_")}
    return {**scalars, **tensors}


def fit(
    model: nn.Module,
    objective: Objective,
    data: DataModule,
    config: LoopConfig,
    out_dir: str | Path | None,
    *,
    resume: bool | ckpt.Checkpoint = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    run_config: dict[str, Any] | None = None,
    state_extra: dict[str, Any] | None = None,
    start_extra: dict[str, Any] | None = None,
    dist_context: Any = "auto",
) -> FitResult:
    """Trains ``model`` in place and returns the metrics and paths.

    Args:
        model: any module; built (and seeded, see :func:`seed_everything`) by the caller. A model
            with ``save_pretrained`` is saved with it, others as ``model.safetensors``.
        objective: turns batches into losses.
        data: batches and their resumable state.
        config: the loop settings.
        out_dir: run folder: ``checkpoints/{last,previous}``, ``train_log.jsonl`` and (with
            ``run_config``) ``train_config.json``. None writes nothing (a short in-memory run, as
            surgery's fine-tuning does); Ctrl-C then propagates as ``KeyboardInterrupt``.
        resume: continue from ``out_dir/checkpoints/last`` (or from this already loaded checkpoint):
            model weights, optimizer, step, data state and RNG.
        progress: a tqdm bar.
        device: where to train; None keeps the model's device. Batches are moved there.
        run_config: the caller's whole config (JSON), saved in checkpoints and ``train_config.json``.
        state_extra: more JSON saved in ``trainer_state.json``.
        start_extra: more fields of the ``start`` log record.
        dist_context: a ``moekit.parallel`` context, None for one process, or ``"auto"``
            (join the torchrun group described by the environment).

    Ctrl-C and SIGTERM save a checkpoint consistent with the model and return with
    ``stop_reason="interrupted"``.
    """
    from moekit.layers import ExpertBiasBalancer, MoELayer
    from moekit.parallel import distributed as dist_mod

    t_start = time.perf_counter()
    ctx = dist_mod.init_from_env() if dist_context == "auto" else dist_context
    is_main = ctx is None or ctx.is_main
    world = 1 if ctx is None else ctx.world_size
    writes = out_dir is not None
    out_dir = Path(out_dir) if writes else Path()
    ckpt_root = out_dir / "checkpoints"
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    autocast = _autocast(config.dtype, device)
    total_steps = config.total_steps
    previous_det = torch.are_deterministic_algorithms_enabled()
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        loaded = (
            resume
            if isinstance(resume, ckpt.Checkpoint)
            else (ckpt.load_checkpoint(ckpt_root) if resume else None)
        )
        if loaded is not None:
            ckpt.load_model_weights(model, loaded.path)
        model.to(device)
        if config.k_schedule is not None:
            check_k_schedule(config.k_schedule, model)
        if ctx is not None and any(isinstance(m, MoELayer) for m in model.modules()):
            from moekit.parallel import parallelize_experts

            parallelize_experts(model)
        if hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = config.gradient_checkpointing
        model.train()
        apply_freeze(model, config.freeze)
        optimizer, param_names = build_optimizer(model, config)
        balancer = None
        if config.expert_bias_update and any(
            isinstance(m, MoELayer) and m.config.use_expert_bias for m in model.modules()
        ):
            rate = 1e-3 if config.bias_update_rate is None else config.bias_update_rate
            balancer = ExpertBiasBalancer(model, rate)
            balancer.attach(optimizer)
        val_batches = [to_device(b, device) for b in data.val_batches()]

        step, num_items, history = 0, 0, []
        if loaded is not None:
            st = loaded.state
            step, num_items = int(st["step"]), int(st.get("num_tokens", 0))
            history = list(st.get("history", []))
            opt_tensors = loaded.optimizer_tensors
            if ctx is not None:
                opt_tensors = dist_mod.slice_optimizer_tensors(model, opt_tensors)
            ckpt.restore_optimizer(optimizer, param_names, opt_tensors, st["optimizer"])
            data.load_state_dict(_join_data_state(st["sampler"], loaded.rng_tensors))
            ckpt.restore_rng_state(loaded.rng_tensors, st["rng"])

        def last_eval() -> tuple[float, int | None]:
            if not history:
                return float("nan"), None
            val = history[-1]["val_loss"]
            return (float("nan") if val is None else float(val)), history[-1]["step"]

        if loaded is not None and step >= total_steps:
            # Already finished: nothing to train, nothing to log (no second `end` record).
            val_loss, val_step = last_eval()
            return FitResult(
                step, num_items, float("nan"), val_loss, val_step, "already_finished", 0,
                time.perf_counter() - t_start, float("nan"), out_dir, ckpt_root / ckpt.LAST,
                out_dir / "train_log.jsonl" if is_main else None, [], history,
            )  # fmt: skip

        if is_main and writes:
            out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_tmp(ckpt_root)
            if run_config is not None:
                import json

                text = json.dumps(run_config, indent=2, sort_keys=True)
                (out_dir / "train_config.json").write_text(text + "\n")
        log = (
            RunLog(out_dir / "train_log.jsonl", step if loaded is not None else None)
            if is_main and writes
            else NullLog()
        )
        baselines = data.baselines()
        if loaded is None:
            log.write(
                {
                    "event": "start",
                    "step": 0,
                    **data.describe(),
                    "num_params": sum(p.numel() for p in model.parameters()),
                    "world_size": world,
                    "num_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "total_steps": total_steps,
                    **(start_extra or {}),
                }
            )

        def save(commit: _Commit) -> Path:
            if not writes:
                return ckpt_root / ckpt.LAST
            data_scalars, data_tensors = _split_data_state(commit.data)
            state = {
                "step": step,
                "num_tokens": num_items,
                "scheduler": {"type": "warmup_cosine", "step": step, "total_steps": total_steps},
                "sampler": data_scalars,
                "config": run_config if run_config is not None else config.to_dict(),
                "history": history,
                **(state_extra or {}),
            }
            if ctx is None:
                return ckpt.save_checkpoint(
                    ckpt_root, model, None, optimizer, param_names, state, commit.rng,
                    extra_tensors=data_tensors, keep_previous=config.keep_previous,
                    save_artifacts=data.save_artifacts,
                )  # fmt: skip
            return step_mod.save_distributed(
                model, optimizer, param_names, state, commit, data, data_tensors, config, ckpt_root, is_main
            )

        def evaluate(moe_k: int | None) -> float | None:
            if not val_batches:
                return None  # a data module without validation data is never evaluated
            # The RNG is put back afterwards: evaluating never changes what the next step draws.
            rng = ckpt.capture_rng_state(device)
            try:
                return objective.evaluate(model, val_batches, moe_k, autocast)
            finally:
                ckpt.restore_rng_state(*rng)

        def record_eval(val: float | None) -> None:
            if val is None:
                return
            ev = {
                "event": "eval",
                "step": step,
                "val_loss": val,
                "val_perplexity": perplexity(val),
                **baselines,
            }
            history.append(ev)
            log.write(ev)

        losses: list[tuple[int, float]] = []
        window: list[dict[str, Any]] = []
        stop_reason = "max_steps"
        t_loop = time.perf_counter()
        num_items_here = 0
        last_saved_step = step if loaded is not None else -1
        bar = progress_bar(progress and is_main, step, total_steps)
        routing_sums: list[Tensor | None] = []
        entropies: list[float] = []
        commit = _take_commit(data, device)
        updating = False
        with StopSignals() if writes else contextlib.nullcontext(_NoSignals()) as stop:
            try:
                while step < total_steps:
                    t_step = time.perf_counter()
                    moe_k = config.k_schedule.k_at(step, total_steps) if config.k_schedule else None
                    lr = lr_at(step, config, total_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    rec = step_mod.accumulate_gradients(
                        model, objective, data, config, moe_k, balancer, device, autocast
                    )
                    grad_norm = step_mod.clip_gradients(model, optimizer, config, ctx)
                    # The update and the commit are one unit: an interrupt inside has nothing to save.
                    updating = True
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    num_items += config.items_per_step * world
                    commit = _take_commit(data, device)
                    updating = False
                    num_items_here += config.items_per_step * world
                    rec["grad_norm"] = grad_norm
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
                        record = step_mod.train_record(step, num_items, lr, moe_k, window, dt, config)
                        record.update(routing_stats(routing_sums, entropies, len(window)))
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
                    evaluated = step % config.eval_interval == 0 or step == total_steps
                    if evaluated:
                        record_eval(evaluate(moe_k))
                    out_of_time = (
                        config.time_limit_s is not None
                        and time.perf_counter() - t_start >= config.time_limit_s
                    )
                    stopping = stop.requested is not None
                    if ctx is not None:  # all ranks must stop at the same step, or collectives hang
                        flags = torch.tensor([float(out_of_time), float(stopping)])
                        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                        out_of_time, stopping = bool(flags[0]), bool(flags[1])
                    if step % config.save_interval == 0 or step == total_steps or out_of_time or stopping:
                        if out_of_time and not evaluated and not stopping:
                            record_eval(evaluate(moe_k))
                        save(commit)
                        last_saved_step = step
                    if stopping and step < total_steps:
                        stop_reason = "interrupted"
                        if is_main:
                            print(
                                f"\n{stop.requested or 'stop'}: saved {ckpt_root / ckpt.LAST} at step {step}",
                                file=sys.stderr,
                            )
                        break
                    if out_of_time and step < total_steps:
                        stop_reason = "time_limit"
                        break
            except KeyboardInterrupt:
                if not writes:
                    raise
                stop_reason = "interrupted"
                optimizer.zero_grad(set_to_none=True)
                if updating:
                    kept = (
                        f"{ckpt_root / ckpt.LAST} holds step {last_saved_step}"
                        if last_saved_step >= 0
                        else "no checkpoint was written yet"
                    )
                    print(f"\ninterrupted inside the parameter update: not saved; {kept}", file=sys.stderr)
                elif step != last_saved_step:
                    # The step in flight (if any) is dropped: model, optimizer and commit are `step`.
                    save(commit)
                    last_saved_step = step
                    print(f"\ninterrupted: saved {ckpt_root / ckpt.LAST} at step {step}", file=sys.stderr)
            finally:
                if bar is not None:
                    bar.close()
        elapsed_loop = time.perf_counter() - t_loop
        val_loss, val_step = last_eval()
        train_loss = losses[-1][1] if losses else float("nan")
        end: dict[str, Any] = {"event": "end", "step": step, "stop_reason": stop_reason}
        if val_step is not None:  # the latest evaluation, and when it was (never: no val fields)
            end.update(val_loss=val_loss, val_perplexity=perplexity(val_loss), val_step=val_step)
        log.write({**end, **baselines, "elapsed_s": time.perf_counter() - t_start})
        return FitResult(
            step=step,
            num_items=num_items,
            train_loss=train_loss,
            val_loss=val_loss,
            val_step=val_step,
            stop_reason=stop_reason,
            num_steps_run=len(losses),
            elapsed_s=time.perf_counter() - t_start,
            items_per_s=num_items_here / max(elapsed_loop, 1e-9) if losses else float("nan"),
            out_dir=out_dir,
            checkpoint_dir=ckpt_root / ckpt.LAST,
            log_path=log.path,
            losses=losses,
            history=history,
        )
    finally:
        torch.use_deterministic_algorithms(previous_det)


__all__ = ["DTYPES", "FitResult", "LoopConfig", "check_k_schedule", "fit", "seed_everything"]
