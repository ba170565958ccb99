"""moekit.timeseries: readers and validation, frequencies, built-in data, windows, horizon plans,
metrics against independent implementations, forecast frames, baselines and rolling origins."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import moekit.timeseries as ts
from moekit.timeseries import metrics
from moekit.timeseries.freq import grid_positions, parse_freq

# ---------------------------------------------------------------- readers and validation


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_read_long_csv_sorts_rows_infers_freq_and_continues_ds(tmp_path):
    path = _write(
        tmp_path,
        "long.csv",
        "unique_id,ds,y\nb,2020-03-01,3\na,2021-01-31,1\nb,2020-01-01,1\na,2021-02-28,2\nb,2020-02-01,2\na,2021-03-31,3\n",
    )
    series = ts.read_long(path)
    assert [s.unique_id for s in series] == ["b", "a"]
    b, a = series
    assert b.freq == "MS" and a.freq == "ME"
    np.testing.assert_array_equal(b.values, [1.0, 2.0, 3.0])
    assert b.future_ds(2).tolist() == np.array(["2020-04-01", "2020-05-01"], "datetime64[s]").tolist()
    assert a.future_ds(2).tolist() == np.array(["2021-04-30", "2021-05-31"], "datetime64[s]").tolist()


def test_read_long_integer_ds_keeps_its_step(tmp_path):
    path = _write(tmp_path, "int.csv", "unique_id,ds,y\nx,10,1\nx,12,2\nx,14,4\n")
    (s,) = ts.read_long(path)
    assert s.freq == "2step" and s.ds.dtype == np.int64
    assert s.future_ds(3).tolist() == [16, 18, 20]


def test_read_long_dataframe_matches_csv(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        {
            "unique_id": ["u"] * 4 + ["v"] * 3,
            "ds": pd.to_datetime(
                [
                    "2020-01-01",
                    "2020-01-02",
                    "2020-01-03",
                    "2020-01-04",
                    "2020-01-01",
                    "2020-01-02",
                    "2020-01-03",
                ]
            ),
            "y": [1.0, 2.0, np.nan, 4.0, 5.0, 5.0, 5.0],
        }
    )
    from_df = ts.read_long(df)
    path = ts.write_long(from_df, tmp_path / "back.csv")
    from_csv = ts.read_long(path)
    for x, y in zip(from_df, from_csv):
        assert x.unique_id == y.unique_id and x.freq == y.freq == "D"
        np.testing.assert_array_equal(x.values, y.values)
        np.testing.assert_array_equal(x.ds, y.ds)
    np.testing.assert_allclose(from_df[0].values, [1, 2, 3, 4])
    back = ts.to_pandas_long(from_df)
    assert list(back.columns) == ["unique_id", "ds", "y"] and len(back) == 7


def test_missing_values_interpolated_trimmed_or_rejected(tmp_path):
    text = "ds,s1,s2\n2020-01-01,,1\n2020-01-02,1,\n2020-01-03,,3\n2020-01-04,5,4\n2020-01-05,,5\n"
    s1, s2 = ts.read_wide(_write(tmp_path, "w.csv", text))
    np.testing.assert_allclose(s1.values, [1.0, 3.0, 5.0])  # leading/trailing blanks trimmed
    assert str(s1.ds[0])[:10] == "2020-01-02" and str(s1.ds[-1])[:10] == "2020-01-04"
    np.testing.assert_allclose(s2.values, [1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError) as err:
        ts.read_wide(_write(tmp_path, "w.csv", text), missing="reject")
    _one_line_error(err, "'s1'", "missing value", "2020-01-03")
    with pytest.raises(ValueError) as err:
        ts.make_series("empty", [None, "", "nan"])
    _one_line_error(err, "'empty'", "no observed value")


def test_gaps_in_timestamps_become_missing_values(tmp_path):
    path = _write(
        tmp_path,
        "gap.csv",
        "unique_id,ds,y\ng,2020-01-01 00:00,0\ng,2020-01-01 01:00,1\ng,2020-01-01 04:00,4\n",
    )
    (s,) = ts.read_long(path)
    assert s.freq == "h" and len(s) == 5
    np.testing.assert_allclose(s.values, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError) as err:
        ts.read_long(path, missing="reject")
    _one_line_error(err, "'g'", "2 missing", "2020-01-01 02:00:00")


def test_constant_series_is_kept_and_normalises_to_zero():
    s = ts.make_series("flat", [7.0] * 10)
    scale = ts.fit_scale(s.values)
    assert scale.scale.item() == 1.0 and scale.loc.item() == 7.0
    np.testing.assert_array_equal(scale.apply(s.values), np.zeros(10))
    np.testing.assert_array_equal(scale.invert(scale.apply(s.values)), s.values)


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (
            {"unique_id": "short", "values": [1, 2], "min_length": 5},
            ("'short'", "2 observations", "at least 5"),
        ),
        (
            {"unique_id": "dup", "values": [1, 2], "ds": ["2020-01-01", "2020-01-01"]},
            ("'dup'", "more than once"),
        ),
        ({"unique_id": "irr", "values": [1, 2, 3], "ds": [0, 2, 5]}, ("'irr'", "irregular")),
        ({"unique_id": "txt", "values": [1, "abc"]}, ("'txt'", "'abc'", "not a number")),
        ({"unique_id": "sparse", "values": [1, 2, 3], "ds": [0, 1, 10]}, ("'sparse'", "only 3 of 11")),
        ({"unique_id": "inf", "values": [1, float("inf")]}, ("'inf'", "inf")),
        ({"unique_id": "bad", "values": [1, 2], "ds": ["2020-01-01", "someday"]}, ("'bad'", "someday")),
        ({"unique_id": "x", "values": [1, 2], "missing": "drop"}, ("missing='drop'",)),
    ],
)
def test_bad_inputs_raise_one_line_errors_naming_the_series(kwargs, needles):
    with pytest.raises(ValueError) as err:
        ts.make_series(**kwargs)
    _one_line_error(err, *needles)


def test_read_long_without_required_columns(tmp_path):
    with pytest.raises(ValueError) as err:
        ts.read_long(_write(tmp_path, "bad.csv", "id,time,value\na,1,2\n"))
    _one_line_error(err, "missing ['unique_id', 'ds', 'y']")
    with pytest.raises(ValueError) as err:
        ts.read_long(_write(tmp_path, "ragged.csv", "unique_id,ds,y\na,1,2\na,2\n"))
    _one_line_error(err, "line 3", "2 fields")


def test_read_wide_without_time_column_uses_integer_steps(tmp_path):
    a, b = ts.read_wide(_write(tmp_path, "w.csv", "a,b\n1,10\n2,20\n3,\n"))
    assert a.ds is None and a.future_ds(2).tolist() == [3, 4]
    assert len(b) == 2 and b.future_ds(1).tolist() == [2]


def test_read_jsonl_and_its_errors(tmp_path):
    lines = [
        {"sequence": [1.0, 2.0, None, 4.0]},
        {"unique_id": "named", "sequence": [5, 6, 7], "start": "2021-01-01", "freq": "D"},
    ]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    first, named = ts.read_jsonl(path)
    assert first.unique_id == "series_0" and first.ds is None
    np.testing.assert_allclose(first.values, [1, 2, 3, 4])
    assert named.freq == "D" and str(named.future_ds(1)[0])[:10] == "2021-01-04"
    bad_lines = {
        '{"sequence": [1, 2]}\n{"sequence": [1, 2\n': ("line 2", "not valid JSON"),
        '{"sequence": [1]}\n\n{"values": [1]}\n': ("line 3", '"sequence" list'),
        '{"sequence": [1, "x"]}\n': ("line 1", "numbers or null"),
        '{"sequence": [1, 2], "start": "2020-01-01"}\n': ("line 1", '"freq"'),
        '{"sequence": [1]}\n': ("line 1", "at least 3"),
    }
    for text, needles in bad_lines.items():
        with pytest.raises(ValueError) as err:
            ts.read_jsonl(_write(tmp_path, "bad.jsonl", text), min_length=3 if "at least 3" in needles else 1)
        _one_line_error(err, "bad.jsonl", *needles)


def test_read_series_dispatches_on_format(tmp_path):
    long = _write(tmp_path, "l.csv", "unique_id,ds,y\na,0,1\na,1,2\n")
    wide = _write(tmp_path, "w.csv", "date,a\n2020-01-01,1\n2020-02-01,2\n")
    jl = _write(tmp_path, "j.jsonl", '{"sequence": [1, 2]}\n')
    assert ts.read_series(long)[0].freq == "step"
    assert ts.read_series(wide)[0].freq == "MS"
    assert ts.read_series(jl)[0].unique_id == "series_0"
    with pytest.raises(ValueError) as err:
        ts.read_series(tmp_path / "nope.csv")
    _one_line_error(err, "no such file")


# ---------------------------------------------------------------- frequencies


@pytest.mark.parametrize(
    ("points", "freq", "following"),
    [
        (["2020-01-01", "2020-01-02", "2020-01-03"], "D", ["2020-01-04", "2020-01-05"]),
        (["2020-01-01T00:00", "2020-01-01T00:15"], "15min", ["2020-01-01T00:30", "2020-01-01T00:45"]),
        (["2020-01-04", "2020-01-11"], "W", ["2020-01-18", "2020-01-25"]),
        (["2020-01-01T06:00", "2020-01-01T12:00"], "6h", ["2020-01-01T18:00", "2020-01-02T00:00"]),
        (["2020-01-31", "2020-02-29", "2020-03-31"], "ME", ["2020-04-30", "2020-05-31"]),
        (["2020-01-15", "2020-02-15"], "MS", ["2020-03-15", "2020-04-15"]),
        (["2020-01-01", "2020-03-01"], "2MS", ["2020-05-01", "2020-07-01"]),
        (["2019-10-01", "2020-01-01"], "QS", ["2020-04-01", "2020-07-01"]),
        (["2019-12-31", "2020-03-31"], "QE", ["2020-06-30", "2020-09-30"]),
        (["2018-01-01", "2019-01-01"], "YS", ["2020-01-01", "2021-01-01"]),
        (["2016-02-29", "2017-02-28"], "YE", ["2018-02-28", "2019-02-28"]),
    ],
)
def test_infer_freq_and_continue(points, freq, following):
    ds = np.array(points, dtype="datetime64[s]")
    assert ts.infer_freq(ds) == freq
    np.testing.assert_array_equal(ts.continue_ds(ds[-1], freq, 2), np.array(following, dtype="datetime64[s]"))
    np.testing.assert_array_equal(grid_positions(ds, freq), np.arange(len(ds)))


def test_freq_helpers():
    assert ts.infer_freq(np.array([3, 6, 12])) == "3step"
    assert ts.infer_freq(np.array([0, 2, 3])) == "step"  # a gap at 1
    assert ts.infer_freq(np.array([0, 2, 5])) is None
    assert ts.infer_freq(np.array(["2020-01-01"], dtype="datetime64[s]")) is None
    assert [ts.season_length_for(f) for f in ("MS", "QS", "YS", "h", "6h", "5h", "D", "W", "step", None)] == [
        12,
        4,
        1,
        24,
        4,
        1,
        7,
        52,
        1,
        1,
    ]
    assert parse_freq("15min") == (15, "min")
    with pytest.raises(ValueError, match="not valid"):
        parse_freq("fortnight")


# ---------------------------------------------------------------- built-in data

_TABLE = {
    "co2": ("MS", 526),
    "elec_equip": ("MS", 257),
    "elnino": ("MS", 732),
    "nile": ("YS", 100),
    "sunspots": ("YS", 309),
}


def test_builtin_real_series_match_the_documented_table():
    pytest.importorskip("statsmodels")
    series = ts.load_builtin("all")
    by_id = {s.unique_id: s for s in series}
    assert set(by_id) == set(ts.HOLDOUT) | set(ts.PRETRAIN)
    for name, (freq, length) in _TABLE.items():
        assert (by_id[name].freq, len(by_id[name])) == (freq, length), name
    assert {(s.freq, len(s)) for n, s in by_id.items() if n.startswith("macrodata.")} == {("QS", 203)}
    assert len(by_id["danish.lrm"]) == 55 and len(by_id["interest_inflation.R"]) == 107
    assert all(np.isfinite(s.values).all() for s in series)
    held_sources = {n.split(".")[0] for n in ts.HOLDOUT}
    assert held_sources.isdisjoint(n.split(".")[0] for n in ts.PRETRAIN)
    assert str(by_id["co2"].future_ds(1)[0])[:7] == "2002-01"
    with pytest.raises(ValueError, match="unknown built-in"):
        ts.load_builtin(["airline"])


def test_synthetic_is_seeded_and_independent_of_count():
    cfg = ts.SyntheticConfig(num_series=4, length_range=(64, 128), seed=3)
    a, b = ts.generate_synthetic(cfg), ts.generate_synthetic(cfg)
    for x, y in zip(a.series, b.series):
        np.testing.assert_array_equal(x.values, y.values)
    more = ts.generate_synthetic(cfg.replace(num_series=6))
    np.testing.assert_array_equal(more.series[3].values, a.series[3].values)
    other = ts.generate_synthetic(cfg.replace(seed=4))
    assert not np.array_equal(other.series[0].values[:64], a.series[0].values[:64])
    assert all(64 <= len(s) <= 128 for s in a.series) and set(a.periods) <= set(cfg.periods)
    assert ts.SyntheticConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="ar_coef"):
        ts.SyntheticConfig(ar_coef=1.0)


def test_synthetic_regimes_switch_the_amplitude():
    cfg = ts.SyntheticConfig(
        num_series=1, length_range=(4000, 4000), switch_prob=0.01, noise_range=(0.0, 0.0), trend_max=0.0
    )
    data = ts.generate_synthetic(cfg)
    regime = data.regimes[0]
    assert 0 < regime.mean() < 1
    diffs = np.abs(np.diff(data.series[0].values))
    assert diffs[regime[1:] == 1].mean() > 1.5 * diffs[regime[1:] == 0].mean()


# ---------------------------------------------------------------- normalisation and windows


@pytest.mark.parametrize("method", ["std", "robust"])
def test_scale_round_trip(method):
    rng = np.random.default_rng(0)
    x = rng.normal(50.0, 20.0, size=(3, 40)) * np.array([[1e-3], [1.0], [1e4]])
    mask = rng.random((3, 40)) > 0.2
    scale = ts.fit_scale(x, method, mask)
    z = scale.apply(x)
    np.testing.assert_allclose(scale.invert(z), x, rtol=1e-13, atol=0)
    if method == "std":
        np.testing.assert_allclose([z[i, mask[i]].mean() for i in range(3)], 0.0, atol=1e-12)
        np.testing.assert_allclose([z[i, mask[i]].std() for i in range(3)], 1.0, rtol=1e-12)
    else:
        np.testing.assert_allclose(scale.loc[:, 0], [np.median(x[i, mask[i]]) for i in range(3)])
    samples = rng.normal(size=(3, 5, 7))
    np.testing.assert_allclose(scale.expand().invert(samples)[1], samples[1] * scale.scale[1] + scale.loc[1])


def _reference_windows(values, context_length, horizons, stride):
    out = []
    for i, x in enumerate(values):
        t_len = len(x)
        ends = list(range(context_length, t_len, stride)) if t_len - 1 > context_length else []
        if not ends or ends[-1] != t_len - 1:
            ends.append(t_len - 1)
        for end in ends:
            ctx = [x[p] if p >= 0 else 0.0 for p in range(end - context_length, end)]
            cmask = [p >= 0 for p in range(end - context_length, end)]
            tg, tm = [], []
            for h in horizons:
                rows_t, rows_m = [], []
                for p in range(end - context_length, end):
                    valid = [p >= 0 and p + 1 + j < t_len for j in range(h)]
                    rows_t.append([x[p + 1 + j] if v else 0.0 for j, v in enumerate(valid)])
                    rows_m.append(valid)
                tg.append(rows_t)
                tm.append(rows_m)
            out.append((i, end, ctx, cmask, tg, tm))
    return out


def test_windows_match_brute_force_with_unsorted_horizons():
    rng = np.random.default_rng(1)
    values = [rng.normal(size=n) for n in (2, 5, 9, 23, 40)]
    for context_length, horizons, stride in [(8, (8, 1, 3), 4), (4, (1,), 4), (6, (5, 2), 1)]:
        w = ts.make_windows(values, context_length, horizons, stride)
        ref = _reference_windows(values, context_length, horizons, stride)
        assert w.context.shape == (len(ref), context_length) and w.horizons == horizons
        for b, (i, end, ctx, cmask, tg, tm) in enumerate(ref):
            assert (w.series_index[b], w.end[b]) == (i, end)
            np.testing.assert_array_equal(w.context[b], ctx)
            np.testing.assert_array_equal(w.context_mask[b], cmask)
            for k in range(len(horizons)):
                np.testing.assert_array_equal(w.targets[k][b], tg[k])
                np.testing.assert_array_equal(w.target_masks[k][b], tm[k])


def test_labels_past_the_end_are_masked():
    x = np.arange(10.0)
    w = ts.make_windows([x], context_length=9, horizons=(4, 1))
    assert w.end.tolist() == [9]
    np.testing.assert_array_equal(w.context[0], x[:9])
    t4, m4 = w.targets[0][0], w.target_masks[0][0]
    np.testing.assert_array_equal(t4[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(m4[6], [True, True, True, False])
    np.testing.assert_array_equal(m4[8], [True, False, False, False])
    np.testing.assert_array_equal(t4[8], [9, 0, 0, 0])
    np.testing.assert_array_equal(w.targets[1][0][:, 0], x[1:10])
    assert w.target_masks[1].all()
    short = ts.make_windows([np.array([1.0, 2.0, 3.0])], context_length=5, horizons=(2,))
    np.testing.assert_array_equal(short.context_mask[0], [False, False, False, True, True])
    np.testing.assert_array_equal(
        short.target_masks[0][0], [[False, False]] * 3 + [[True, True], [True, False]]
    )
    with pytest.raises(ValueError, match="duplicate"):
        ts.make_windows([x], 4, (1, 1))


# ---------------------------------------------------------------- horizon decomposition


def _min_calls(horizon, heads):
    best = [0] + [math.inf] * horizon
    for n in range(1, horizon + 1):
        best[n] = min(best[n - h] + 1 for h in heads if h <= n)
    return best[horizon]


@pytest.mark.parametrize("heads", [(1, 8, 32, 64), (64, 1, 32, 8), (5, 1, 3), (12, 4, 1, 2)])
def test_horizon_plan_any_horizon_any_order(heads):
    for horizon in range(0, 150):
        plan = ts.plan_horizon(horizon, heads)
        assert sum(k for _, k in plan) == horizon
        remaining = horizon
        for head, kept in plan:
            assert head == max(h for h in heads if h <= remaining) and kept == head
            remaining -= kept
        for perm in itertools.islice(itertools.permutations(heads), 6):
            assert ts.plan_horizon(horizon, perm) == plan
        if heads in ((1, 8, 32, 64), (64, 1, 32, 8)):  # each head divides the next: greedy is optimal
            assert len(plan) == _min_calls(horizon, heads)
    assert ts.plan_horizon(97, (64, 8, 32, 1)) == [(64, 64), (32, 32), (1, 1)]


def test_horizon_plan_without_a_fitting_head_truncates_the_last_call():
    assert ts.plan_horizon(5, (8, 3)) == [(3, 3), (3, 2)]
    assert ts.plan_horizon(2, (32, 8)) == [(8, 2)]
    with pytest.raises(ValueError, match="duplicate"):
        ts.plan_horizon(4, (1, 4, 4))


# ---------------------------------------------------------------- metrics

_RNG = np.random.default_rng(7)
_N, _H, _T = 3, 6, 30
_INSAMPLE = np.cumsum(_RNG.normal(size=(_N, _T)), axis=1) + 20.0
_Y = _INSAMPLE[:, -1:] + np.cumsum(_RNG.normal(size=(_N, _H)), axis=1)
_YHAT = _Y + _RNG.normal(scale=0.7, size=(_N, _H))
_LEVELS = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
_Q = _YHAT[:, None, :] + np.array([-1.3, -0.6, 0.0, 0.6, 1.3])[None, :, None] * _RNG.uniform(
    0.5, 1.5, size=(_N, 1, _H)
)


def test_metrics_match_gluonts():
    gm = pytest.importorskip("gluonts.evaluation.metrics")
    ours_mase = metrics.mase(_Y, _YHAT, list(_INSAMPLE), 4)
    ours_smape = metrics.smape(_Y, _YHAT)
    ours_wql = metrics.wql(_Y, _Q, _LEVELS)
    for i in range(_N):
        scale = gm.calculate_seasonal_error(_INSAMPLE[i], seasonality=4)
        assert ours_mase[i] == pytest.approx(gm.mase(_Y[i], _YHAT[i], scale), rel=1e-12)
        assert ours_smape[i] == pytest.approx(100.0 * gm.smape(_Y[i], _YHAT[i]), rel=1e-12)
        ql = sum(gm.quantile_loss(_Y[i], _Q[i, k], q) for k, q in enumerate(_LEVELS))
        assert ours_wql[i] == pytest.approx(ql / (len(_LEVELS) * np.abs(_Y[i]).sum()), rel=1e-12)
    total = sum(gm.quantile_loss(_Y.ravel(), _Q[:, k].ravel(), q) for k, q in enumerate(_LEVELS))
    assert metrics.wql(_Y, _Q, _LEVELS, per_series=False) == pytest.approx(
        total / (len(_LEVELS) * np.abs(_Y).sum()), rel=1e-12
    )


def test_metrics_match_utilsforecast():
    pd = pytest.importorskip("pandas")
    losses = pytest.importorskip("utilsforecast.losses")
    ids = np.repeat([f"s{i}" for i in range(_N)], _H)
    df = pd.DataFrame(
        {"unique_id": ids, "ds": np.tile(np.arange(_T, _T + _H), _N), "y": _Y.ravel(), "m": _YHAT.ravel()}
    )
    qcols = [f"m-q{q}" for q in _LEVELS]
    for k, c in enumerate(qcols):
        df[c] = _Q[:, k, :].ravel()
    train = pd.DataFrame(
        {
            "unique_id": np.repeat(df["unique_id"].unique(), _T),
            "ds": np.tile(np.arange(_T), _N),
            "y": _INSAMPLE.ravel(),
        }
    )
    ref_mase = losses.mase(df, ["m"], seasonality=4, train_df=train).set_index("unique_id")["m"].to_numpy()
    ref_smape = losses.smape(df, ["m"]).set_index("unique_id")["m"].to_numpy()
    ref_crps = losses.scaled_crps(df, {"m": qcols}, _LEVELS).set_index("unique_id")["m"].to_numpy()
    ref_mq = losses.mqloss(df, {"m": qcols}, _LEVELS).set_index("unique_id")["m"].to_numpy()
    np.testing.assert_allclose(metrics.mase(_Y, _YHAT, list(_INSAMPLE), 4), ref_mase, rtol=1e-12)
    np.testing.assert_allclose(metrics.smape(_Y, _YHAT), 200.0 * ref_smape, rtol=1e-12)
    np.testing.assert_allclose(metrics.wql(_Y, _Q, _LEVELS), ref_crps, rtol=1e-9)
    np.testing.assert_allclose(metrics.crps_from_quantiles(_Y, _Q, _LEVELS), 2.0 * ref_mq, rtol=1e-12)


def test_crps_from_samples_matches_pairwise_and_normal_closed_form():
    rng = np.random.default_rng(3)
    samples = rng.normal(size=(2, 50, 3)) * 2.0 + 1.0
    y = rng.normal(size=(2, 3))
    ref = np.zeros(2)
    for n in range(2):
        for t in range(3):
            x = samples[n, :, t]
            ref[n] += np.abs(x - y[n, t]).mean() - 0.5 * np.abs(x[:, None] - x[None, :]).mean()
    np.testing.assert_allclose(metrics.crps_from_samples(y, samples), ref / 3, rtol=1e-12)
    # A large sample of N(0, 1) at y: CRPS = z(2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi).
    z = 0.7
    big = np.sort(rng.normal(size=(1, 100000, 1)), axis=1)
    exact = (
        z * math.erf(z / math.sqrt(2))
        + 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        - 1 / math.sqrt(math.pi)
    )
    assert metrics.crps_from_samples(np.array([[z]]), big)[0] == pytest.approx(exact, abs=5e-3)


def test_relative_geomean_and_undefined_scales():
    scores = {"SeasonalNaive": np.array([1.0, 2.0, 4.0, 1.0]), "m": np.array([0.5, 4.0, 2.0, np.nan])}
    out = metrics.relative_geomean(scores)
    assert out["SeasonalNaive"] == 1.0
    assert out["m"] == pytest.approx((0.5 * 2.0 * 0.5) ** (1 / 3), rel=1e-12)
    flat = metrics.mase(np.ones((1, 3)), np.zeros((1, 3)), [np.ones(10)], 1)
    assert np.isnan(flat[0])
    with pytest.raises(ValueError, match="more than 12"):
        metrics.mase(np.ones((1, 3)), np.zeros((1, 3)), [np.arange(12.0)], 12)
    assert metrics.smape(np.zeros((1, 2)), np.zeros((1, 2)))[0] == 0.0


# ---------------------------------------------------------------- forecast frame


def test_forecast_frame_from_samples_csv_and_plot(tmp_path):
    series = [
        ts.make_series(
            "m",
            np.arange(24.0),
            np.array("2020-01-01", "datetime64[s]") + np.arange(24) * np.timedelta64(1, "h"),
        ),
        ts.make_series("n", [1.0, 2.0, 3.0]),
    ]
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(2, 200, 4)) + np.array([[24.0], [3.0]])[:, :, None]
    frame = ts.frame_from_samples(series, samples, levels=(0.9, 0.1, 0.5))
    assert frame.names == ["unique_id", "ds", "mean", "q0.1", "q0.5", "q0.9"] and len(frame) == 8
    assert str(frame["ds"][0]) == "2020-01-02T00:00:00" and frame["ds"][4:].tolist() == [3, 4, 5, 6]
    mean, q, levels = frame.arrays()
    np.testing.assert_allclose(mean, samples.mean(axis=1))
    np.testing.assert_allclose(q[:, 2], np.quantile(samples, 0.9, axis=1))
    assert levels == (0.1, 0.5, 0.9) and np.all(np.diff(q, axis=1) >= 0)
    back = ts.read_table_csv(frame.to_csv(tmp_path / "f.csv"))
    assert back.names == frame.names and back["ds"][0] == "2020-01-02"
    np.testing.assert_allclose(back["q0.9"], frame["q0.9"], rtol=0, atol=0)
    png = ts.plot_forecasts(series, frame, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"expected \(N, Q, H\)"):
        ts.forecast_frame(series, mean, q[:, :2], levels)


# ---------------------------------------------------------------- baselines and rolling origins


def _seasonal(uid, cycles=8, pattern=(1.0, 5.0, 2.0, 8.0)):
    ds = np.array("2015-01-01", "datetime64[s]").astype("datetime64[M]")
    stamps = (ds + np.arange(cycles * len(pattern))).astype("datetime64[s]")
    return ts.make_series(uid, np.tile(pattern, cycles), stamps)


def test_seasonal_naive_is_exact_on_a_seasonal_series():
    pytest.importorskip("statsforecast")
    series = [_seasonal("a"), _seasonal("b", pattern=(3.0, 1.0, 4.0, 1.0))]
    frame = ts.baseline_forecasts(series, 6, season_length=4, quantiles=(0.1, 0.5, 0.9))
    assert frame.models() == list(ts.BASELINE_MODELS)
    snaive = frame.for_model("SeasonalNaive")
    mean, q, _ = snaive.arrays(["a", "b"])
    np.testing.assert_allclose(mean, [[1, 5, 2, 8, 1, 5], [3, 1, 4, 1, 3, 1]], atol=1e-9)
    np.testing.assert_allclose(q[:, 0], mean, atol=1e-6)  # no residuals: a zero-width interval
    assert str(snaive["ds"][0])[:10] == "2017-09-01"
    naive, _, _ = frame.for_model("Naive").arrays(["a", "b"])
    np.testing.assert_allclose(naive, [[8.0] * 6, [1.0] * 6])
    for model in ("AutoETS", "AutoARIMA"):
        m, qq, _ = frame.for_model(model).arrays(["a", "b"])
        assert np.isfinite(m).all() and np.all(qq[:, 0] <= qq[:, 2] + 1e-9)


def test_a_failing_baseline_is_named_with_its_series():
    pytest.importorskip("statsforecast")
    good = ts.make_series("ok", np.sin(np.arange(40.0)))
    with pytest.raises(ValueError) as err:
        ts.baseline_forecasts(
            [good, ts.make_series("tiny", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])], 3, 4, models=("Naive", "AutoETS")
        )
    _one_line_error(err, "AutoETS", "'tiny'", "6 values")


def test_rolling_origin_evaluation_shapes_and_a_hand_written_forecaster():
    pytest.importorskip("statsforecast")
    rng = np.random.default_rng(5)
    series = [
        ts.make_series(s.unique_id, s.values + rng.normal(scale=0.3, size=len(s)), s.ds)
        for s in (_seasonal("a", cycles=10), _seasonal("b", cycles=9, pattern=(2.0, 1.0, 2.0, 7.0)))
    ]
    calls = []

    def repeat_last_cycle(histories, horizon, quantiles):
        calls.append([len(h) for h in histories])
        mean = np.stack([np.resize(h.values[-4:], horizon) for h in histories])
        q = np.repeat(mean[:, None, :], len(quantiles), axis=1)
        return ts.forecast_frame(histories, mean, q, quantiles)

    ev = ts.rolling_origin_evaluation(
        series,
        3,
        repeat_last_cycle,
        name="mine",
        season_length=4,
        num_origins=2,
        step=2,
        baselines=("SeasonalNaive", "Naive"),
    )
    assert calls == [[37, 33], [35, 31]]
    assert len(ev.per_origin) == 2 * 2 * 3 and len(ev.per_series) == 2 * 3
    wide = ev.side_by_side("mase")
    assert wide.names == ["unique_id", "mine", "SeasonalNaive", "Naive"]
    np.testing.assert_allclose(wide["mine"], wide["SeasonalNaive"], rtol=1e-9)
    # Naive, series b, origin 1 (cut at 31), by hand.
    x = series[1].values
    hand = np.mean(np.abs(x[31:34] - x[30])) / np.mean(np.abs(x[4:31] - x[:27]))
    po = ev.per_origin
    row = (po["unique_id"] == "b") & (po["model"] == "Naive") & (po["origin"] == 1)
    assert po["mase"][row][0] == pytest.approx(hand, rel=1e-9)
    summary = {r["model"]: r for r in ev.summary.rows()}
    assert (
        summary["mine"]["relative_mase"] == pytest.approx(1.0, rel=1e-9)
        and summary["SeasonalNaive"]["relative_mase"] == 1.0
    )
    assert summary["Naive"]["relative_mase"] > 1.5
    with pytest.raises(ValueError) as err:
        ts.rolling_origin_evaluation([_seasonal("tiny", cycles=3)], 6, season_length=4, num_origins=2)
    _one_line_error(err, "'tiny'", "at least 17")


# ---------------------------------------------------------------- optional dependencies


def test_core_readers_work_without_pandas(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    (s,) = ts.read_long(_write(tmp_path, "l.csv", "unique_id,ds,y\na,2020-01-01,1\na,2020-01-02,2\n"))
    assert s.freq == "D"
    with pytest.raises(ValueError) as err:
        ts.make_series("odd", [1, 2], ["Jan-1-1995", "Feb-1-1995"])
    _one_line_error(err, "'odd'", "'Jan-1-1995'", "ISO dates")
    with pytest.raises(ValueError) as err:
        ts.to_pandas_long([s])
    _one_line_error(err, "moekit[ts]")
    monkeypatch.setitem(sys.modules, "statsforecast", None)
    with pytest.raises(ValueError) as err:
        ts.baseline_forecasts([s], 2)
    _one_line_error(err, "statsforecast", "moekit[ts]")


def test_package_import_stays_on_its_floor():
    code = (
        "import sys, moekit.timeseries\n"
        "heavy = [m for m in ('torch', 'pandas', 'statsforecast', 'matplotlib', 'statsmodels') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
