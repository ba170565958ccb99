"""Built-in data with no download: real series read from statsmodels' wheel, and a synthetic generator.

Real series (read with the csv module from the CSV files inside the installed ``statsmodels``
package; statsmodels itself is never imported). ``split`` says how the series are used:

===================== ===== ====== ======= ===================================================
name                  freq  season length  source file (split)
===================== ===== ====== ======= ===================================================
co2                   MS    12     526     co2/co2.csv: Mauna Loa weekly CO2 (ppm) 1958-03..2001-12,
                                           averaged by month; 5 empty months interpolated (holdout)
elec_equip            MS    12     257     elec_equip/elec_equip.csv: euro-area electrical equipment
                                           orders index 1995-01..2016-05 (holdout)
elnino                MS    12     732     elnino/elnino.csv: sea-surface temperature, 1950-01..2010-12
                                           (holdout)
nile                  YS    1      100     nile/nile.csv: Nile river flow 1871..1970 (holdout)
sunspots              YS    1      309     sunspots/sunspots.csv: yearly sunspot activity 1700..2008
                                           (holdout; its ~11-year cycle is not a calendar season)
macrodata.<col>       QS    4      203     macrodata/macrodata.csv: US macro data 1959Q1..2009Q3, 12
                                           columns realgdp realcons realinv realgovt realdpi cpi m1
                                           tbilrate unemp pop infl realint (pretrain)
danish.<col>          QS    4      55      danish_data/data.csv: Danish money demand 1974Q1..1987Q3,
                                           lrm lry lpy ibo ide (pretrain)
interest_inflation.<c> QS   4      107     interest_inflation/E6.csv: German inflation and interest
                                           1972Q2..1998Q4, Dp R (pretrain)
===================== ===== ====== ======= ===================================================

The zero-shot hold-out is whole datasets (:data:`HOLDOUT`: co2, elec_equip, elnino, nile,
sunspots), so no held-out series shares a source with a pretraining series. To add a real series,
add a loader to ``_LOADERS`` and a row to the table above with its split.

:func:`generate_synthetic` makes seeded pretraining series (see :class:`SyntheticConfig`).
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from moekit.config import JsonConfig
from moekit.timeseries.data import Series, make_series
from moekit.timeseries.freq import date_range

HOLDOUT = ("co2", "elec_equip", "elnino", "nile", "sunspots")
_MACRO_COLS = (
    "realgdp",
    "realcons",
    "realinv",
    "realgovt",
    "realdpi",
    "cpi",
    "m1",
    "tbilrate",
    "unemp",
    "pop",
    "infl",
    "realint",
)
_DANISH_COLS = ("lrm", "lry", "lpy", "ibo", "ide")
_E6_COLS = ("Dp", "R")
PRETRAIN = (
    *(f"macrodata.{c}" for c in _MACRO_COLS),
    *(f"danish.{c}" for c in _DANISH_COLS),
    *(f"interest_inflation.{c}" for c in _E6_COLS),
)
# Seasonal period (steps) of each real series, as MASE and the seasonal baselines use it.
SEASON_LENGTH = MappingProxyType(
    {"co2": 12, "elec_equip": 12, "elnino": 12, "nile": 1, "sunspots": 1} | dict.fromkeys(PRETRAIN, 4)
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def statsmodels_data_dir() -> Path:
    """The ``statsmodels/datasets`` folder of the installed wheel; ``ValueError`` when absent."""
    spec = importlib.util.find_spec("statsmodels")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the built-in real series are read from statsmodels' wheel: pip install 'moekit[ts]'"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets"
    if not folder.is_dir():
        raise ValueError(f"{folder} is missing: this statsmodels install has no datasets folder")
    return folder


def _table(rel: str) -> tuple[list[str], list[list[str]]]:
    path = statsmodels_data_dir() / rel
    with open(path, encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r]
    return [h.strip() for h in rows[0]], rows[1:]


def _co2() -> list[Series]:
    _, rows = _table("co2/co2.csv")
    by_month: dict[str, list[float]] = {}
    for day, value in rows:
        by_month.setdefault(f"{day[:4]}-{day[4:6]}", [])
        if value.strip():
            by_month[day[:4] + "-" + day[4:6]].append(float(value))
    months = sorted(by_month)
    values = [np.mean(by_month[m]) if by_month[m] else np.nan for m in months]
    return [make_series("co2", values, [f"{m}-01" for m in months], "MS")]


def _elec_equip() -> list[Series]:
    _, rows = _table("elec_equip/elec_equip.csv")
    ds = []
    for label, _ in rows:
        mon, day, year = label.split("-")
        ds.append(f"{year}-{_MONTHS.index(mon) + 1:02d}-{int(day):02d}")
    return [make_series("elec_equip", [v for _, v in rows], ds, "MS")]


def _elnino() -> list[Series]:
    _, rows = _table("elnino/elnino.csv")
    start = np.datetime64(f"{int(float(rows[0][0]))}-01-01", "s")
    values = [v for row in rows for v in row[1:13]]
    return [make_series("elnino", values, date_range(start, "MS", len(values)), "MS")]


def _yearly(name: str, rel: str) -> list[Series]:
    _, rows = _table(rel)
    ds = [f"{int(float(r[0]))}-01-01" for r in rows]
    return [make_series(name, [r[1] for r in rows], ds, "YS")]


def _quarterly(prefix: str, rel: str, cols: tuple[str, ...], period_col: bool) -> list[Series]:
    header, rows = _table(rel)
    if period_col:  # "1974Q1" labels
        ds = [f"{r[0][:4]}-{3 * (int(r[0][5]) - 1) + 1:02d}-01" for r in rows]
    else:  # year, quarter columns
        ds = [f"{int(float(r[0]))}-{3 * (int(float(r[1])) - 1) + 1:02d}-01" for r in rows]
    return [make_series(f"{prefix}.{c}", [r[header.index(c)] for r in rows], ds, "QS") for c in cols]


_LOADERS = {
    "co2": _co2,
    "elec_equip": _elec_equip,
    "elnino": _elnino,
    "nile": lambda: _yearly("nile", "nile/nile.csv"),
    "sunspots": lambda: _yearly("sunspots", "sunspots/sunspots.csv"),
    "macrodata": lambda: _quarterly("macrodata", "macrodata/macrodata.csv", _MACRO_COLS, False),
    "danish": lambda: _quarterly("danish", "danish_data/data.csv", _DANISH_COLS, True),
    "interest_inflation": lambda: _quarterly(
        "interest_inflation", "interest_inflation/E6.csv", _E6_COLS, False
    ),
}


def builtin_names() -> tuple[str, ...]:
    """Every built-in real series name: :data:`HOLDOUT` then :data:`PRETRAIN`."""
    return HOLDOUT + PRETRAIN


def load_builtin(names: str | tuple[str, ...] | list[str] = "holdout") -> list[Series]:
    """Loads real series by name, or ``"holdout"``, ``"pretrain"`` or ``"all"``; keeps the order asked."""
    groups = {"holdout": HOLDOUT, "pretrain": PRETRAIN, "all": HOLDOUT + PRETRAIN}
    wanted = groups[names] if isinstance(names, str) and names in groups else names
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    unknown = [n for n in wanted if n not in SEASON_LENGTH]
    if unknown:
        raise ValueError(
            f"unknown built-in series {unknown}; choose from {list(builtin_names())} or holdout/pretrain/all"
        )
    loaded: dict[str, Series] = {}
    for dataset in dict.fromkeys(n.split(".")[0] for n in wanted):
        loaded.update({s.unique_id: s for s in _LOADERS[dataset]()})
    return [loaded[n] for n in wanted]


@dataclass
class SyntheticConfig(JsonConfig):
    """Parameters of :func:`generate_synthetic` (all ranges are sampled uniformly per series).

    Each series is ``level + scale * (trend + seasonal + noise)`` where
    - ``seasonal`` sums ``num_components`` sinusoids (periods from ``periods``, the first one the
      series' dominant period, each with up to ``num_harmonics`` harmonics of random amplitude);
    - ``trend`` is linear with a slope in ``±trend_max`` per step (relative to the seasonal
      amplitude), with one slope change at a random point with probability ``trend_break_prob``;
    - ``noise`` is AR(1) with coefficient ``ar_coef`` and std in ``noise_range``;
    - regimes: a two-state Markov chain switching with probability ``switch_prob`` per step; the
      second regime multiplies the seasonal amplitude by ``regime_amplitude`` and adds a level
      shift of ``regime_shift``.
    ``level`` and ``scale`` vary over orders of magnitude so per-series normalisation matters.
    """

    num_series: int = 256
    length_range: tuple[int, int] = (256, 1024)
    periods: tuple[int, ...] = (4, 7, 12, 24, 52)
    num_components: tuple[int, int] = (1, 2)
    num_harmonics: int = 2
    trend_max: float = 0.01
    trend_break_prob: float = 0.3
    noise_range: tuple[float, float] = (0.05, 0.3)
    ar_coef: float = 0.5
    switch_prob: float = 0.005
    regime_amplitude: float = 2.0
    regime_shift: float = 1.5
    level_range: tuple[float, float] = (-10.0, 10.0)
    log10_scale_range: tuple[float, float] = (-1.0, 2.0)
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.length_range
        if not 2 <= lo <= hi:
            raise ValueError(f"SyntheticConfig.length_range={self.length_range} must satisfy 2 <= min <= max")
        if self.num_series < 1:
            raise ValueError(f"SyntheticConfig.num_series={self.num_series} must be at least 1")
        if not self.periods or min(self.periods) < 2:
            raise ValueError(f"SyntheticConfig.periods={self.periods} must be non-empty, each at least 2")
        if not 1 <= self.num_components[0] <= self.num_components[1]:
            raise ValueError(
                f"SyntheticConfig.num_components={self.num_components} must satisfy 1 <= min <= max"
            )
        if not 0.0 <= self.switch_prob <= 1.0 or not 0.0 <= self.trend_break_prob <= 1.0:
            raise ValueError("SyntheticConfig.switch_prob and trend_break_prob must lie in [0, 1]")
        if not -1.0 < self.ar_coef < 1.0:
            raise ValueError(
                f"SyntheticConfig.ar_coef={self.ar_coef} must lie in (-1, 1) for stationary noise"
            )


@dataclass(frozen=True, eq=False)
class SyntheticSet:
    """Synthetic series with their labels: ``periods`` (N,) dominant period, ``regimes`` N arrays (T_i,) of 0/1."""

    series: list[Series]
    periods: np.ndarray
    regimes: tuple[np.ndarray, ...] = field(default=())


def _one_synthetic(cfg: SyntheticConfig, index: int) -> tuple[np.ndarray, int, np.ndarray]:
    # One generator per series, seeded by (seed, index): series i does not depend on num_series.
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
    length = int(rng.integers(cfg.length_range[0], cfg.length_range[1] + 1))
    t = np.arange(length, dtype=np.float64)
    count = int(rng.integers(cfg.num_components[0], cfg.num_components[1] + 1))
    chosen = rng.choice(len(cfg.periods), size=min(count, len(cfg.periods)), replace=False)
    seasonal = np.zeros(length)
    for rank, p_idx in enumerate(chosen):
        period = cfg.periods[int(p_idx)]
        weight = 1.0 if rank == 0 else rng.uniform(0.2, 0.6)
        for harmonic in range(1, cfg.num_harmonics + 1):
            amp = weight * (1.0 if harmonic == 1 else rng.uniform(0.0, 0.5))
            seasonal += amp * np.sin(2 * np.pi * harmonic * t / period + rng.uniform(0, 2 * np.pi))
    slope = rng.uniform(-cfg.trend_max, cfg.trend_max)
    trend = slope * t
    if rng.random() < cfg.trend_break_prob:
        brk = int(rng.integers(1, length))
        trend[brk:] += rng.uniform(-cfg.trend_max, cfg.trend_max) * (t[brk:] - brk)
    flips = rng.random(length) < cfg.switch_prob
    regime = (np.cumsum(flips) % 2).astype(np.int64)
    seasonal = seasonal * np.where(regime == 1, cfg.regime_amplitude, 1.0) + cfg.regime_shift * regime
    shocks = rng.normal(0.0, rng.uniform(*cfg.noise_range), size=length)
    noise = np.empty(length)
    noise[0] = shocks[0]
    for i in range(1, length):
        noise[i] = cfg.ar_coef * noise[i - 1] + shocks[i]
    scale = 10.0 ** rng.uniform(*cfg.log10_scale_range)
    values = rng.uniform(*cfg.level_range) * scale + scale * (trend + seasonal + noise)
    return values, cfg.periods[int(chosen[0])], regime


def generate_synthetic(config: SyntheticConfig | None = None) -> SyntheticSet:
    """Seeded synthetic pretraining series (integer ``ds``, freq ``step``), ids ``synthetic.<i>``.

    Deterministic: the same config gives bit-identical series on every machine with the same numpy.
    """
    cfg = config or SyntheticConfig()
    series, periods, regimes = [], [], []
    for i in range(cfg.num_series):
        values, period, regime = _one_synthetic(cfg, i)
        series.append(Series(f"synthetic.{i:05d}", values, np.arange(values.shape[0]), "step"))
        periods.append(period)
        regimes.append(regime)
    return SyntheticSet(series, np.array(periods, dtype=np.int64), tuple(regimes))
