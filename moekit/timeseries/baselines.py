"""Baselines forecasters actually use (statsforecast), and rolling-origin evaluation against them.

statsforecast is an optional dependency (``pip install 'moekit[ts]'``), imported only when a
baseline runs. Baselines are fitted on integer positions (``freq=1``) and the forecast ``ds`` is
continued by moekit from each series' own index, so the output lies on the input's grid.

A *forecaster* is any callable ``f(histories: list[Series], horizon: int, quantiles: tuple) ->
ForecastFrame`` (one model, or several with a ``model`` column); the MoE forecasters will be
wrapped the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moekit.timeseries import metrics
from moekit.timeseries.data import Series
from moekit.timeseries.frame import ForecastFrame, Table, concat_frames, forecast_frame
from moekit.timeseries.freq import season_length_for

BASELINE_MODELS = ("AutoETS", "AutoARIMA", "SeasonalNaive", "Naive")
DEFAULT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Forecaster = Callable[[list[Series], int, tuple[float, ...]], ForecastFrame]


def _season_lengths(series: Sequence[Series], season_length: int | None) -> list[int]:
    if season_length is not None:
        if int(season_length) < 1:
            raise ValueError(f"season_length={season_length} must be at least 1")
        return [int(season_length)] * len(series)
    return [season_length_for(s.freq) for s in series]


def _level(q: float) -> int | float:
    lv = round(100.0 * abs(2.0 * q - 1.0), 10)
    return int(lv) if lv == int(lv) else lv


def baseline_forecasts(
    series: Sequence[Series],
    horizon: int,
    season_length: int | None = None,
    models: Sequence[str] = BASELINE_MODELS,
    quantiles: Sequence[float] = (),
) -> ForecastFrame:
    """Forecasts of statsforecast's baselines: a frame ``unique_id, ds, model, mean, q...``.

    ``season_length`` applies to every series; ``None`` takes each series' default from its
    frequency (:func:`moekit.timeseries.freq.season_length_for`). Quantile ``q`` comes from the
    model's central prediction interval of level ``100 |2q - 1|``; ``q = 0.5`` is the point
    forecast (the intervals are symmetric). Rows are in the input's series order.
    """
    unknown = [m for m in models if m not in BASELINE_MODELS]
    if unknown or not models:
        raise ValueError(f"unknown baseline model(s) {unknown}; choose from {list(BASELINE_MODELS)}")
    if horizon < 1:
        raise ValueError(f"horizon={horizon} must be at least 1")
    ids = [s.unique_id for s in series]
    if len(set(ids)) != len(ids):
        raise ValueError("series unique_id values must be distinct for the baselines")
    try:
        import pandas as pd
        from statsforecast import StatsForecast
        from statsforecast import models as sf_models
    except ImportError:
        raise ValueError("the baselines need statsforecast: pip install 'moekit[ts]'") from None
    quantiles = tuple(float(q) for q in quantiles)
    levels = sorted({_level(q) for q in quantiles if q != 0.5})
    seasons = _season_lengths(series, season_length)
    for s, m in zip(series, seasons):
        if len(s) < max(2, m + 1):
            raise ValueError(
                f"series {s.unique_id!r} has {len(s)} values; the baselines need at least {max(2, m + 1)}"
            )
    means: dict[str, dict[str, np.ndarray]] = {m: {} for m in models}
    qs: dict[str, dict[str, np.ndarray]] = {m: {} for m in models}
    for m in sorted(set(seasons)):
        group = [s for s, sm in zip(series, seasons) if sm == m]
        df = pd.DataFrame(
            {
                "unique_id": np.concatenate([np.full(len(s), s.unique_id, dtype=object) for s in group]),
                "ds": np.concatenate([np.arange(len(s)) for s in group]),
                "y": np.concatenate([s.values for s in group]),
            }
        )
        built = {
            "AutoETS": lambda m=m: sf_models.AutoETS(season_length=m),
            "AutoARIMA": lambda m=m: sf_models.AutoARIMA(season_length=m),
            "SeasonalNaive": lambda m=m: sf_models.SeasonalNaive(season_length=m),
            "Naive": lambda: sf_models.Naive(),
        }

        def run(frame, names, built=built):
            sf = StatsForecast(models=[built[name]() for name in names], freq=1, n_jobs=1)
            return (
                sf.forecast(df=frame, h=horizon, level=levels) if levels else sf.forecast(df=frame, h=horizon)
            )

        try:
            out = run(df, models)
        except Exception as err:  # statsforecast raises assorted types; name the series and model
            raise _name_failure(run, df, models, err) from None
        out_ids = out["unique_id"].astype(str).to_numpy()
        for s in group:
            rows = out_ids == s.unique_id
            for name in models:
                point = out[name].to_numpy(np.float64)[rows]
                means[name][s.unique_id] = point
                cols = []
                for q in quantiles:
                    if q == 0.5:
                        cols.append(point)
                    else:
                        side = "lo" if q < 0.5 else "hi"
                        cols.append(out[f"{name}-{side}-{_level(q)}"].to_numpy(np.float64)[rows])
                qs[name][s.unique_id] = np.stack(cols) if cols else np.zeros((0, horizon))
    frames = {}
    for name in models:
        mean = np.stack([means[name][u] for u in ids])
        q = np.stack([qs[name][u] for u in ids]) if quantiles else None
        frames[name] = forecast_frame(series, mean, q, quantiles)
    return concat_frames(frames)


def _name_failure(run: Callable, df: object, models: Sequence[str], err: Exception) -> ValueError:
    """Finds the first (series, model) that fails alone, for a one-line error naming both."""
    for uid in dict.fromkeys(df["unique_id"]):  # type: ignore[index]
        one = df[df["unique_id"] == uid]  # type: ignore[index]
        for name in models:
            try:
                run(one, [name])
            except Exception as inner:
                reason = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
                return ValueError(
                    f"baseline {name} failed on series {uid!r} ({len(one)} values): {reason}; drop the series or the model"
                )
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ValueError(f"the baselines failed: {reason}")


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Results of :func:`rolling_origin_evaluation`.

    ``per_origin``: rows ``unique_id, origin, model, mase, smape, crps, wql`` (origin 0 is the
    latest cut). ``per_series``: the same metrics averaged over origins, one row per series and
    model. ``summary``: one row per model with the mean of each metric over series and
    ``relative_mase`` (geometric mean of MASE relative to the baseline model).
    """

    per_origin: Table
    per_series: Table
    summary: Table

    def side_by_side(self, metric: str = "mase") -> Table:
        """``unique_id`` plus one column per model holding ``metric`` (per series, origins averaged)."""
        if metric not in ("mase", "smape", "crps", "wql"):
            raise ValueError(f"metric {metric!r} is not valid; choose one of mase, smape, crps, wql")
        ids = list(dict.fromkeys(self.per_series["unique_id"].tolist()))
        models = list(dict.fromkeys(self.per_series["model"].tolist()))
        cols: dict[str, object] = {"unique_id": np.array(ids, dtype=object)}
        uid, mod, val = self.per_series["unique_id"], self.per_series["model"], self.per_series[metric]
        for model in models:
            cols[model] = np.array([val[(uid == u) & (mod == model)][0] for u in ids], dtype=np.float64)
        return Table(cols)


