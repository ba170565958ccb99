"""Forecast metrics as the forecasting benchmarks report them (numpy only, float64).

Shape legend: ``N`` series, ``H`` horizon steps, ``S`` sample paths, ``Q`` quantile levels.
Every function takes whole batches: ``y`` (N, H) actuals, ``y_hat`` (N, H) point forecasts,
``samples`` (N, S, H), ``q_hat`` (N, Q, H) with ``levels`` (Q,) in (0, 1). Per-series results
are (N,) arrays; a value that is undefined (a zero scale) is NaN, never an exception.

Definitions (``rho_tau(u) = max(tau * u, (tau - 1) * u)`` is the pinball loss):
- MASE: ``mean_t |y - y_hat| / mean_t |x_t - x_{t-m}|`` with the in-sample seasonal-naive scale
  over the training values ``x`` (Hyndman & Koehler), NaN when that scale is 0;
- sMAPE: ``200 / H * sum_t |y - y_hat| / (|y| + |y_hat|)`` in percent (0..200, M4's), 0/0 := 0;
- CRPS from samples: the exact CRPS of the empirical distribution,
  ``E|X - y| - E|X - X'| / 2``, averaged over H;
- CRPS from quantiles: ``mean_{q,t} 2 rho_q(y - q_hat)`` (the quantile-loss approximation);
- WQL: ``sum_{q,t} 2 rho_q(y - q_hat) / (Q * sum_t |y|)`` per series, or with sums over all
  series for the dataset-level number (gluonts' mean weighted quantile loss);
- :func:`relative_geomean`: the geometric mean over series of ``MASE_model / MASE_baseline``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _pair(y: np.ndarray, y_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, y_hat = np.atleast_2d(np.asarray(y, np.float64)), np.atleast_2d(np.asarray(y_hat, np.float64))
    if y.shape != y_hat.shape:
        raise ValueError(f"actuals have shape {y.shape} but forecasts {y_hat.shape}; expected both (N, H)")
    return y, y_hat


def seasonal_scale(insample: np.ndarray, season_length: int = 1) -> float:
    """``mean_t |x_t - x_{t-m}|`` over a training series ``insample`` (T,); needs ``T > m``."""
    x = np.asarray(insample, np.float64)
    m = int(season_length)
    if m < 1:
        raise ValueError(f"season_length={m} must be at least 1")
    if x.shape[0] <= m:
        raise ValueError(
            f"MASE with season_length={m} needs more than {m} in-sample values, got {x.shape[0]}"
        )
    return float(np.mean(np.abs(x[m:] - x[:-m])))


def mase(
    y: np.ndarray, y_hat: np.ndarray, insample: Sequence[np.ndarray], season_length: int | Sequence[int] = 1
) -> np.ndarray:
    """MASE per series (N,); ``insample`` is N training arrays (T_i,), ``season_length`` one or N ints."""
    y, y_hat = _pair(y, y_hat)
    if len(insample) != y.shape[0]:
        raise ValueError(f"{len(insample)} in-sample series for {y.shape[0]} forecasts")
    ms = [int(season_length)] * y.shape[0] if np.isscalar(season_length) else list(season_length)
    scales = np.array([seasonal_scale(x, m) for x, m in zip(insample, ms)])
    mae = np.mean(np.abs(y - y_hat), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scales > 0, mae / scales, np.nan)


def smape(y: np.ndarray, y_hat: np.ndarray) -> np.ndarray:
    """sMAPE per series (N,), in percent (0..200); a step with ``y = y_hat = 0`` counts as 0."""
    y, y_hat = _pair(y, y_hat)
    denom = np.abs(y) + np.abs(y_hat)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(denom > 0, np.abs(y - y_hat) / denom, 0.0)
    return 200.0 * ratio.mean(axis=-1)


def crps_from_samples(y: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Exact CRPS of the empirical distribution of ``samples`` (N, S, H) at ``y`` (N, H): (N,).

    ``E|X - y| - E|X - X'| / 2`` with the pair term from sorted samples in O(S log S):
    ``sum_{i,j} |x_i - x_j| = 2 sum_i (2i - S + 1) x_(i)`` (0-based ranks).
    """
    y = np.atleast_2d(np.asarray(y, np.float64))
    x = np.asarray(samples, np.float64)
    if x.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[1]:
        raise ValueError(f"samples have shape {x.shape}; expected (N, S, H) with (N, H) = {y.shape}")
    s = x.shape[1]
    spread = np.abs(x - y[:, None, :]).mean(axis=1)
    ranks = (2 * np.arange(s) - s + 1).astype(np.float64)[None, :, None]
    pair_half = (np.sort(x, axis=1) * ranks).sum(axis=1) / (s * s)
    return (spread - pair_half).mean(axis=-1)


