"""The run log (``train_log.jsonl``), the progress bar, stop signals and the loop's small helpers."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class NullLog:
    """The run log of a non-zero rank: writes nothing."""

    path = None

    def write(self, record: dict[str, Any]) -> None:
        """Discards ``record``."""


class RunLog:
    """Appends JSON records to ``train_log.jsonl`` (flushed per record, so a crash loses nothing).

    Args:
        path: the log file.
        keep_until_step: None starts a new log; a step keeps the records up to it (a resumed run
            drops what an interrupted run wrote after its last checkpoint, and any torn last line).
    """

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            kept = []
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, AttributeError):
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record (NaN becomes null, so every line is strict JSON).

        Raises:
            CheckpointWriteError: the disk is full; the last checkpoint is untouched.
        """
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(_finite(record)) + "\n")
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            from moekit.train.checkpoint import CheckpointWriteError

            raise CheckpointWriteError(
                e.errno,
                f"no space left on the device of {self.path} while writing the run log; the last "
                "checkpoint is intact. Free some space and continue with --resume",
            ) from e


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def progress_bar(enabled: bool, step: int, total: int):
    """A tqdm bar from ``step`` to ``total``, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)


def perplexity(loss: float) -> float:
    """``exp(loss)`` (capped), NaN for NaN."""
    return math.exp(min(loss, 80.0)) if not math.isnan(loss) else float("nan")


def routing_stats(
    routing_sums: list[Tensor | None], entropies: list[float], num_micro: int
) -> dict[str, Any]:
    """Per MoE layer: tokens per expert, mean router entropy and the mean max/mean load."""
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


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves every tensor in a (nested tuple/list/dict) batch to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop at the end of the current step (``requested``).

    The loop then saves the step it finished, so the checkpoint, the RNG and the data state are
    one unit. A second SIGINT raises ``KeyboardInterrupt`` at once (the step in flight is dropped
    and the last finished step is saved). Handlers are installed only in the main thread and
    restored on exit.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
