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
