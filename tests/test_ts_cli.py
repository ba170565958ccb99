"""The shared time-series verbs (ts-train, forecast, ts-eval) over the Moirai-MoE family."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import moekit
from moekit.cli.main import main
from moekit.models.forecaster import Forecaster
from moekit.models.moirai import PRESETS, MoiraiMoEModel, moirai_moe_tiny
from moekit.models.moirai_train import MoiraiDataModule, MoiraiForecaster, MoiraiObjective
from moekit.models.registry import families_for_task, get_family
from moekit.models.timemoe_train import SeriesDataConfig
from moekit.timeseries import Series
from moekit.train.forecasting import TSTrainConfig, build_run, family_presets, forecast_family


@pytest.fixture(scope="module")
def moirai_run(tmp_path_factory):
    """A 20-step ts-train run of moirai-moe-tiny and a small long-format CSV (two series)."""
    root = tmp_path_factory.mktemp("moirai_cli")
    rows = [("a", f"2019-{m:02d}-01", float(np.sin(m))) for m in range(1, 13)]
    rows += [("a", f"2020-{m:02d}-01", float(np.sin(m + 12) + 0.5)) for m in range(1, 13)]
    rows += [("b", f"2020-{m:02d}-01", float(m)) for m in range(1, 13)]
    with open(root / "small.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["unique_id", "ds", "y"])
        w.writerows(rows)
    argv = ["ts-train", "--family", "moirai-moe", "--preset", "moirai-moe-tiny", "--steps", "20"]
    argv += ["--out", str(root / "run"), "--num-synthetic", "8", "--real", "none", "--batch-size", "4"]
    argv += ["--time-limit", "0"]
    torch.set_num_threads(1)
    assert main(argv) == 0
    return root


def test_registry_exposes_moirai_as_a_forecast_family():
    family = get_family("moirai_moe")
    assert family.task == "forecast" and family in families_for_task("forecast")
    assert forecast_family("moirai-moe") is family
    assert family_presets(family) == dict(PRESETS) and "moirai-moe-tiny" in PRESETS
    cfg = moirai_moe_tiny()
    assert cfg.context_length == cfg.max_patches * cfg.patch_size
    objective = MoiraiObjective.for_config(cfg.replace(aux_loss_coef=0.25))
    assert objective.weights.load_balance == 0.25
    data = MoiraiDataModule.for_model(
        SeriesDataConfig(num_synthetic=4, real_series="none", batch_size=3), cfg
    )
    batch = data.next_train_batch()
    assert batch["values"].shape == (3, cfg.context_length) and data.val_batches()


def test_build_run_takes_user_series_for_moirai():
    config = TSTrainConfig(family="moirai_moe", preset="moirai-moe-tiny", data=SeriesDataConfig(batch_size=2))
    series = [Series(f"s{i}", np.sin(np.arange(60) / (i + 2))) for i in range(3)]
    model, objective, data = build_run(config, series)
    assert isinstance(model, MoiraiMoEModel) and isinstance(objective, MoiraiObjective)
    assert data.describe()["num_train_series"] == 3


def test_forecaster_uses_moirai_sample_paths():
    torch.manual_seed(0)
    model = MoiraiMoEModel(moirai_moe_tiny()).eval()
    series = [Series("a", np.sin(np.arange(40) / 3.0) * 5 + 10), Series("b", np.arange(20.0))]
    frame = Forecaster(model, num_samples=30).predict(series, 6, (0.1, 0.5, 0.9))
    # The same seeded draws as the family's own forecaster: the probabilistic path ran, not residuals.
    ref = MoiraiForecaster(model).predict_df(series, 6, (0.1, 0.5, 0.9), num_samples=30)
    for col in ("mean", "q0.1", "q0.5", "q0.9"):
        np.testing.assert_allclose(frame[col], ref[col])
    samples = model.forecast_samples([s.values for s in series], 6, 30)
    np.testing.assert_allclose(model.forecast([s.values for s in series], 6, 30), samples.mean(1))
    np.testing.assert_allclose(np.asarray(frame["mean"]).reshape(2, 6), samples.mean(1))


def test_cli_ts_train_forecast_and_ts_eval_on_moirai(moirai_run, tmp_path, capsys):
    run = moirai_run / "run"
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["family"] == "moirai_moe" and saved["preset"] == "moirai-moe-tiny"
    assert isinstance(moekit.from_pretrained(run), MoiraiMoEModel)
    out = tmp_path / "f.csv"
    argv = ["forecast", "--model", str(run), "--input", str(moirai_run / "small.csv"), "--horizon", "8"]
    assert main([*argv, "--quantiles", "0.1,0.5,0.9", "--out", str(out)]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["unique_id", "ds", "mean", "q0.1", "q0.5", "q0.9"]
    assert len(rows) == 16
    assert [r["ds"] for r in rows if r["unique_id"] == "a"] == [f"2021-{m:02d}-01" for m in range(1, 9)]
    q = np.array([[float(r["q0.1"]), float(r["q0.5"]), float(r["q0.9"])] for r in rows])
    assert np.all(np.diff(q, axis=1) >= 0) and np.all(q[:, 2] > q[:, 0])  # a real band, monotone
    capsys.readouterr()
    argv = ["ts-eval", "--model", str(run), "--input", str(moirai_run / "small.csv"), "--horizon", "3"]
    argv += ["--num-origins", "2", "--baselines", "SeasonalNaive,Naive", "--season-length", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "CRPS per series" in text and "moirai_moe" in text and "relative_mase" in text
