"""The forecast frame: long format ``unique_id, ds, [model,] mean, q<level>...`` without pandas.

A :class:`Table` is a dict of equal-length 1-D numpy columns with CSV and pandas interop. A
:class:`ForecastFrame` is a Table with ``unique_id``, ``ds`` and ``mean`` columns, one column
per quantile level named ``q`` + the level (``q0.1``, ``q0.5``, ``q0.95``), and an optional
``model`` column when it holds several models' forecasts. Rows of one series (and model) are
consecutive and in time order. Build one with :func:`forecast_frame` (point forecasts and
quantile arrays) or :func:`frame_from_samples` (sample paths); :func:`plot_forecasts` draws it.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moekit.timeseries.data import Series, format_ds


def quantile_column(level: float) -> str:
    """Column name of a quantile level: ``0.1 -> "q0.1"``."""
    return f"q{float(level):g}"


class Table:
    """Columns of equal length: ``columns[name]`` is a 1-D numpy array (R,)."""

    def __init__(self, columns: Mapping[str, Any]):
        cols = {str(k): np.asarray(v) for k, v in columns.items()}
        lengths = {k: v.shape[0] for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns have different lengths {lengths}")
        self.columns = cols

    def __len__(self) -> int:
        return next(iter(self.columns.values())).shape[0] if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def names(self) -> list[str]:
        """Column names in order."""
        return list(self.columns)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per row (Python scalars)."""
        return [
            {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in self.columns.items()}
            for i in range(len(self))
        ]

    def select(self, mask: np.ndarray) -> Table:
        """Rows where the boolean ``mask`` (R,) is True, as the same class."""
        out = object.__new__(type(self))
        Table.__init__(out, {k: v[mask] for k, v in self.columns.items()})
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Writes a CSV with a header; timestamps as ISO dates (no time when it is midnight)."""
        path = Path(path)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.names)
            cols = list(self.columns.values())
            for i in range(len(self)):
                writer.writerow(_cell(c[i]) for c in cols)
        return path

    def to_pandas(self) -> Any:
        """A pandas DataFrame with the same columns; needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ValueError("to_pandas needs pandas: pip install 'moekit[ts]'") from None
        return pd.DataFrame(dict(self.columns))


