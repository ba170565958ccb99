"""Training and forecasting for Moirai-MoE: the objective, the data module, the forecaster.

Shape legend: B = windows, L = values per window (``context_patches * P``), N = series,
S = sample paths, H = horizon, Q = quantile levels.

- :class:`MoiraiObjective`: next-patch mixture NLL plus the weighted MoE aux losses.
- :class:`MoiraiDataModule`: random windows of whole series, each normalised by its own observed
  values (:func:`moekit.timeseries.fit_scale`), drawn from a ``torch.Generator`` whose state is
  the module's state (exact resume through :func:`moekit.train.fit`). Validation windows are
  fixed, cut from held-out series.
- :func:`builtin_series`: statsmodels' pretraining series plus seeded synthetic ones, with a
  held-out slice of the synthetic series for validation.
- :class:`MoiraiForecaster`: ``predict_df(df_or_series, horizon, quantiles, num_samples)`` returns
  the long frame ``unique_id, ds, mean, q0.1, ...`` (sample mean and empirical quantiles of the
  de-normalised sample paths); calling it is the ``(histories, horizon, quantiles) -> frame``
  forecaster that :func:`moekit.timeseries.rolling_origin_evaluation` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.data import DataModule
from moekit.models.moirai import MoiraiMoEModel, MoiraiOutput
from moekit.models.objectives import LossWeights, Objective, ObjectiveOutput
from moekit.timeseries import (
    ForecastFrame,
    Series,
    SyntheticConfig,
    fit_scale,
    frame_from_samples,
    generate_synthetic,
    load_builtin,
    read_long,
    read_series,
)


class MoiraiObjective(Objective):
    """Mixture NLL of the next patch plus weighted aux losses, for ``{"values", "observed"}`` batches.

    Logged metrics: ``nll`` and ``aux_loss``. Moirai-MoE trains with no balance loss (its
    centroid router has no gradient to balance); a learned router may want ``load_balance``.

    Args:
        weights: aux-loss coefficients (default: none).
    """

    def __init__(self, weights: LossWeights | None = None) -> None:
        self.weights = weights or LossWeights()

    @classmethod
    def for_config(cls, config: Any, **overrides: float | None) -> MoiraiObjective:
        """The objective a :class:`~moekit.models.moirai.MoiraiMoEConfig` recommends (its aux coefficients)."""
        return cls(LossWeights.from_model_config(config, **overrides))

    def forward(self, model: nn.Module, batch: dict[str, Tensor], moe_k: int | None = None) -> MoiraiOutput:
        """``model(batch["values"], batch["observed"], moe_k)``."""
        return model(batch["values"], batch["observed"], moe_k=moe_k)

    def loss(self, output: MoiraiOutput, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """``nll + weighted aux``."""
        nll, _ = output.nll()
        aux_losses = output.aux_losses or {}
        aux = self.weights.weighted(aux_losses, nll)
        return ObjectiveOutput(
            loss=nll + aux,
            metrics={"nll": nll, "aux_loss": aux},
            aux_losses=aux_losses,
            routing=list(output.routing),
        )

    def eval_loss(self, output: MoiraiOutput, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Mean NLL and the number of scored values."""
        nll, count = output.nll()
        return nll, int(count)


