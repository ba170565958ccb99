"""The forecaster object: any forecast-family model behind one ``predict_df`` call.

Shape legend: N = series, H = horizon, Q = quantile levels, R = pooled residuals of one series.

:class:`Forecaster` wraps a model with ``forecast(histories, horizon) -> [N, H]`` (raw units; the
model normalises and inverse-transforms itself). It returns the long frame ``unique_id, ds,
mean, q<level>...`` of :mod:`moekit.timeseries.frame`, with ``ds`` continuing each input's own
grid, and it is the callable :func:`moekit.timeseries.rolling_origin_evaluation` takes.

Quantiles. A model with ``forecast_samples`` (a probabilistic family) gives them from sample
paths. Time-MoE is a point forecaster, so its quantiles are *residual-based intervals*: the model
forecasts its own history from up to ``num_backtests`` earlier origins, the errors at step ``j``
are divided by ``sqrt(j)`` and pooled per series, and quantile ``q`` at step ``j`` is
``mean_j + sqrt(j) * quantile_q(pooled)``. A history too short for any backtest uses its one-step
differences instead (a random-walk band). These bands are calibrated only as far as the
backtest errors resemble the future ones; they cost ``num_backtests`` extra forecasts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from moekit.timeseries import ForecastFrame, Series, forecast_frame, frame_from_samples, read_long

MIN_BACKTEST_HISTORY = 8


def _as_series(data: Any) -> tuple[list[Series], bool]:
    """``(series, came_from_pandas)`` from a DataFrame (long format), a Series or a list of them."""
    if isinstance(data, Series):
        return [data], False
    if hasattr(data, "columns") and hasattr(data, "to_dict"):
        return read_long(data), True
    series = list(data)
    if not series or not all(isinstance(s, Series) for s in series):
        raise ValueError(
            "predict_df takes a long-format DataFrame (unique_id, ds, y), a Series or a list of Series"
        )
    return series, False


def check_quantiles(quantiles: Sequence[float]) -> tuple[float, ...]:
    """The levels as floats; ``ValueError`` unless each lies strictly between 0 and 1, once."""
    levels = tuple(float(q) for q in quantiles)
    bad = [q for q in levels if not 0.0 < q < 1.0]
    if bad:
        raise ValueError(f"quantile levels {bad} must lie strictly between 0 and 1 (e.g. 0.1,0.5,0.9)")
    if len(set(levels)) != len(levels):
        raise ValueError(f"quantile levels {list(levels)} contain a duplicate")
    return levels


class Forecaster:
    """Forecasts with a forecast-family model (see the module doc).

    Args:
        model: a model with ``forecast(histories, horizon)`` (and optionally ``forecast_samples``).
        name: the model name in evaluation tables.
        num_backtests: backtest origins for residual-based quantiles of a point model.
        num_samples: sample paths for a probabilistic model.
    """

    def __init__(self, model: nn.Module, name: str = "model", num_backtests: int = 3, num_samples: int = 100):
        if not hasattr(model, "forecast"):
            raise ValueError(f"{type(model).__name__} is not a forecaster (no forecast method)")
        self.model = model
        self.name = name
        self.num_backtests = int(num_backtests)
        self.num_samples = int(num_samples)

    def predict(
        self, series: Sequence[Series], horizon: int, quantiles: Sequence[float] = ()
    ) -> ForecastFrame:
        """The forecast frame of ``series`` (N histories) for ``horizon`` steps."""
        if int(horizon) < 1:
            raise ValueError(f"horizon={horizon} must be at least 1")
        series = list(series)
        levels = check_quantiles(quantiles)
        histories = [s.values for s in series]
        if hasattr(self.model, "forecast_samples"):
            samples = self.model.forecast_samples(histories, horizon, self.num_samples)
            return frame_from_samples(series, samples, levels)
        mean = self.model.forecast(histories, horizon)
        if not levels:
            return forecast_frame(series, mean)
        q = self._residual_quantiles(histories, mean, levels)
        return forecast_frame(series, mean, q, levels)

    __call__ = predict  # the forecaster signature rolling_origin_evaluation calls

    def predict_df(self, data: Any, horizon: int, quantiles: Sequence[float] = ()) -> Any:
        """Forecasts a long-format DataFrame (``unique_id, ds, y``: returns a pandas DataFrame), or
        a :class:`~moekit.timeseries.Series` / list of them (returns a :class:`ForecastFrame`).

        Columns: ``unique_id, ds, mean`` and one ``q<level>`` per quantile (the CLI's CSV).
        """
        series, from_pandas = _as_series(data)
        frame = self.predict(series, horizon, quantiles)
        return frame.to_pandas() if from_pandas else frame

    def _residual_quantiles(
        self, histories: list[np.ndarray], mean_NH: np.ndarray, levels: tuple[float, ...]
    ) -> np.ndarray:
        """``[N, Q, H]`` residual-based quantiles (see the module doc); one batched forecast per origin."""
        num_n, horizon = mean_NH.shape
        steps_H = np.sqrt(np.arange(1, horizon + 1, dtype=np.float64))
        pooled: list[list[np.ndarray]] = [[] for _ in range(num_n)]
        for k in range(1, self.num_backtests + 1):
            cuts = [h.shape[0] - k * horizon for h in histories]
            rows = [i for i, c in enumerate(cuts) if c >= MIN_BACKTEST_HISTORY]
            if not rows:
                break
            pred = self.model.forecast([histories[i][: cuts[i]] for i in rows], horizon)
            for r, i in enumerate(rows):
                actual = histories[i][cuts[i] : cuts[i] + horizon]
                pooled[i].append((actual - pred[r]) / steps_H)
        out = np.empty((num_n, len(levels), horizon))
        for i, parts in enumerate(pooled):
            if parts:
                resid_R = np.concatenate(parts)
            elif histories[i].shape[0] > 1:
                resid_R = np.diff(histories[i])  # random-walk one-step errors
            else:
                resid_R = np.zeros(1)
            out[i] = mean_NH[i][None, :] + np.quantile(resid_R, levels)[:, None] * steps_H[None, :]
        return out
