"""``moekit ts-eval``: rolling-origin evaluation of a forecaster against statsforecast baselines."""

from __future__ import annotations

import argparse

HELP = (
    "Rolling-origin evaluation of a forecaster vs AutoETS/AutoARIMA/SeasonalNaive/Naive (MASE, sMAPE, CRPS)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the verb's flags."""
    from moekit.cli._forecast import add_input_arguments

    add_input_arguments(p)
    p.add_argument(
        "--num-origins", type=int, default=3, help="cut points, each one horizon apart (default 3)"
    )
    p.add_argument(
        "--season-length", type=int, help="season for MASE and the baselines (default: from the frequency)"
    )
    p.add_argument(
        "--baselines",
        default="AutoETS,AutoARIMA,SeasonalNaive,Naive",
        help="comma-separated statsforecast models (SeasonalNaive is the MASE reference)",
    )
    p.add_argument(
        "--quantiles",
        default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
        help="levels for CRPS/WQL ('' for point metrics only)",
    )
    p.add_argument(
        "--out", metavar="FILE.csv", help="also write the per-series table (one row per series and model)"
    )


def format_table(columns: dict[str, list], floatfmt: str = "{:.3f}") -> str:
    """A plain-text table: a header line and one line per row, columns padded to their widths."""
    cells = {
        k: [floatfmt.format(v) if isinstance(v, float) else str(v) for v in vals]
        for k, vals in columns.items()
    }
    widths = {k: max(len(k), *(len(c) for c in cs)) for k, cs in cells.items()}
    rows = [" ".join(k.ljust(widths[k]) for k in cells)]
    for i in range(len(next(iter(cells.values())))):
        rows.append(" ".join(cells[k][i].ljust(widths[k]) for k in cells))
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """Evaluates and prints MASE and sMAPE side by side, then the summary with the relative MASE."""
    from moekit.cli._forecast import load_forecaster, parse_quantiles, read_input
    from moekit.timeseries import BASELINE_MODELS, rolling_origin_evaluation

    if args.horizon < 1:
        raise ValueError(f"--horizon {args.horizon}: must be at least 1")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINE_MODELS]
    if unknown:
        raise ValueError(f"--baselines: unknown {unknown}; choose from {list(BASELINE_MODELS)}")
    quantiles = parse_quantiles(args.quantiles)
    series = read_input(args.input, args.format, args.freq)
    forecaster = load_forecaster(args.model)
    ev = rolling_origin_evaluation(
        series,
        args.horizon,
        forecaster,
        name=forecaster.name,
        season_length=args.season_length,
        num_origins=args.num_origins,
        quantiles=quantiles,
        baselines=baselines,
    )
    for metric in ("mase", "smape", "crps"):
        table = ev.side_by_side(metric)
        print(f"{metric.upper()} per series (mean over {args.num_origins} origins, horizon {args.horizon})")
        print(format_table({name: table[name].tolist() for name in table.names}))
        print()
    s = ev.summary
    print("summary (mean over series; relative_mase = geometric mean of MASE / SeasonalNaive's)")
    print(
        format_table({name: s[name].tolist() for name in ("model", "mase", "smape", "crps", "relative_mase")})
    )
    if args.out:
        ev.per_series.to_csv(args.out)
        print(f"\nwrote {args.out}")
    return 0
