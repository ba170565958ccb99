"""moekit.timeseries: data, metrics, baselines and forecast frames for time-series forecasters.

Contract. This package sits on floor 1 (beside layers, data and analysis): it imports only
``moekit.config``, numpy and the standard library at module level; pandas, statsforecast and
matplotlib are optional and imported inside the functions that need them, each with a one-line
``ValueError`` naming the extra to install (``moekit[ts]``, ``moekit[plot]``). No torch model code
lives here: the Time-MoE and Moirai-MoE models, their objectives and forecasters build on top of
it, in higher floors.

- :mod:`~moekit.timeseries.data`: :class:`Series` (values (T,) float64, ``ds`` timestamps or ints,
  ``freq``) and the readers of the three input formats (long ``unique_id, ds, y``; wide; JSONL
  ``{"sequence": [...]}``), all validated the same way; the long-format writer.
- :mod:`~moekit.timeseries.freq`: frequency inference and ``ds`` continuation.
- :mod:`~moekit.timeseries.builtin`: real series from statsmodels' wheel (with a documented
  zero-shot hold-out) and a seeded synthetic generator for pretraining.
- :mod:`~moekit.timeseries.windows`: per-series normalisation and its inverse, multi-horizon
  training windows with labels masked past the end, and horizon decomposition over heads.
- :mod:`~moekit.timeseries.metrics`: MASE, sMAPE, CRPS (samples or quantiles), WQL and the
  geometric mean of MASE relative to SeasonalNaive.
- :mod:`~moekit.timeseries.frame`: the forecast frame ``unique_id, ds, mean, q<level>...``, CSV and
  a PNG plot.
- :mod:`~moekit.timeseries.baselines`: statsforecast's AutoETS, AutoARIMA, SeasonalNaive and
  Naive, and rolling-origin evaluation of any forecaster against them.

How to add to it. A new input format is a reader returning ``list[Series]`` built through
:func:`make_series` (so validation stays in one place). A new metric is a numpy function on
(N, H)-shaped batches returning (N,), tested against an independent implementation or a slow
obvious reference. A new real series is a loader in ``builtin.py`` plus its row (frequency,
season length, split) in that module's table. A forecaster is a callable ``(histories, horizon,
quantiles) -> ForecastFrame``, which :func:`rolling_origin_evaluation` accepts as is.
"""

from moekit.timeseries.baselines import (
    BASELINE_MODELS,
    DEFAULT_QUANTILES,
    Evaluation,
    baseline_forecasts,
    rolling_origin_evaluation,
)
from moekit.timeseries.builtin import (
    HOLDOUT,
    PRETRAIN,
    SEASON_LENGTH,
    SyntheticConfig,
    SyntheticSet,
    generate_synthetic,
    load_builtin,
)
from moekit.timeseries.data import (
    Series,
    make_series,
    read_jsonl,
    read_long,
    read_series,
    read_wide,
    to_pandas_long,
    write_long,
)
from moekit.timeseries.frame import (
    ForecastFrame,
    Table,
    concat_frames,
    forecast_frame,
    frame_from_samples,
    plot_forecasts,
    read_table_csv,
)
from moekit.timeseries.freq import continue_ds, date_range, infer_freq, season_length_for
from moekit.timeseries.metrics import (
    crps_from_quantiles,
    crps_from_samples,
    mase,
    relative_geomean,
    smape,
    wql,
)
from moekit.timeseries.windows import Scale, Windows, fit_scale, make_windows, plan_horizon

__all__ = [
    "BASELINE_MODELS",
    "DEFAULT_QUANTILES",
    "HOLDOUT",
    "PRETRAIN",
    "SEASON_LENGTH",
    "Evaluation",
    "ForecastFrame",
    "Scale",
    "Series",
    "SyntheticConfig",
    "SyntheticSet",
    "Table",
    "Windows",
    "baseline_forecasts",
    "concat_frames",
    "continue_ds",
    "crps_from_quantiles",
    "crps_from_samples",
    "date_range",
    "fit_scale",
    "forecast_frame",
    "frame_from_samples",
    "generate_synthetic",
    "infer_freq",
    "load_builtin",
    "make_series",
    "make_windows",
    "mase",
    "plan_horizon",
    "plot_forecasts",
    "read_jsonl",
    "read_long",
    "read_series",
    "read_table_csv",
    "read_wide",
    "relative_geomean",
    "rolling_origin_evaluation",
    "season_length_for",
    "smape",
    "to_pandas_long",
    "wql",
    "write_long",
]
