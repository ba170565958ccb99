"""The data-module interface the training engine (:func:`moekit.train.fit`) draws batches from.

A data module owns everything about its data: where it comes from, how it is split, how batches are
drawn and the state that makes drawing resumable. The engine only calls the methods below, so any
source (text windows, time series, images) trains through the same loop and resumes bit-exactly.

How to add one: subclass :class:`DataModule`, draw batches from your own ``torch.Generator`` (never
the global RNG, so evaluation and logging cannot shift the data order), and return that generator's
state from :meth:`DataModule.state_dict`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class DataModule(ABC):
    """Training batches, fixed validation batches and a resumable sampling state.

    A batch is whatever the matching objective consumes: a tensor, or a tuple/list/dict of tensors
    (the engine moves every tensor in it to the training device).
    """

    @abstractmethod
    def next_train_batch(self) -> Any:
        """The next training micro-batch (advances the sampling state)."""

    @abstractmethod
    def val_batches(self) -> list[Any]:
        """The fixed validation batches: the same ones on every call, drawn without any RNG."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The sampling state: JSON-able values and top-level ``torch.Tensor`` values (a generator's
        ``get_state()``). After ``load_state_dict(state_dict())`` the next batches are the same."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (tensors come back as tensors)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for the run log's ``start`` record (sizes, sources, baselines)."""
        return {}

    def baselines(self) -> dict[str, float]:
        """Reference losses repeated in every ``eval`` and ``end`` record (e.g. a unigram loss)."""
        return {}

    def save_artifacts(self, folder: Path) -> None:
        """Writes files every checkpoint folder should carry (e.g. the tokenizer); none by default."""
        del folder


class BatchListDataModule(DataModule):
    """Cycles through a fixed list of training batches in order (surgery's short fine-tuning, tests).

    Args:
        train_batches: the batches, drawn ``0, 1, ..., n - 1, 0, ...``.
        val_batches: fixed validation batches (empty: the run is never evaluated).
    """

    def __init__(self, train_batches: Sequence[Any], val_batches: Sequence[Any] = ()) -> None:
        if not train_batches:
            raise ValueError("BatchListDataModule needs at least one training batch")
        self._train = list(train_batches)
        self._val = list(val_batches)
        self.position = 0

    def next_train_batch(self) -> Any:
        """The next batch in cyclic order."""
        batch = self._train[self.position % len(self._train)]
        self.position += 1
        return batch

    def val_batches(self) -> list[Any]:
        """The fixed validation batches."""
        return self._val

    def state_dict(self) -> dict[str, Any]:
        """``{"position"}``: batches drawn so far."""
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.position = int(state["position"])

    def describe(self) -> dict[str, Any]:
        """Batch counts."""
        return {"num_train_batches": len(self._train), "num_val_batches": len(self._val)}
