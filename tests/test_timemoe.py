"""Time-MoE: windows and masking, the objective, horizon assembly, the KV cache, normalisation,
saving/loading, a short training run that beats SeasonalNaive, exact resume and the CLI verbs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import moekit
from moekit.cli.main import main
from moekit.layers import MoEConfig
from moekit.models.forecaster import Forecaster
from moekit.models.io import write_model_folder
from moekit.models.objectives import LossWeights
from moekit.models.registry import families_for_task, get_family
from moekit.models.timemoe import TimeMoEConfig, TimeMoEForecaster, dense_twin, timemoe_tiny
from moekit.models.timemoe_train import (
    SeriesDataConfig,
    SeriesDataModule,
    TimeMoEObjective,
    cut_windows,
)
from moekit.timeseries import Series, fit_scale, make_windows, mase, plan_horizon
from moekit.train import fit
from moekit.train.forecasting import TSTrainConfig, build_run, ts_train


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run on one torch thread: on a machine whose cores are shared, two threads
    contend and run many times slower (the results are the same; only the speed changes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_DATA = SeriesDataConfig(batch_size=8, num_synthetic=8, real_series="none", num_val_series=4)


def tiny(**changes) -> TimeMoEConfig:
    return timemoe_tiny().replace(**changes) if changes else timemoe_tiny()


def model_of(config: TimeMoEConfig, seed: int = 0, dtype=torch.float64) -> TimeMoEForecaster:
    torch.manual_seed(seed)
    return TimeMoEForecaster(config).to(dtype).eval()


# --- windows, labels and the objective -------------------------------------------------------


def test_cut_windows_match_make_windows_after_scaling():
    rng = np.random.default_rng(0)
    values = [rng.normal(size=n).cumsum() + 5 for n in (30, 9, 50)]
    horizons = (4, 1, 7)  # unsorted on purpose
    ref = make_windows(values, context_length=12, horizons=horizons, stride=5)
    got = cut_windows(values, ref.series_index, ref.end, 12, horizons)
    scale = fit_scale(ref.context, "std", ref.context_mask)
    np.testing.assert_array_equal(got["mask"], ref.context_mask)
    np.testing.assert_allclose(got["context"], np.where(ref.context_mask, scale.apply(ref.context), 0.0))
    for k in range(len(horizons)):
        np.testing.assert_array_equal(got[f"target_mask_{k}"], ref.target_masks[k])
        want = (ref.targets[k] - scale.loc[:, :, None]) / scale.scale[:, :, None]
        np.testing.assert_allclose(got[f"target_{k}"], np.where(ref.target_masks[k], want, 0.0))
    # Shifted labels: target_k[b, t, j] is the value j + 1 steps after context position t.
    b = int(np.nonzero(ref.series_index == 0)[0][0])
    end = int(ref.end[b])
    t = 11
    raw_t = values[0][end - 12 + t + 1 : end - 12 + t + 1 + 7]
    np.testing.assert_allclose(ref.targets[2][b, t, : raw_t.shape[0]], raw_t)


def _batch(cfg: TimeMoEConfig, seed: int = 0) -> dict:
    data = SeriesDataModule(TINY_DATA.replace(seed=seed), cfg.context_length, cfg.horizons)
    return {k: v.double() if v.is_floating_point() else v for k, v in data.next_train_batch().items()}


def test_objective_ignores_labels_past_the_end_and_matches_reference():
    cfg = tiny(aux_loss_coef=0.0)
    model = model_of(cfg)
    batch = _batch(cfg)
    assert not all(bool(batch[f"target_mask_{k}"].all()) for k in range(3))  # some labels masked
    before = {k: v.clone() for k, v in batch.items()}
    obj = TimeMoEObjective(LossWeights(), huber_delta=cfg.huber_delta)
    out = model(batch["context"], batch["mask"])
    loss = obj.loss(out, batch).loss
    # Reference: for each head, the mean of the float64 Huber over the valid labels; then the mean.
    per_head = []
    for k, pred in enumerate(out.predictions):
        m = batch[f"target_mask_{k}"]
        d = (pred - batch[f"target_{k}"])[m].abs()
        delta = cfg.huber_delta
        per_head.append(torch.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean())
    torch.testing.assert_close(loss, torch.stack(per_head).mean())
    # Garbage predictions where labels are masked change nothing; a valid one changes the loss.
    garbage = tuple(
        torch.where(batch[f"target_mask_{k}"], p, torch.full_like(p, 1e6))
        for k, p in enumerate(out.predictions)
    )
    torch.testing.assert_close(obj.loss(type(out)(garbage), batch).loss, loss)
    k_valid = torch.nonzero(batch["target_mask_2"])[0]
    nudged = list(garbage)
    nudged[2] = nudged[2].clone()
    nudged[2][tuple(k_valid)] += 1.0
    assert float(obj.loss(type(out)(tuple(nudged)), batch).loss.detach()) != float(loss.detach())
    for k, v in before.items():  # the official code mutated labels in place; this must not
        assert torch.equal(v, batch[k])


@pytest.mark.parametrize("top_k", [1, 3])
def test_aux_loss_uses_the_real_top_k(top_k):
    moe = MoEConfig(
        dim=32, ffn_dim=16, num_experts=6, top_k=top_k, shared_ffn_dim=32, shared_expert_gate=True
    )
    cfg = tiny(moe=moe, aux_loss_coef=0.5)
    model = model_of(cfg)
    batch = _batch(cfg)
    obj = TimeMoEObjective.for_config(cfg)
    out = obj.forward(model, batch)
    res = obj.loss(out, batch)
    # Reference: E * sum_e f_e P_e over real (unpadded) tokens, f_e = share of the T * k assignments.
    refs = []
    for info in out.routing:
        mask = (
            info.token_mask
            if info.token_mask is not None
            else torch.ones(info.expert_ids.shape[0], dtype=bool)
        )
        ids = info.choice_ids[mask]
        assert ids.shape[1] == top_k
        f = torch.bincount(ids.reshape(-1), minlength=6).double() / ids.numel()
        p = info.router_probs[mask].double().mean(0)
        refs.append(6 * (f * p).sum())
    ref = torch.stack(refs).mean()
    torch.testing.assert_close(res.aux_losses["load_balance"].double(), ref)
    torch.testing.assert_close(res.loss.double(), res.metrics["huber"].double() + 0.5 * ref)


def test_data_module_resume_state_and_holdout():
    cfg = tiny()
    a = SeriesDataModule(TINY_DATA, cfg.context_length, cfg.horizons)
    a.next_train_batch()
    state = a.state_dict()
    want = a.next_train_batch()
    b = SeriesDataModule(TINY_DATA, cfg.context_length, cfg.horizons)
    b.load_state_dict(state)
    got = b.next_train_batch()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert len(a.val_batches()) == 1 and torch.equal(
        a.val_batches()[0]["context"], b.val_batches()[0]["context"]
    )
    with pytest.raises(ValueError, match="held-out"):
        SeriesDataConfig(real_series=("co2",))
    with pytest.raises(ValueError, match="hold-out"):
        SeriesDataModule(TINY_DATA, 16, (1,), series=[Series("nile", np.arange(40.0))])


# --- horizon assembly, KV cache, normalisation -------------------------------------------------


def test_forecast_assembles_unsorted_heads_like_a_manual_rollout():
    cfg = tiny(horizons=(16, 1, 4))
    model = model_of(cfg)
    z = torch.randn(2, 20, dtype=torch.float64)
    pred, calls = model.forecast_normalized(z, None, 23, use_cache=False)
    plan = plan_horizon(23, (16, 1, 4))
    assert [h for h, _ in plan] == [16, 4, 1, 1, 1] and calls == len(plan)
    seq, parts = z, []
    for head, kept in plan:  # the obvious reference: recompute and index the head by its horizon
        step = model(seq).predictions[cfg.horizons.index(head)][:, -1, :kept]
        parts.append(step)
        seq = torch.cat([seq, step], dim=1)
    torch.testing.assert_close(pred, torch.cat(parts, dim=1), rtol=0, atol=1e-12)
    assert model.forecast_normalized(z, None, 40, use_cache=False)[1] == 4  # 16 + 16 + 4 + 4


def test_kv_cache_forecast_equals_recompute_with_left_padding():
    model = model_of(tiny())
    rng = np.random.default_rng(1)
    histories = [rng.normal(size=n).cumsum() * 3 + 10 for n in (70, 25, 5)]  # 70 > context 64
    cached = model.forecast(histories, 37, use_cache=True)
    full = model.forecast(histories, 37, use_cache=False)
    assert cached.shape == (3, 37)
    np.testing.assert_allclose(cached, full, rtol=0, atol=1e-9)
    # A short series forecasts the same alone as padded in a batch.
    alone = model.forecast([histories[2]], 37)
    np.testing.assert_allclose(alone[0], cached[2], rtol=0, atol=1e-9)


def test_forecast_normalisation_round_trip():
    model = model_of(tiny())
    rng = np.random.default_rng(2)
    x = np.sin(np.arange(50) / 3) + rng.normal(0, 0.1, 50)
    base = model.forecast([x], 20)
    moved = model.forecast([1000.0 * x - 7e4], 20)  # affine equivariance: the scale is undone exactly
    np.testing.assert_allclose(moved, 1000.0 * base - 7e4, rtol=1e-9, atol=1e-6)
    const = model.forecast([np.full(30, 5.0)], 8)
    assert np.all(np.isfinite(const))
    with pytest.raises(ValueError, match="finite"):
        model.forecast([np.array([1.0, np.nan, 2.0])], 3)


def test_dense_twin_has_the_moe_models_active_parameters():
    cfg = tiny()
    moe, dense = TimeMoEForecaster(cfg), TimeMoEForecaster(dense_twin(cfg))
    per_layer_router = cfg.dim * (cfg.moe.num_experts + 1)  # router + shared gate
    assert moe.num_parameters(active_only=True) - dense.num_parameters() == cfg.num_layers * per_layer_router
    assert not dense.moe_layers and len(moe.moe_layers) == cfg.num_layers


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="horizons"):
        tiny(horizons=(4, 4))
    with pytest.raises(ValueError, match="moe_placement"):
        tiny(moe_placement="sometimes")
    assert TimeMoEConfig.from_dict(json.loads(json.dumps(tiny().to_dict()))) == tiny()


# --- saving, loading, registry ------------------------------------------------------------------


def test_registry_and_save_load_through_from_pretrained(tmp_path):
    family = get_family("timemoe")
    assert family.task == "forecast" and family in families_for_task("forecast")
    assert get_family("causal_lm").task == "causal_lm"
    model = model_of(tiny(), dtype=torch.float32)
    write_model_folder(model, tmp_path / "m")
    loaded = moekit.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, TimeMoEForecaster) and not loaded.training
    x = [np.sin(np.arange(40) / 2.0) * 4]
    np.testing.assert_array_equal(loaded.forecast(x, 10), model.forecast(x, 10))


def test_forecaster_predict_df_and_residual_quantiles():
    pd = pytest.importorskip("pandas")
    model = model_of(tiny(), dtype=torch.float32)
    df = pd.DataFrame(
        {
            "unique_id": ["a"] * 40 + ["b"] * 12,
            "ds": list(pd.date_range("2020-01-01", periods=40, freq="MS"))
            + list(pd.date_range("2021-03-01", periods=12, freq="MS")),
            "y": list(np.sin(np.arange(40) / 2.0)) + list(np.arange(12.0)),
        }
    )
    out = Forecaster(model).predict_df(df, 6, quantiles=(0.1, 0.5, 0.9))
    assert list(out.columns) == ["unique_id", "ds", "mean", "q0.1", "q0.5", "q0.9"]
    assert len(out) == 12 and str(out["ds"].iloc[6])[:10] == "2022-03-01"  # b continues monthly
    assert (out["q0.1"] <= out["q0.9"]).all()
    with pytest.raises(ValueError, match="between 0 and 1"):
        Forecaster(model).predict_df(df, 6, quantiles=(1.5,))


# --- training --------------------------------------------------------------------------------


def _sinusoids_with_trend(num: int, seed: int) -> list[Series]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        t = np.arange(int(rng.integers(150, 260)))
        y = (
            np.sin(2 * np.pi * t / 12 + rng.uniform(0, 6.3))
            + rng.uniform(0.02, 0.08) * t
            + rng.normal(0, 0.05, t.shape)
        )
        out.append(Series(f"s{i}", y))
    return out


def test_brief_training_beats_seasonal_naive_on_sinusoid_with_trend():
    config = TSTrainConfig(
        preset="timemoe-tiny",
        model_overrides={"horizons": (1, 8, 24)},
        data=SeriesDataConfig(
            batch_size=16, num_synthetic=0, real_series="none", num_val_series=2, min_context=32
        ),
        max_steps=120,
        lr=3e-3,
        warmup_steps=10,
        eval_interval=1000,
        save_interval=1000,
        time_limit_s=None,
    )
    model, objective, data = build_run(config, series=_sinusoids_with_trend(24, seed=0))
    result = fit(model, objective, data, config.loop_config(1), None, progress=False, dist_context=None)
    assert result.num_steps_run == 120
    # A fresh test series, horizon 24, against SeasonalNaive (repeat the last 12 steps).
    test = _sinusoids_with_trend(6, seed=99)
    horizon = 24
    hist = [s.values[:-horizon] for s in test]
    actual = np.stack([s.values[-horizon:] for s in test])
    snaive = np.stack([np.tile(h[-12:], 2) for h in hist])
    pred = model.forecast(hist, horizon)
    ours, base = mase(actual, pred, hist, 12), mase(actual, snaive, hist, 12)
    assert np.mean(ours) < np.mean(base), (ours, base)


def test_resume_is_exact_through_fit(tmp_path):
    common = dict(
        preset="timemoe-tiny",
        data=TINY_DATA,
        eval_interval=3,
        save_interval=3,
        log_interval=1,
        time_limit_s=None,
        warmup_steps=2,
    )
    full = ts_train(TSTrainConfig(max_steps=6, **common), tmp_path / "full", progress=False)
    ts_train(TSTrainConfig(max_steps=3, **common), tmp_path / "part", progress=False)
    resumed = ts_train(TSTrainConfig(max_steps=6, **common), tmp_path / "part", resume=True, progress=False)
    assert [s for s, _ in resumed.losses] == [4, 5, 6]
    assert resumed.losses == full.losses[3:]
    a = moekit.from_pretrained(tmp_path / "full")
    b = moekit.from_pretrained(tmp_path / "part")
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na


# --- CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tscli")
    model = model_of(tiny(), dtype=torch.float32)
    write_model_folder(model, root / "model")
    rows = [("a", f"2019-{m:02d}-01", float(np.sin(m))) for m in range(1, 13)]
    rows += [("a", f"2020-{m:02d}-01", float(np.sin(m + 12) + 0.5)) for m in range(1, 13)]
    rows += [("b", f"2020-{m:02d}-01", float(m)) for m in range(1, 13)]
    with open(root / "long.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["unique_id", "ds", "y"])
        w.writerows(rows)
    return root


def test_cli_forecast_end_to_end(cli_files, tmp_path, capsys):
    out = tmp_path / "f.csv"
    rc = main(
        [
            "forecast", "--model", str(cli_files / "model"), "--input", str(cli_files / "long.csv"),
            "--horizon", "5", "--out", str(out), "--quantiles", "0.1,0.5,0.9", "--plot", str(tmp_path / "f.png"),
        ]
    )  # fmt: skip
    assert rc == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["unique_id", "ds", "mean", "q0.1", "q0.5", "q0.9"]
    assert [r["ds"] for r in rows if r["unique_id"] == "a"] == [f"2021-{m:02d}-01" for m in range(1, 6)]
    assert (tmp_path / "f.png").stat().st_size > 0
    # Wide CSV without timestamps and JSONL: ds continues as integer steps.
    (tmp_path / "wide.csv").write_text("a,b\n" + "".join(f"{i},{2 * i}\n" for i in range(10)))
    (tmp_path / "s.jsonl").write_text(json.dumps({"sequence": list(range(7))}) + "\n")
    for name, first in (("wide.csv", "10"), ("s.jsonl", "7")):
        assert main(["forecast", "--model", str(cli_files / "model"), "--input", str(tmp_path / name),
                     "--horizon", "2", "--out", str(out)]) == 0  # fmt: skip
        with open(out) as fh:
            assert next(csv.DictReader(fh))["ds"] == first


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("badvalue", "not a number"),
        ("empty_series", "no observed value"),
        ("too_short", "at least 2 are needed"),
        ("horizon", "--horizon"),
        ("quantile_text", "--quantiles"),
        ("quantile_range", "between 0 and 1"),
        ("lm_model", "not a forecaster"),
    ],
)
def test_cli_forecast_bad_inputs_are_one_line_errors(case, message, cli_files, tmp_path, capsys):
    good = str(cli_files / "long.csv")
    model = str(cli_files / "model")
    args = {"input": good, "horizon": "3", "model": model, "quantiles": None}
    if case == "missing":
        args["input"] = str(tmp_path / "nope.csv")
    elif case == "badvalue":
        (tmp_path / "bad.csv").write_text("unique_id,ds,y\na,2020-01-01,1\na,2020-02-01,oops\n")
        args["input"] = str(tmp_path / "bad.csv")
    elif case == "empty_series":
        (tmp_path / "nan.csv").write_text("unique_id,ds,y\nz,2020-01-01,\nz,2020-02-01,nan\n")
        args["input"] = str(tmp_path / "nan.csv")
    elif case == "too_short":
        (tmp_path / "short.csv").write_text("unique_id,ds,y\nshorty,2020-01-01,1.0\n")
        args["input"] = str(tmp_path / "short.csv")
    elif case == "horizon":
        args["horizon"] = "0"
    elif case == "quantile_text":
        args["quantiles"] = "0.1,abc"
    elif case == "quantile_range":
        args["quantiles"] = "0.1,1.5"
    elif case == "lm_model":
        from moekit.models import MoEForCausalLM, get_preset

        torch.manual_seed(0)
        MoEForCausalLM(get_preset("moe-tiny")).save_pretrained(tmp_path / "lm")
        args["model"] = str(tmp_path / "lm")
    argv = ["forecast", "--model", args["model"], "--input", args["input"], "--horizon", args["horizon"]]
    argv += ["--out", str(tmp_path / "o.csv")] + (
        ["--quantiles", args["quantiles"]] if args["quantiles"] else []
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    if case in ("empty_series", "too_short"):
        assert ("'z'" if case == "empty_series" else "'shorty'") in err  # names the series


def test_cli_ts_eval_and_ts_train_resume(cli_files, tmp_path, capsys):
    rc = main(
        [
            "ts-eval", "--model", str(cli_files / "model"), "--input", str(cli_files / "long.csv"),
            "--horizon", "3", "--num-origins", "2", "--baselines", "SeasonalNaive,Naive", "--season-length", "1",
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert (
        "MASE per series" in text
        and "relative_mase" in text
        and "SeasonalNaive" in text
        and "timemoe" in text
    )
    run = tmp_path / "run"
    base = [
        "ts-train",
        "--preset",
        "timemoe-tiny",
        "--out",
        str(run),
        "--num-synthetic",
        "8",
        "--real",
        "none",
    ]
    base += ["--batch-size", "4", "--time-limit", "0"]
    assert main([*base, "--steps", "2"]) == 0
    assert main(["ts-train", "--out", str(run), "--resume", "--steps", "3"]) == 0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "end"] == [2, 3]
    assert isinstance(moekit.from_pretrained(run), TimeMoEForecaster)
    capsys.readouterr()
    assert main(["ts-train", "--family", "causal_lm"]) == 2
    assert "not a forecaster" in capsys.readouterr().err
    assert main(["ts-train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown timemoe preset" in capsys.readouterr().err
