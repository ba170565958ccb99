"""Zero-shot evaluation of trained forecasters on the held-out real series, against the baselines.

Usage (after ``moekit ts-train --preset P --out runs/P`` for each model)::

    python benchmarks/bench_timeseries.py --runs runs/timemoe-small runs/timemoe-small-dense \
        runs/timemoe-small-h1 --horizon 12 --num-origins 2

Prints, per held-out series (``moekit.timeseries.HOLDOUT``), the MASE and CRPS of every model and
of AutoETS/AutoARIMA/SeasonalNaive, the geometric mean of MASE relative to SeasonalNaive, and for
each model its forward calls per forecast and seconds per series. One rolling-origin evaluation
covers all models, so the baselines are fitted once. ``--timing`` adds, per model and held-out
series, the median milliseconds of one single-series forecast call (``Forecaster.predict`` with
and without quantiles; a probabilistic model draws ``num_samples`` paths either way).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import moekit
from moekit.models.forecaster import Forecaster
from moekit.timeseries import (
    DEFAULT_QUANTILES,
    concat_frames,
    crps_from_samples,
    load_builtin,
    plan_horizon,
    rolling_origin_evaluation,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runs", nargs="+", required=True, help="ts-train run folders (the model name is the folder name)"
    )
    p.add_argument("--horizon", type=int, default=12)
    p.add_argument("--num-origins", type=int, default=2)
    p.add_argument("--baselines", default="AutoETS,AutoARIMA,SeasonalNaive")
    p.add_argument("--timing", action="store_true", help="also time one forecast call per series")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    series = load_builtin("holdout")
    forecasters = {Path(r).name: Forecaster(moekit.from_pretrained(r), name=Path(r).name) for r in args.runs}
    seconds = dict.fromkeys(forecasters, 0.0)

    def all_models(histories, horizon, quantiles):
        frames = {}
        for name, f in forecasters.items():
            t0 = time.perf_counter()
            frames[name] = f.predict(histories, horizon, quantiles)
            seconds[name] += time.perf_counter() - t0
        return concat_frames(frames)

    ev = rolling_origin_evaluation(
        series,
        args.horizon,
        all_models,
        num_origins=args.num_origins,
        quantiles=DEFAULT_QUANTILES,
        baselines=[b for b in args.baselines.split(",") if b],
    )
    for metric in ("mase", "crps"):
        table = ev.side_by_side(metric)
        print(f"\n{metric.upper()} (horizon {args.horizon}, mean over {args.num_origins} origins)")
        print(" | ".join(["series", *table.names[1:]]))
        for i, uid in enumerate(table["unique_id"]):
            print(" | ".join([str(uid), *(f"{table[n][i]:.3f}" for n in table.names[1:])]))
    s = ev.summary
    print("\nmodel | mean MASE | mean CRPS | geomean MASE rel. SeasonalNaive")
    for i, m in enumerate(s["model"]):
        print(f"{m} | {s['mase'][i]:.3f} | {s['crps'][i]:.3f} | {s['relative_mase'][i]:.3f}")
    print("\nmodel | forward calls per forecast | seconds per series (incl. 3 backtests for quantiles)")
    per_series = len(series) * args.num_origins
    for name, f in forecasters.items():
        calls = _calls(f, args.horizon)
        print(f"{name} | {calls} | {seconds[name] / per_series:.3f}")
    # The long-horizon point comparison without quantiles: MASE against the number of calls.
    long_h = 4 * args.horizon
    ev_long = rolling_origin_evaluation(
        series, long_h, all_models, num_origins=1, quantiles=(), baselines=["SeasonalNaive"]
    )
    print(f"\nhorizon {long_h}: model | forward calls | geomean MASE rel. SeasonalNaive | mean MASE")
    s = ev_long.summary
    for i, m in enumerate(s["model"]):
        calls = _calls(forecasters[m], long_h) if m in forecasters else "-"
        print(f"{m} | {calls} | {s['relative_mase'][i]:.3f} | {np.round(s['mase'][i], 3)}")

    print_sample_crps(forecasters, series, args.horizon, args.num_origins)
    if args.timing:
        print_timing(forecasters, series, args.horizon)


def print_sample_crps(forecasters: dict, series: list, horizon: int, num_origins: int) -> None:
    """Exact CRPS of a probabilistic model's sample paths, at the rolling origins' cuts (mean over them)."""
    sampled = {n: f for n, f in forecasters.items() if hasattr(f.model, "forecast_samples")}
    if not sampled:
        return
    print(f"\nCRPS from sample paths (exact, empirical), horizon {horizon}, mean over {num_origins} origins")
    print(" | ".join(["series", *sampled]))
    scores = {n: np.zeros(len(series)) for n in sampled}
    for k in range(num_origins):
        cuts = [len(s) - horizon - k * horizon for s in series]
        actual = np.stack([s.values[c : c + horizon] for s, c in zip(series, cuts, strict=True)])
        for n, f in sampled.items():
            paths = f.model.forecast_samples(
                [s.values[:c] for s, c in zip(series, cuts, strict=True)], horizon, f.num_samples
            )
            scores[n] += crps_from_samples(actual, paths) / num_origins
    for i, s in enumerate(series):
        print(" | ".join([s.unique_id, *(f"{scores[n][i]:.3f}" for n in sampled)]))


def _calls(f: Forecaster, horizon: int) -> int | str:
    """Forward calls of one point forecast (Time-MoE's head plan; '-' for a family without one)."""
    horizons = getattr(f.model.config, "horizons", None)
    return len(plan_horizon(horizon, horizons)) if horizons else "-"


def print_timing(forecasters: dict, series: list, horizon: int, repeats: int = 5) -> None:
    """Median ms of one single-series ``predict`` call, per model and series (after one warm-up)."""
    print(
        f"\nms per forecast call, one series, horizon {horizon} (median of {repeats}): point | with quantiles"
    )
    print(" | ".join(["series", *forecasters]))
    for s in series:
        cells = []
        for f in forecasters.values():
            f.predict([s], horizon)
            times = []
            for quantiles in ((), DEFAULT_QUANTILES):
                runs = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    f.predict([s], horizon, quantiles)
                    runs.append(1e3 * (time.perf_counter() - t0))
                times.append(float(np.median(runs)))
            cells.append(f"{times[0]:.1f} / {times[1]:.1f}")
        print(" | ".join([s.unique_id, *cells]))


if __name__ == "__main__":
    main()
