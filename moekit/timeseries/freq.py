"""Frequencies of time indices: inference from timestamps, continuation, default seasonal periods.

A frequency is a short string ``"<n><unit>"`` (``n`` omitted when 1), close to pandas' aliases:

- fixed steps: ``s``, ``min``, ``h``, ``D``, ``W`` (exactly 7 days, not anchored to a weekday);
- calendar steps: ``MS``/``ME`` (months), ``QS``/``QE`` (3 months), ``YS``/``YE`` (12 months).
  ``*S`` keeps each timestamp's offset from the start of its month (1st of the month, or the
  15th, and its time of day); ``*E`` keeps the offset from the end of the month (last day);
- ``step``: integer time indices (``ds`` = 0, 1, 2, ... or any constant integer step).

Timestamps are ``datetime64[s]`` arrays; integer indices are ``int64`` arrays. Continuation is
done here, not by pandas, so a forecast's ``ds`` always lies on the input's own grid.
"""

from __future__ import annotations

import re

import numpy as np

_FIXED_SECONDS = {"W": 604800, "D": 86400, "h": 3600, "min": 60, "s": 1}
_CALENDAR_MONTHS = {"YS": 12, "YE": 12, "QS": 3, "QE": 3, "MS": 1, "ME": 1}
_ALIAS_RE = re.compile(r"^(\d*)([A-Za-z]+)$")
# Default seasonal period of one step of each unit (how many steps make the natural cycle).
_SEASON = {"s": 60, "min": 60, "h": 24, "D": 7, "W": 52, "MS": 12, "ME": 12, "QS": 4, "QE": 4}


def parse_freq(freq: str) -> tuple[int, str]:
    """Splits an alias such as ``"15min"`` into ``(15, "min")``; raises ``ValueError`` when unknown."""
    match = _ALIAS_RE.match(str(freq).strip())
    units = (*_FIXED_SECONDS, *_CALENDAR_MONTHS, "step")
    if match is None or match.group(2) not in units or match.group(1) in ("0",):
        raise ValueError(f"frequency {freq!r} is not valid; use <n><unit> with unit one of {list(units)}")
    return int(match.group(1) or 1), match.group(2)


def _alias(n: int, unit: str) -> str:
    return unit if n == 1 else f"{n}{unit}"


def _months(ds: np.ndarray) -> np.ndarray:
    return ds.astype("datetime64[M]")


def is_datetime(ds: np.ndarray) -> bool:
    """True when ``ds`` (any shape) holds timestamps rather than integer indices."""
    return np.issubdtype(np.asarray(ds).dtype, np.datetime64)