def _cell(value: Any) -> str:
    if isinstance(value, np.datetime64):
        return format_ds(value)
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def read_table_csv(path: str | Path) -> Table:
    """Reads a CSV written by :meth:`Table.to_csv`; columns that all parse as numbers become float64."""
    with open(path, encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: file is empty")
    header, body = rows[0], rows[1:]
    cols: dict[str, Any] = {}
    for j, name in enumerate(header):
        raw = [r[j] for r in body]
        try:
            cols[name] = np.array([float(v) for v in raw], dtype=np.float64)
        except ValueError:
            cols[name] = np.array(raw, dtype=object)
    return Table(cols)


class ForecastFrame(Table):
    """Long-format forecasts: ``unique_id, ds, [model,] mean, q<level>...`` (see module docstring)."""

    def __init__(self, columns: Mapping[str, Any]):
        super().__init__(columns)
        missing = [c for c in ("unique_id", "ds", "mean") if c not in self.columns]
        if missing:
            raise ValueError(f"a forecast frame needs columns unique_id, ds, mean; missing {missing}")

    @property
    def levels(self) -> tuple[float, ...]:
        """Quantile levels present, sorted ascending."""
        return tuple(sorted(float(c[1:]) for c in self.names if c.startswith("q") and _is_float(c[1:])))

    def models(self) -> list[str]:
        """Model names in order of appearance (``[]`` when there is no model column)."""
        return list(dict.fromkeys(self.columns["model"].tolist())) if "model" in self.columns else []

    def for_model(self, model: str) -> ForecastFrame:
        """Rows of one model, without the model column."""
        if model not in self.models():
            raise ValueError(f"model {model!r} not in this frame; it has {self.models()}")
        sub = self.select(self.columns["model"] == model)
        return ForecastFrame({k: v for k, v in sub.columns.items() if k != "model"})

    def arrays(
        self, unique_ids: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
        """``(mean (N, H), quantiles (N, Q, H) or None, levels)`` for one model's frame.

        ``unique_ids`` picks and orders the series (default: order of appearance); every series
        must have the same number of rows H.
        """
        if "model" in self.columns and len(self.models()) > 1:
            raise ValueError(f"frame holds several models {self.models()}; call for_model(name) first")
        ids = self.columns["unique_id"].astype(str)
        order = list(dict.fromkeys(ids.tolist())) if unique_ids is None else [str(u) for u in unique_ids]
        rows = {u: np.nonzero(ids == u)[0] for u in order}
        absent = [u for u, r in rows.items() if r.size == 0]
        if absent:
            raise ValueError(f"series {absent[:3]} have no forecast rows")
        counts = {u: r.size for u, r in rows.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"series have different numbers of forecast steps {counts}")
        mean = np.stack([self.columns["mean"][rows[u]].astype(np.float64) for u in order])
        levels = self.levels
        if not levels:
            return mean, None, ()
        q = np.stack(
            [
                np.stack([self.columns[quantile_column(lv)][rows[u]].astype(np.float64) for lv in levels])
                for u in order
            ]
        )
        return mean, q, levels


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def forecast_frame(
    series: Sequence[Series],
    mean: np.ndarray,
    quantiles: np.ndarray | None = None,
    levels: Sequence[float] = (),
    model: str | None = None,
) -> ForecastFrame:
    """Builds the frame from ``mean`` (N, H) and ``quantiles`` (N, Q, H) at ``levels`` (Q,).

    ``ds`` continues each series' index (:meth:`Series.future_ds`). Quantiles are sorted along Q
    per step so the columns never cross.
    """
    mean = np.atleast_2d(np.asarray(mean, np.float64))
    n, h = mean.shape
    if len(series) != n:
        raise ValueError(f"{len(series)} series but mean has {n} rows; expected mean (N, H)")
    levels = tuple(float(lv) for lv in levels)
    if any(not 0 < lv < 1 for lv in levels):
        raise ValueError(f"quantile levels {list(levels)} must lie strictly between 0 and 1")
    cols: dict[str, Any] = {"unique_id": np.repeat(np.array([s.unique_id for s in series], dtype=object), h)}
    parts = [s.future_ds(h) for s in series]
    if len({p.dtype.kind for p in parts}) > 1:  # timestamps and integer steps in one frame
        parts = [_object_array(p) for p in parts]
    cols["ds"] = np.concatenate(parts) if n else np.array([])
    if model is not None:
        cols["model"] = np.full(n * h, model, dtype=object)
    cols["mean"] = mean.reshape(-1)
    if levels:
        if quantiles is None:
            raise ValueError("levels were given but no quantiles array")
        q = np.asarray(quantiles, np.float64)
        if q.shape != (n, len(levels), h):
            raise ValueError(f"quantiles have shape {q.shape}; expected (N, Q, H) = {(n, len(levels), h)}")
        order = np.argsort(levels)
        q = np.sort(q[:, order, :], axis=1)
        for k, lv in enumerate(sorted(levels)):
            cols[quantile_column(lv)] = q[:, k, :].reshape(-1)
    return ForecastFrame(cols)


def _object_array(values: np.ndarray) -> np.ndarray:
    # astype(object) would turn datetime64 into datetime.datetime; keep numpy scalars instead.
    out = np.empty(values.shape[0], dtype=object)
    out[:] = list(values)
    return out


def frame_from_samples(
    series: Sequence[Series], samples: np.ndarray, levels: Sequence[float] = (), model: str | None = None
) -> ForecastFrame:
    """Builds the frame from sample paths (N, S, H): ``mean`` is the sample mean, quantiles are empirical."""
    x = np.asarray(samples, np.float64)
    if x.ndim != 3:
        raise ValueError(f"samples have shape {x.shape}; expected (N, S, H)")
    levels = tuple(float(lv) for lv in levels)
    q = np.moveaxis(np.quantile(x, levels, axis=1), 0, 1) if levels else None
    return forecast_frame(series, x.mean(axis=1), q, levels, model)


def concat_frames(frames: Mapping[str, ForecastFrame]) -> ForecastFrame:
    """Stacks single-model frames into one frame with a ``model`` column (keys are model names)."""
    parts = []
    for name, frame in frames.items():
        cols = dict(frame.columns)
        cols.pop("model", None)
        n = len(frame)
        parts.append(
            {
                "unique_id": cols.pop("unique_id"),
                "ds": cols.pop("ds"),
                "model": np.full(n, name, dtype=object),
                **cols,
            }
        )
    names = list(dict.fromkeys(k for p in parts for k in p))
    missing = [k for k in names if any(k not in p for p in parts)]
    if missing:
        raise ValueError(f"frames have different columns: {missing} missing in some; use the same quantiles")
    return ForecastFrame({k: np.concatenate([p[k] for p in parts]) for k in names})


def plot_forecasts(
    history: Sequence[Series],
    frame: ForecastFrame,
    path: str | Path,
    max_series: int = 4,
    interval: tuple[float, float] | None = None,
    history_length: int | None = 200,
) -> Path:
    """Saves a PNG with one panel per series (up to ``max_series``): history, mean, and a band.

    The band spans quantile levels ``interval`` (default: the outermost pair in the frame). For
    a frame with a model column, each model gets its own line. Needs matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plot_forecasts needs matplotlib: pip install 'moekit[plot]'") from None
    models = frame.models() or [None]
    shown = list(history)[:max_series]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.6 * len(shown)), squeeze=False)
    for ax, s in zip(axes[:, 0], shown):
        start = 0 if history_length is None else max(0, len(s) - history_length)
        ax.plot(s.index()[start:], s.values[start:], color="black", lw=1.0, label="history")
        for model in models:
            sub = frame if model is None else frame.for_model(model)
            rows = sub["unique_id"].astype(str) == s.unique_id
            if not rows.any():
                continue
            ds = np.array(list(sub["ds"][rows]))  # object columns (mixed kinds) back to one dtype
            line = ax.plot(ds, sub["mean"][rows].astype(float), lw=1.2, label=model or "forecast")[0]
            levels = sub.levels
            band = interval or ((levels[0], levels[-1]) if len(levels) >= 2 else None)
            if band is not None:
                lo, hi = (sub[quantile_column(lv)][rows].astype(float) for lv in band)
                label = f"{band[0]:g}-{band[1]:g} band" if model is models[0] else None
                ax.fill_between(ds, lo, hi, color=line.get_color(), alpha=0.2, label=label)
        if len(s):
            ax.axvline(s.index()[-1], color="grey", lw=0.6, ls=":")
        ax.set_title(s.unique_id, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
