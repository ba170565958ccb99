"""Series: the one in-memory form of time-series data, its readers, writers and validation.

Every reader returns ``list[Series]``. A :class:`Series` is univariate: ``values`` (T,) float64
with no NaN, ``ds`` (T,) either ``datetime64[s]`` timestamps or ``int64`` indices (or ``None``:
positions 0..T-1), and ``freq`` (an alias from :mod:`moekit.timeseries.freq`, ``None`` only when
it cannot be known, e.g. a single observation).

Validation, applied by every reader through :func:`make_series`:

- rows are sorted by ``ds``; a duplicated ``ds`` within a series is an error;
- the frequency is inferred (or checked when given); gaps in the grid become missing values;
- leading and trailing missing values are dropped: a series spans its first to its last
  observation, so a forecast starts right after the last observed value;
- at most half of the grid may be gaps (more means a wrong frequency or bad timestamps);
- interior missing values are linearly interpolated (``missing="interpolate"``, the default) or
  rejected (``missing="reject"``); a series with no observed value is always rejected;
- ``inf`` is always rejected; constant series are kept (normalisation gives them scale 1);
- a series shorter than ``min_length`` is rejected with its name and the minimum length.

Every error is one ``ValueError`` line naming the series (or file line) and what to change.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moekit.config import check_choice
from moekit.timeseries.freq import continue_ds, grid_positions, infer_freq, is_datetime, parse_freq

_NA_STRINGS = frozenset({"", "nan", "na", "n/a", "null", "none", "nat"})
_TIME_NAMES = ("ds", "date", "time", "timestamp", "datetime", "period", "year", "month")


@dataclass(frozen=True, eq=False)
class Series:
    """One univariate series: ``values`` (T,) float64, ``ds`` (T,) timestamps/ints or None, ``freq``."""

    unique_id: str
    values: np.ndarray
    ds: np.ndarray | None = None
    freq: str | None = None

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"series {self.unique_id!r}: values must be 1-D, got shape {values.shape}")
        object.__setattr__(self, "values", values)
        if self.ds is not None:
            ds = np.asarray(self.ds)
            ds = ds.astype("datetime64[s]") if is_datetime(ds) else ds.astype(np.int64)
            if ds.shape != values.shape:
                raise ValueError(
                    f"series {self.unique_id!r}: ds has {ds.shape[0]} points, values {values.shape[0]}"
                )
            object.__setattr__(self, "ds", ds)
        if self.freq is not None:
            parse_freq(self.freq)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def index(self) -> np.ndarray:
        """``ds`` (T,), or the positions 0..T-1 as int64 when there is none."""
        return self.ds if self.ds is not None else np.arange(len(self), dtype=np.int64)

    def future_ds(self, horizon: int) -> np.ndarray:
        """The ``horizon`` index points after the last observation: shape (horizon,)."""
        if self.ds is None:
            return np.arange(len(self), len(self) + horizon, dtype=np.int64)
        if self.freq is None:
            raise ValueError(f"series {self.unique_id!r}: frequency unknown (one observation?); pass freq=")
        return continue_ds(self.ds[-1], self.freq, horizon)

    def head(self, length: int) -> Series:
        """The first ``length`` observations (for rolling-origin cuts)."""
        ds = None if self.ds is None else self.ds[:length]
        return Series(self.unique_id, self.values[:length], ds, self.freq)


def parse_ds(raw: Sequence[Any] | np.ndarray, where: str = "ds") -> np.ndarray:
    """Parses time values (T,) into int64 indices (when all are integers) or ``datetime64[s]``.

    Accepts integers, ISO dates/timestamps (``2020-01``, ``2020-01-31``, ``2020-01-31 12:00``) and,
    when pandas is installed, whatever ``pandas.to_datetime`` reads. ``where`` names the source in
    errors.
    """
    arr = np.asarray(raw)
    if is_datetime(arr):
        return arr.astype("datetime64[s]")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            return arr.astype(np.int64)
        raise ValueError(f"{where}: time values must be integers or timestamps, got {arr[:3].tolist()}")
    text = [str(v).strip() for v in arr.tolist()]
    try:
        return np.array([int(v) for v in text], dtype=np.int64)
    except ValueError:
        pass
    try:
        return np.array([np.datetime64(v.replace(" ", "T"), "s") for v in text], dtype="datetime64[s]")
    except ValueError:
        pass
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        try:
            return pd.to_datetime(pd.Series(text)).to_numpy().astype("datetime64[s]")
        except (ValueError, TypeError):
            pass
    bad = next((v for v in text if not _looks_like_time(v)), text[0] if text else "")
    raise ValueError(f"{where}: cannot read {bad!r} as a timestamp or integer; use ISO dates like 2020-01-31")


def _looks_like_time(value: str) -> bool:
    try:
        np.datetime64(value.replace(" ", "T"))
        return True
    except ValueError:
        return False


def _parse_values(raw: Sequence[Any], where: str) -> np.ndarray:
    out = np.empty(len(raw), dtype=np.float64)
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, str) and v.strip().lower() in _NA_STRINGS):
            out[i] = np.nan
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: value {v!r} at position {i} is not a number") from None
    return out


def make_series(
    unique_id: str,
    values: Sequence[Any] | np.ndarray,
    ds: Sequence[Any] | np.ndarray | None = None,
    freq: str | None = None,
    *,
    missing: str = "interpolate",
    min_length: int = 1,
) -> Series:
    """Builds one validated :class:`Series` from raw values (T,) and optional raw ``ds`` (T,).

    Applies the rules of the module docstring (sort, duplicates, frequency, gaps, missing values,
    minimum length). Raises a one-line ``ValueError`` naming ``unique_id``.
    """
    check_choice("make_series", "missing", missing, ("interpolate", "reject"))
    name = f"series {unique_id!r}"
    y = _parse_values(list(values) if not isinstance(values, np.ndarray) else values.tolist(), name)
    if np.any(np.isinf(y)):
        raise ValueError(f"{name}: contains inf at position {int(np.nonzero(np.isinf(y))[0][0])}; remove it")
    index = None
    if ds is not None:
        index = parse_ds(ds, where=name)
        if index.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: {index.shape[0]} time values but {y.shape[0]} values")
        order = np.argsort(index, kind="stable")
        index, y = index[order], y[order]
        dup = np.nonzero(index[1:] == index[:-1])[0]
        if dup.size:
            raise ValueError(
                f"{name}: ds {format_ds(index[dup[0]])} appears more than once; keep one row per time"
            )
        observed = ~np.isnan(y)
        if observed.any():
            first, last = np.nonzero(observed)[0][[0, -1]]
            index, y = index[first : last + 1], y[first : last + 1]
        if freq is None:
            freq = infer_freq(index)
            if freq is None and index.shape[0] > 1:
                raise ValueError(f"{name}: timestamps are irregular (no common step); pass freq= or resample")
        if freq is not None:
            try:
                positions = grid_positions(index, freq)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            if positions[-1] + 1 > 2 * index.shape[0]:
                raise ValueError(
                    f"{name}: only {index.shape[0]} of {int(positions[-1]) + 1} points on the {freq!r} grid are present; check ds or pass freq="
                )
            if positions[-1] + 1 != index.shape[0]:
                full = np.full(int(positions[-1]) + 1, np.nan)
                full[positions] = y
                y = full
                index = np.concatenate([index[:1], continue_ds(index[0], freq, int(positions[-1]))])
    observed = ~np.isnan(y)
    if not observed.any():
        raise ValueError(f"{name}: has no observed value; drop it")
    first, last = np.nonzero(observed)[0][[0, -1]]
    y = y[first : last + 1]
    if index is not None:
        index = index[first : last + 1]
    gaps = np.isnan(y)
    if gaps.any():
        if missing == "reject":
            where = (
                f"ds {format_ds(index[np.argmax(gaps)])}"
                if index is not None
                else f"position {int(np.argmax(gaps))}"
            )
            raise ValueError(
                f"{name}: {int(gaps.sum())} missing value(s), first at {where}; fill them or use missing='interpolate'"
            )
        pos = np.arange(y.shape[0])
        y = y.copy()
        y[gaps] = np.interp(pos[gaps], pos[~gaps], y[~gaps])
    if y.shape[0] < min_length:
        raise ValueError(f"{name}: has {y.shape[0]} observations; at least {min_length} are needed")
    return Series(str(unique_id), y, index, freq)


def _is_dataframe(obj: Any) -> bool:
    return hasattr(obj, "columns") and hasattr(obj, "to_dict") and not isinstance(obj, dict)


def _columns_from_csv(path: str | Path) -> tuple[list[str], dict[str, list[str]]]:
    text = Path(path).read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ValueError(f"{path}: file is empty; expected a header row") from None
    cols: dict[str, list[str]] = {h: [] for h in header}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path} line {lineno}: {len(row)} fields, but the header has {len(header)}")
        for h, cell in zip(header, row):
            cols[h].append(cell)
    return header, cols


def _columns_from_frame(df: Any) -> tuple[list[str], dict[str, list[Any]]]:
    header = [str(c) for c in df.columns]
    cols: dict[str, Any] = {}
    for c, h in zip(df.columns, header):
        col = df[c].to_numpy()
        cols[h] = col if is_datetime(col) else col.tolist()
    return header, cols


def read_long(
    source: str | Path | Any,
    *,
    id_col: str = "unique_id",
    time_col: str = "ds",
    target_col: str = "y",
    freq: str | None = None,
    missing: str = "interpolate",
    min_length: int = 1,
) -> list[Series]:
    """Reads long format (one row per series and time): a CSV path or a pandas DataFrame.

    Columns ``unique_id, ds, y`` (names configurable); ``ds`` holds timestamps or integers. Series
    come back in order of first appearance, each validated by :func:`make_series`.
    """
    header, cols = _columns_from_frame(source) if _is_dataframe(source) else _columns_from_csv(source)
    missing_cols = [c for c in (id_col, time_col, target_col) if c not in cols]
    if missing_cols:
        raise ValueError(
            f"{_name(source)}: long format needs columns {[id_col, time_col, target_col]}; missing {missing_cols}, found {header}"
        )
    ids = [str(v) for v in (cols[id_col].tolist() if isinstance(cols[id_col], np.ndarray) else cols[id_col])]
    groups: dict[str, list[int]] = {}
    for row, uid in enumerate(ids):
        groups.setdefault(uid, []).append(row)
    ds_all, y_all = cols[time_col], cols[target_col]
    out = []
    for uid, rows in groups.items():
        ds_rows = ds_all[rows] if isinstance(ds_all, np.ndarray) else [ds_all[r] for r in rows]
        y_rows = [y_all[r] for r in rows]
        out.append(make_series(uid, y_rows, ds_rows, freq, missing=missing, min_length=min_length))
    return out


def read_wide(
    source: str | Path | Any,
    *,
    time_col: str | None = "auto",
    freq: str | None = None,
    missing: str = "interpolate",
    min_length: int = 1,
) -> list[Series]:
    """Reads wide format (one column per series, one row per time): a CSV path or a DataFrame.

    ``time_col="auto"`` uses the first column when its name is one of ``ds, date, time, timestamp,
    datetime, period, year, month`` (any case); ``None`` means no time column (integer steps).
    Ragged series (blank cells at their start or end) are trimmed to their observed span.
    """
    header, cols = _columns_from_frame(source) if _is_dataframe(source) else _columns_from_csv(source)
    if time_col == "auto":
        time_col = header[0] if header and header[0].lower() in _TIME_NAMES else None
    if time_col is not None and time_col not in cols:
        raise ValueError(f"{_name(source)}: time column {time_col!r} not found; columns are {header}")
    value_cols = [h for h in header if h != time_col]
    if not value_cols:
        raise ValueError(f"{_name(source)}: no series columns besides the time column {time_col!r}")
    ds = cols[time_col] if time_col is not None else None
    return [make_series(h, cols[h], ds, freq, missing=missing, min_length=min_length) for h in value_cols]


def read_jsonl(path: str | Path, *, missing: str = "interpolate", min_length: int = 1) -> list[Series]:
    """Reads Time-MoE's JSONL: one ``{"sequence": [...]}`` object per line (``null`` = missing).

    Optional keys per line: ``unique_id`` (or ``item_id``; default ``series_<line index>``),
    ``start`` (a timestamp or integer) with ``freq`` to give the series a time index. Blank lines
    are skipped. A malformed line raises a ``ValueError`` naming the file and line number.
    """
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("sequence"), list):
                raise ValueError(
                    f'{where}: expected an object with a "sequence" list, like {{"sequence": [1.0, 2.0]}}'
                )
            uid = str(obj.get("unique_id", obj.get("item_id", f"series_{len(out)}")))
            seq = obj["sequence"]
            if any(isinstance(v, (list, dict, bool, str)) for v in seq):
                raise ValueError(f"{where}: sequence must hold numbers or null")
            ds = None
            line_freq = obj.get("freq")
            if "start" in obj:
                if line_freq is None:
                    raise ValueError(f'{where}: "start" needs a "freq" too (for example "D" or "MS")')
                from moekit.timeseries.freq import date_range

                ds = date_range(parse_ds([obj["start"]], where=where)[0], line_freq, len(seq))
            try:
                out.append(make_series(uid, seq, ds, line_freq, missing=missing, min_length=min_length))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    if not out:
        raise ValueError(f"{path}: no series found; expected one JSON object per line")
    return out


def read_series(path: str | Path, *, fmt: str = "auto", **kwargs: Any) -> list[Series]:
    """Reads a file in any of the three formats; ``fmt`` is ``auto``, ``long``, ``wide`` or ``jsonl``.

    ``auto``: ``.jsonl``/``.json`` is JSONL; a CSV whose header has ``unique_id`` and ``y`` is long
    format, any other CSV is wide.
    """
    check_choice("read_series", "fmt", fmt, ("auto", "long", "wide", "jsonl"))
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if fmt == "auto":
        if path.suffix.lower() in (".jsonl", ".json"):
            fmt = "jsonl"
        else:
            with open(path, encoding="utf-8-sig") as fh:
                header = [h.strip() for h in next(csv.reader(fh), [])]
            fmt = "long" if {"unique_id", "y"} <= set(header) else "wide"
    reader = {"long": read_long, "wide": read_wide, "jsonl": read_jsonl}[fmt]
    return reader(path, **kwargs)


def format_ds(value: Any) -> str:
    """Text form of one ``ds`` value: ``2020-01-31`` at midnight, ``2020-01-31 12:00:00`` otherwise, ints as is."""
    if isinstance(value, np.datetime64):
        text = str(value.astype("datetime64[s]"))
        return text[:10] if text.endswith("T00:00:00") else text.replace("T", " ")
    return str(value)


def long_rows(series: Iterable[Series]) -> list[tuple[str, str, float]]:
    """``(unique_id, ds, y)`` rows of long format, ``ds`` as text (dates without a midnight time)."""
    return [(s.unique_id, format_ds(t), float(v)) for s in series for t, v in zip(s.index(), s.values)]


def write_long(series: Iterable[Series], path: str | Path) -> Path:
    """Writes long-format CSV with header ``unique_id,ds,y``; returns the path."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["unique_id", "ds", "y"])
        writer.writerows((uid, ds, repr(y)) for uid, ds, y in long_rows(series))
    return path


def to_pandas_long(series: Iterable[Series]) -> Any:
    """A pandas DataFrame ``unique_id, ds, y`` (``ds`` datetime64 or int64); needs pandas."""
    try:
        import pandas as pd
    except ImportError:
        raise ValueError("to_pandas_long needs pandas: pip install 'moekit[ts]'") from None
    series = list(series)
    return pd.DataFrame(
        {
            "unique_id": np.concatenate([np.full(len(s), s.unique_id, dtype=object) for s in series]),
            "ds": np.concatenate([s.index() for s in series]),
            "y": np.concatenate([s.values for s in series]),
        }
    )


def _name(source: Any) -> str:
    return "DataFrame" if _is_dataframe(source) else str(source)