def rolling_origin_evaluation(
    series: Sequence[Series],
    horizon: int,
    forecaster: Forecaster | None = None,
    name: str = "model",
    season_length: int | None = None,
    num_origins: int = 3,
    step: int | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    baselines: Sequence[str] = BASELINE_MODELS,
    relative_to: str = "SeasonalNaive",
) -> Evaluation:
    """Evaluates ``forecaster`` (named ``name``) and the baselines at ``num_origins`` cut points.

    Origin ``k`` cuts each series at ``T - horizon - k * step`` (``step`` defaults to ``horizon``):
    the models see the values before the cut and are scored on the next ``horizon``. MASE uses
    the history before the cut as its in-sample scale. CRPS (from quantiles) and WQL are NaN for
    a model whose frame has no quantile columns. A series too short for the last origin is
    rejected, naming it and the length needed.
    """
    if horizon < 1 or num_origins < 1:
        raise ValueError(f"horizon={horizon} and num_origins={num_origins} must be at least 1")
    step = horizon if step is None else int(step)
    if step < 1:
        raise ValueError(f"step={step} must be at least 1")
    series = list(series)
    seasons = _season_lengths(series, season_length)
    for s, m in zip(series, seasons):
        need = horizon + (num_origins - 1) * step + max(2, m + 1)
        if len(s) < need:
            raise ValueError(
                f"series {s.unique_id!r} has {len(s)} values; {num_origins} origins of horizon {horizon} need at least {need}"
            )
    quantiles = tuple(float(q) for q in quantiles)
    records: list[tuple[str, int, str, float, float, float, float]] = []
    for k in range(num_origins):
        cuts = [len(s) - horizon - k * step for s in series]
        histories = [s.head(c) for s, c in zip(series, cuts)]
        actual = np.stack([s.values[c : c + horizon] for s, c in zip(series, cuts)])
        frames: dict[str, ForecastFrame] = {}
        if forecaster is not None:
            out = forecaster(histories, horizon, quantiles)
            for model in out.models() or [name]:
                frames[model] = out.for_model(model) if out.models() else out
        if baselines:
            base = baseline_forecasts(histories, horizon, season_length, baselines, quantiles)
            frames.update({model: base.for_model(model) for model in base.models()})
        ids = [s.unique_id for s in series]
        insample = [h.values for h in histories]
        for model, frame in frames.items():
            mean, q, levels = frame.arrays(ids)
            m_mase = metrics.mase(actual, mean, insample, seasons)
            m_smape = metrics.smape(actual, mean)
            if q is None:
                m_crps = m_wql = np.full(len(ids), np.nan)
            else:
                m_crps = metrics.crps_from_quantiles(actual, q, levels)
                m_wql = metrics.wql(actual, q, levels)
            for i, uid in enumerate(ids):
                records.append((uid, k, model, m_mase[i], m_smape[i], m_crps[i], m_wql[i]))
    names = ("unique_id", "origin", "model", "mase", "smape", "crps", "wql")
    per_origin = Table(
        {
            n: np.array([r[j] for r in records], dtype=object if j in (0, 2) else None)
            for j, n in enumerate(names)
        }
    )
    return _aggregate(per_origin, relative_to)