def _as_arrays(series: Sequence[Series | np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, s in enumerate(series):
        values = np.asarray(s.values if isinstance(s, Series) else s, dtype=np.float64)
        if values.ndim != 1 or values.shape[0] < 2:
            name = s.unique_id if isinstance(s, Series) else f"#{i}"
            raise ValueError(
                f"series {name}: needs at least 2 values for next-patch training, got {values.shape}"
            )
        out.append(values)
    return out


def make_window_batch(
    arrays: Sequence[np.ndarray], ends: Sequence[int], length: int, scale_method: str = "std"
) -> dict[str, Tensor]:
    """Cuts ``arrays[i][end_i - length : end_i]`` (left-padded when short), each normalised by
    its own observed values: ``{"values": float32 [B, L], "observed": bool [B, L]}``."""
    values = np.zeros((len(arrays), length))
    observed = np.zeros((len(arrays), length), dtype=bool)
    for row, (x, end) in enumerate(zip(arrays, ends)):
        piece = x[max(0, end - length) : end]
        values[row, length - piece.shape[0] :] = piece
        observed[row, length - piece.shape[0] :] = True
    scale = fit_scale(values, scale_method, observed)
    normed = np.where(observed, scale.apply(values), 0.0)
    return {
        "values": torch.from_numpy(normed.astype(np.float32)),
        "observed": torch.from_numpy(observed),
    }


class MoiraiDataModule(DataModule):
    """Random windows of ``context_patches * patch_size`` values from whole series.

    Each training batch draws ``batch_size`` series (probability proportional to length) and a
    window end uniformly in ``[min(2P, T), T]`` for each, from this module's ``torch.Generator``.
    Validation: ``num_val_batches`` fixed batches cut at evenly spaced ends of ``val_series``.

    Args:
        series: training series (:class:`~moekit.timeseries.Series` or 1-D arrays, T >= 2).
        val_series: held-out series for validation (none: the run is never evaluated).
        patch_size, context_patches: window length ``L = context_patches * patch_size``.
        batch_size: windows per batch.
        num_val_batches: validation batches.
        scale_method: per-window normalisation (``"std"`` or ``"robust"``).
        seed: seeds the generator.
    """

    def __init__(
        self,
        series: Sequence[Series | np.ndarray],
        val_series: Sequence[Series | np.ndarray] = (),
        *,
        patch_size: int = 16,
        context_patches: int = 32,
        batch_size: int = 32,
        num_val_batches: int = 4,
        scale_method: str = "std",
        seed: int = 0,
    ) -> None:
        if not series:
            raise ValueError("MoiraiDataModule needs at least one training series")
        if batch_size < 1 or patch_size < 1 or context_patches < 2:
            raise ValueError(
                f"MoiraiDataModule: batch_size={batch_size}, patch_size={patch_size} must be >= 1 and "
                f"context_patches={context_patches} >= 2 (one input and one target patch)"
            )
        self.train = _as_arrays(series)
        self.val = _as_arrays(val_series)
        self.patch_size, self.length = patch_size, context_patches * patch_size
        self.batch_size, self.scale_method = batch_size, scale_method
        self.num_val_batches = num_val_batches if self.val else 0
        self.generator = torch.Generator().manual_seed(int(seed))
        self.num_batches = 0
        lengths = torch.tensor([x.shape[0] for x in self.train], dtype=torch.float64)
        self._weights = lengths / lengths.sum()
        self._val = self._make_val()

    @classmethod
    def builtin(cls, num_synthetic: int = 256, val_fraction: float = 0.1, seed: int = 0, **kwargs: Any):
        """The data module over :func:`builtin_series` (kwargs go to ``__init__``)."""
        train, val = builtin_series(num_synthetic, val_fraction, seed)
        return cls(train, val, seed=seed, **kwargs)

    @classmethod
    def for_model(
        cls, config: Any, model_config: Any, series: Sequence[Series] | None = None
    ) -> MoiraiDataModule:
        """The data module ``moekit ts-train`` uses: the training series a
        :class:`~moekit.models.timemoe_train.SeriesDataConfig` describes (or ``series``), its
        synthetic validation series, and windows of the model's ``context_length``."""
        from moekit.models.timemoe_train import training_series, validation_series

        train = training_series(config, None if series is None else list(series))
        val = validation_series(config)
        return cls(
            train,
            val,
            patch_size=model_config.patch_size,
            context_patches=model_config.max_patches,
            batch_size=config.batch_size,
            num_val_batches=max(1, -(-len(val) // config.batch_size)),
            scale_method=model_config.scale_method,
            seed=config.seed,
        )

    def _make_val(self) -> list[dict[str, Tensor]]:
        batches = []
        if not self.val:
            return batches
        num = self.num_val_batches * self.batch_size
        picks = [i % len(self.val) for i in range(num)]
        rounds = [i // len(self.val) for i in range(num)]
        total_rounds = max(rounds) + 1
        ends = []
        for i, r in zip(picks, rounds):
            t = self.val[i].shape[0]
            lo = min(2 * self.patch_size, t)
            ends.append(int(round(lo + (t - lo) * (r + 1) / total_rounds)))
        for b in range(self.num_val_batches):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            arrays = [self.val[i] for i in picks[sl]]
            batches.append(make_window_batch(arrays, ends[sl], self.length, self.scale_method))
        return batches

    def next_train_batch(self) -> dict[str, Tensor]:
        """The next random batch (advances the generator)."""
        idx = torch.multinomial(self._weights, self.batch_size, replacement=True, generator=self.generator)
        u = torch.rand(self.batch_size, generator=self.generator, dtype=torch.float64)
        arrays, ends = [], []
        for i, ui in zip(idx.tolist(), u.tolist()):
            t = self.train[i].shape[0]
            lo = min(2 * self.patch_size, t)
            arrays.append(self.train[i])
            ends.append(lo + int(ui * (t - lo + 1)) if t > lo else t)
        self.num_batches += 1
        return make_window_batch(
            arrays, [min(e, a.shape[0]) for e, a in zip(ends, arrays)], self.length, self.scale_method
        )

    def val_batches(self) -> list[dict[str, Tensor]]:
        """The fixed validation batches."""
        return self._val

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": its state, "num_batches"}``."""
        return {"generator": self.generator.get_state(), "num_batches": self.num_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
        self.num_batches = int(state["num_batches"])

    def describe(self) -> dict[str, Any]:
        """Sizes for the run log."""
        return {
            "num_train_series": len(self.train),
            "num_val_series": len(self.val),
            "window_length": self.length,
            "batch_size": self.batch_size,
        }


def builtin_series(
    num_synthetic: int = 256, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Series], list[Series]]:
    """``(train, val)``: statsmodels' pretraining series (:data:`moekit.timeseries.PRETRAIN`) and
    the synthetic series except the last ``val_fraction`` of them, which are the validation set.
    The zero-shot hold-out (:data:`moekit.timeseries.HOLDOUT`) is in neither."""
    synthetic = generate_synthetic(SyntheticConfig(num_series=num_synthetic, seed=seed)).series
    num_val = max(1, int(round(val_fraction * num_synthetic))) if val_fraction > 0 else 0
    real = load_builtin("pretrain")
    return real + synthetic[: num_synthetic - num_val], synthetic[num_synthetic - num_val :]


def _to_series(data: Any) -> list[Series]:
    if isinstance(data, Series):
        return [data]
    if isinstance(data, (str, Path)):
        return read_series(data)
    if hasattr(data, "columns") and hasattr(data, "to_dict"):
        return read_long(data)
    series = list(data)
    if not all(isinstance(s, Series) for s in series):
        raise ValueError(
            "predict_df takes a long-format DataFrame, a file path, a Series or a list of Series"
        )
    return series


class MoiraiForecaster:
    """Probabilistic forecasts from a :class:`MoiraiMoEModel` (sample paths, then quantiles).

    Args:
        model: the trained model (put in eval mode here).
        num_samples: default sample paths per series.
        seed: seeds the sampling (the same call gives the same frame).
        device: where to run (default: the model's).
    """

    def __init__(
        self, model: MoiraiMoEModel, num_samples: int = 100, seed: int = 0, device: Any = None
    ) -> None:
        self.model = model.eval()
        self.num_samples, self.seed = num_samples, seed
        if device is not None:
            self.model.to(device)
        self.device = next(model.parameters()).device

    def sample(self, series: Sequence[Series], horizon: int, num_samples: int | None = None) -> np.ndarray:
        """Sample paths ``(N, S, H)`` in the series' own units (:meth:`MoiraiMoEModel.forecast_samples`)."""
        num_s = self.num_samples if num_samples is None else int(num_samples)
        for s in series:
            if len(s) < 1:
                raise ValueError(f"series {s.unique_id!r} is empty; it needs at least one value")
        return self.model.forecast_samples([s.values for s in series], horizon, num_s, self.seed)

    def predict_df(
        self,
        df_or_series: Any,
        horizon: int,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        num_samples: int = 100,
        model_name: str | None = None,
    ) -> ForecastFrame:
        """The long forecast frame ``unique_id, ds, mean, q<level>...`` for every input series.

        ``df_or_series``: a long-format DataFrame (``unique_id, ds, y``), a file path (long, wide
        or JSONL), a :class:`~moekit.timeseries.Series` or a list of them. ``ds`` continues each
        series' own frequency (integer steps where there are no timestamps).
        """
        if horizon < 1:
            raise ValueError(f"horizon={horizon} must be at least 1")
        series = _to_series(df_or_series)
        samples = self.sample(series, horizon, num_samples)
        return frame_from_samples(series, samples, tuple(quantiles), model_name)

    def __call__(self, histories: list[Series], horizon: int, quantiles: tuple[float, ...]) -> ForecastFrame:
        """The forecaster protocol of :func:`moekit.timeseries.rolling_origin_evaluation`."""
        return self.predict_df(histories, horizon, quantiles, self.num_samples)


__all__ = [
    "MoiraiDataModule",
    "MoiraiForecaster",
    "MoiraiObjective",
    "builtin_series",
    "make_window_batch",
]
