"""``moekit forecast``: forecast every series of a file with a trained forecaster, to a long CSV."""

from __future__ import annotations

import argparse
import sys

HELP = "Forecast series from a CSV/JSONL file with a forecaster; writes unique_id,ds,mean[,q...] CSV."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    from moekit.cli._forecast import add_input_arguments

    add_input_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE.csv", help="where to write the forecast frame")
    p.add_argument("--plot", metavar="FILE.png", help="also draw history, forecast and interval")
    p.add_argument(
        "--quantiles",
        metavar="Q,Q,...",
        help="quantile levels, e.g. 0.1,0.5,0.9 (point models: residual-based intervals from backtests)",
    )


def run(args: argparse.Namespace) -> int:
    """Reads, forecasts, writes; prints one line per output file."""
    from moekit.cli._forecast import load_forecaster, parse_quantiles, read_input

    if args.horizon < 1:
        raise ValueError(f"--horizon {args.horizon}: must be at least 1")
    quantiles = parse_quantiles(args.quantiles)
    series = read_input(args.input, args.format, args.freq)
    forecaster = load_forecaster(args.model)
    frame = forecaster.predict(series, args.horizon, quantiles)
    frame.to_csv(args.out)
    print(f"wrote {args.out}: {len(series)} series x {args.horizon} steps", file=sys.stderr)
    if args.plot:
        from moekit.timeseries import plot_forecasts

        plot_forecasts(series, frame, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