def _aggregate(per_origin: Table, relative_to: str) -> Evaluation:
    ids = list(dict.fromkeys(per_origin["unique_id"].tolist()))
    models = list(dict.fromkeys(per_origin["model"].tolist()))
    metric_names = ("mase", "smape", "crps", "wql")
    rows: dict[str, list] = {"unique_id": [], "model": [], **{m: [] for m in metric_names}}
    for model in models:
        for uid in ids:
            sel = (per_origin["unique_id"] == uid) & (per_origin["model"] == model)
            rows["unique_id"].append(uid)
            rows["model"].append(model)
            for m in metric_names:
                rows[m].append(float(np.mean(per_origin[m][sel].astype(np.float64))))
    per_series = Table(
        {k: np.array(v, dtype=object if k in ("unique_id", "model") else np.float64) for k, v in rows.items()}
    )
    mase_by_model = {model: per_series["mase"][per_series["model"] == model] for model in models}
    relative = (
        metrics.relative_geomean(mase_by_model, relative_to)
        if relative_to in models
        else dict.fromkeys(models, float("nan"))
    )
    summary: dict[str, list] = {"model": models, **{m: [] for m in metric_names}, "relative_mase": []}
    for model in models:
        sel = per_series["model"] == model
        for m in metric_names:
            vals = per_series[m][sel]
            summary[m].append(float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"))
        summary["relative_mase"].append(relative[model])
    return Evaluation(
        per_origin,
        per_series,
        Table({k: np.array(v, dtype=object if k == "model" else np.float64) for k, v in summary.items()}),
    )