def _quantile_args(
    y: np.ndarray, q_hat: np.ndarray, levels: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.atleast_2d(np.asarray(y, np.float64))
    q = np.asarray(q_hat, np.float64)
    lv = np.asarray(levels, np.float64)
    if q.ndim != 3 or q.shape[0] != y.shape[0] or q.shape[2] != y.shape[1] or q.shape[1] != lv.shape[0]:
        raise ValueError(
            f"quantiles have shape {q.shape}; expected (N, Q, H) with (N, H) = {y.shape}, Q = {lv.shape[0]}"
        )
    if lv.size == 0 or np.any((lv <= 0) | (lv >= 1)):
        raise ValueError(f"quantile levels {lv.tolist()} must be non-empty and lie strictly between 0 and 1")
    return y, q, lv


def pinball(y: np.ndarray, q_hat: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Elementwise pinball loss ``rho_tau(y - q_hat)``: (N, Q, H) for ``q_hat`` (N, Q, H)."""
    y, q, lv = _quantile_args(y, q_hat, levels)
    u = y[:, None, :] - q
    tau = lv[None, :, None]
    return np.maximum(tau * u, (tau - 1.0) * u)


def crps_from_quantiles(y: np.ndarray, q_hat: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """CRPS approximated by quantile losses: ``mean_{q,t} 2 rho_q`` per series (N,)."""
    return 2.0 * pinball(y, q_hat, levels).mean(axis=(1, 2))


def wql(
    y: np.ndarray, q_hat: np.ndarray, levels: Sequence[float], per_series: bool = True
) -> np.ndarray | float:
    """Weighted quantile loss: (N,) per series, or one float over all series (``per_series=False``).

    NaN where ``sum |y|`` is 0.
    """
    loss = 2.0 * pinball(y, q_hat, levels)
    y = np.atleast_2d(np.asarray(y, np.float64))
    nq = loss.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if per_series:
            denom = nq * np.abs(y).sum(axis=-1)
            return np.where(denom > 0, loss.sum(axis=(1, 2)) / denom, np.nan)
        denom = nq * np.abs(y).sum()
        return float(loss.sum() / denom) if denom > 0 else float("nan")


def relative_geomean(scores: Mapping[str, np.ndarray], baseline: str = "SeasonalNaive") -> dict[str, float]:
    """Geometric mean over series of ``score_model / score_baseline`` for each model (baseline -> 1).

    ``scores`` maps a model name to its per-series scores (N,) in the same series order. Only
    series where every model's ratio is finite and positive enter (the same set for all models).
    """
    if baseline not in scores:
        raise ValueError(f"baseline {baseline!r} is not among the models {list(scores)}")
    base = np.asarray(scores[baseline], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = {name: np.asarray(v, np.float64) / base for name, v in scores.items()}
    keep = np.ones(base.shape, dtype=bool)
    for r in ratios.values():
        keep &= np.isfinite(r) & (r > 0)
    if not keep.any():
        return {name: float("nan") for name in scores}
    return {name: float(np.exp(np.mean(np.log(r[keep])))) for name, r in ratios.items()}