def infer_freq(ds: np.ndarray) -> str | None:
    """Infers the frequency of a strictly increasing index ``ds`` (T,).

    Returns ``None`` when ``T < 2`` or when the steps are not whole multiples of one step (an
    irregular index). Gaps (a step that is a multiple of the smallest) are allowed: they are
    missing values, filled by the caller. Calendar months are tried before fixed steps, because
    monthly data has 28- to 31-day gaps that no fixed step fits.
    """
    ds = np.asarray(ds)
    if ds.shape[0] < 2:
        return None
    if not is_datetime(ds):
        diffs = np.diff(ds.astype(np.int64))
        step = int(diffs.min())
        if step <= 0 or np.any(diffs % step):
            return None
        return _alias(step, "step")
    ds = ds.astype("datetime64[s]")
    month_diffs = np.diff(_months(ds).astype(np.int64))
    if np.all(month_diffs > 0):
        k = int(month_diffs.min())
        if not np.any(month_diffs % k):
            starts = _months(ds).astype("datetime64[s]")
            ends = (_months(ds) + 1).astype("datetime64[s]")
            from_start, from_end = ds - starts, ends - ds
            same_start = bool(np.all(from_start == from_start[0]))
            same_end = bool(np.all(from_end == from_end[0]))
            # Month ends of 30-day months repeat their offset from the start (30 Jun, 30 Sep):
            # an offset of 28 days or more from the start means an end anchor when that fits too.
            anchor = None
            if same_start and (from_start[0] < np.timedelta64(28, "D") or not same_end):
                anchor = "S"
            elif same_end:
                anchor = "E"
            if anchor is not None:
                if k % 12 == 0:
                    return _alias(k // 12, "Y" + anchor)
                if k % 3 == 0:
                    return _alias(k // 3, "Q" + anchor)
                return _alias(k, "M" + anchor)
    seconds = np.diff(ds.astype(np.int64))
    step = int(seconds.min())
    if step <= 0 or np.any(seconds % step):
        return None
    for unit, size in _FIXED_SECONDS.items():
        if step % size == 0:
            return _alias(step // size, unit)
    raise AssertionError("unreachable: every whole number of seconds is a multiple of 1 s")


def _offsets(anchor_ds: np.ndarray, freq: str, steps: np.ndarray) -> np.ndarray:
    """Points ``anchor + steps * freq`` for an int array ``steps`` (any shape)."""
    n, unit = parse_freq(freq)
    steps = np.asarray(steps, dtype=np.int64)
    if unit == "step":
        if is_datetime(anchor_ds):
            raise ValueError(f"frequency {freq!r} is for integer indices, but ds holds timestamps")
        return np.int64(anchor_ds) + n * steps
    if not is_datetime(anchor_ds):
        raise ValueError(f"frequency {freq!r} is for timestamps, but ds holds integers")
    anchor = np.datetime64(anchor_ds, "s")
    if unit in _FIXED_SECONDS:
        return anchor + (n * _FIXED_SECONDS[unit] * steps).astype("timedelta64[s]")
    month = anchor.astype("datetime64[M]")
    shift = (n * _CALENDAR_MONTHS[unit] * steps).astype("timedelta64[M]")
    if unit.endswith("S"):
        offset = anchor - month.astype("datetime64[s]")
        return (month + shift).astype("datetime64[s]") + offset
    offset = (month + 1).astype("datetime64[s]") - anchor
    return (month + shift + 1).astype("datetime64[s]") - offset


def continue_ds(last: np.ndarray | np.generic | int, freq: str, horizon: int) -> np.ndarray:
    """The ``horizon`` points after ``last`` on the grid of ``freq``: shape (horizon,)."""
    return _offsets(np.asarray(last), freq, np.arange(1, horizon + 1))


def date_range(start: np.ndarray | np.generic | int, freq: str, num: int) -> np.ndarray:
    """``num`` points starting at ``start`` on the grid of ``freq``: shape (num,)."""
    return _offsets(np.asarray(start), freq, np.arange(num))


def grid_positions(ds: np.ndarray, freq: str) -> np.ndarray:
    """Step index of each point of a sorted ``ds`` (T,) on the grid of ``freq`` started at ``ds[0]``.

    Returns an int64 array (T,) with ``positions[0] == 0``; raises ``ValueError`` naming the first
    point that is off the grid. Gaps show up as jumps larger than 1.
    """
    ds = np.asarray(ds)
    n, unit = parse_freq(freq)
    if unit == "step":
        rel = ds.astype(np.int64) - np.int64(ds[0])
        positions = rel // n
    elif unit in _FIXED_SECONDS:
        rel = (ds.astype("datetime64[s]") - ds[0].astype("datetime64[s]")).astype(np.int64)
        positions = rel // (n * _FIXED_SECONDS[unit])
    else:
        rel = _months(ds).astype(np.int64) - _months(ds[:1]).astype(np.int64)[0]
        positions = rel // (n * _CALENDAR_MONTHS[unit])
    expected = _offsets(ds[0], freq, positions)
    off = np.nonzero(expected != ds)[0]
    if off.size:
        raise ValueError(f"ds value {ds[off[0]]} is not on the {freq!r} grid that starts at {ds[0]}")
    return positions.astype(np.int64)


def season_length_for(freq: str | None) -> int:
    """Default seasonal period (in steps) for a frequency; 1 when there is no natural cycle.

    s/min -> 60, h -> 24, D -> 7, W -> 52, MS/ME -> 12, QS/QE -> 4, YS/YE and step -> 1, each divided
    by the multiple ``n`` when it divides exactly (``"6h"`` -> 4), else 1.
    """
    if freq is None:
        return 1
    n, unit = parse_freq(freq)
    base = _SEASON.get(unit, 1)
    return base // n if base % n == 0 and base // n > 1 else 1
