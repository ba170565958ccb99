"""Moirai-MoE: mixture heads against torch.distributions, patching, sampling, save/load, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moekit
from moekit.layers import MoEConfig, fit_centroids
from moekit.models import moirai_dist as dist
from moekit.models.moirai import (
    MoiraiMoEConfig,
    MoiraiMoEModel,
    get_moirai_preset,
    next_patch_targets,
    patchify,
    sample_paths,
    unpatchify,
)
from moekit.models.moirai_train import MoiraiDataModule, MoiraiForecaster, MoiraiObjective
from moekit.models.registry import family_of
from moekit.timeseries import Series, crps_from_samples
from moekit.train.engine import LoopConfig, fit, seed_everything

COMPONENTS = ("student_t", "normal", "laplace")


def _tiny(router_type: str = "centroid", **kw) -> MoiraiMoEConfig:
    moe = MoEConfig(dim=32, ffn_dim=32, num_experts=4, top_k=2, router_type=router_type)
    base = dict(
        patch_size=8, dim=32, num_layers=2, num_heads=4, head_dim=8, ffn_dim=64, moe=moe, max_patches=16
    )
    base.update(kw)
    return MoiraiMoEConfig(**base)


def test_component_log_probs_match_torch_distributions_float64():
    torch.manual_seed(0)
    raw = torch.randn(5, 7, dist.num_raw_params(COMPONENTS), dtype=torch.float64)
    y = 2 * torch.randn(5, 7, dtype=torch.float64)
    mix = dist.split_params(raw, COMPONENTS, min_scale=1e-3)
    assert mix.loc.dtype == torch.float64
    ref_parts = [
        torch.distributions.StudentT(mix.df[..., 0], mix.loc[..., 0], mix.scale[..., 0]).log_prob(y),
        torch.distributions.Normal(mix.loc[..., 1], mix.scale[..., 1]).log_prob(y),
        torch.distributions.Laplace(mix.loc[..., 2], mix.scale[..., 2]).log_prob(y),
    ]
    for c, name in enumerate(COMPONENTS):
        ours = dist.component_log_prob(name, y, mix.loc[..., c], mix.scale[..., c], mix.df[..., c])
        torch.testing.assert_close(ours, ref_parts[c], rtol=1e-12, atol=1e-12)
    ref = torch.logsumexp(mix.log_weights + torch.stack(ref_parts, -1), -1)
    torch.testing.assert_close(dist.log_prob(mix, y), ref, rtol=1e-12, atol=1e-12)
    assert bool((mix.df[..., 0] > 2).all()) and bool((mix.scale >= 1e-3).all())
    torch.testing.assert_close(mix.log_weights.exp().sum(-1), torch.ones(5, 7, dtype=torch.float64))


def test_mixture_nll_gradient_matches_finite_differences():
    torch.manual_seed(1)
    raw = torch.randn(3, 4, dist.num_raw_params(COMPONENTS), dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.3

    def f(r):
        return dist.nll(dist.split_params(r, COMPONENTS), y, mask)[0]

    assert torch.autograd.gradcheck(f, (raw,), eps=1e-6, atol=1e-7)
    # Masked-out values do not reach the gradient.
    f(raw).backward()
    assert torch.equal(raw.grad[~mask], torch.zeros_like(raw.grad[~mask]))


@pytest.mark.parametrize(
    "name, var",
    [
        ("normal", lambda s, df: s**2),
        ("laplace", lambda s, df: 2 * s**2),
        ("student_t", lambda s, df: s**2 * df / (df - 2)),
    ],
)
def test_sampling_has_each_components_moments(name, var):
    k = dist.COMPONENT_PARAMS[name]
    raw = torch.zeros(40000, 1 + k, dtype=torch.float64)
    raw[:, 1] = 3.0  # loc
    raw[:, 2] = 1.0  # raw scale -> softplus(1) + 1e-3
    if name == "student_t":
        raw[:, 3] = 2.0  # raw df -> 2 + softplus(2) ~ 4.13
    mix = dist.split_params(raw, (name,))
    torch.manual_seed(0)
    x = dist.sample(mix)
    s, df = float(mix.scale[0, 0]), float(mix.df[0, 0])
    assert abs(float(x.mean()) - 3.0) < 0.05
    assert abs(float(x.var()) / var(s, df) - 1) < 0.08


def test_patchify_round_trip_and_masks():
    values = torch.arange(1.0, 21.0).view(2, 10)
    observed = torch.ones(2, 10, dtype=torch.bool)
    observed[1, :3] = False
    x, obs = patchify(values, observed, 4)
    assert x.shape == (2, 3, 4) and obs.shape == (2, 3, 4)
    assert not obs[:, 0, :2].any() and obs[0, 0, 2:].all()  # 2 pad values on the left
    assert torch.equal(x[1, 0], torch.tensor([0.0, 0.0, 0.0, 0.0])) and not obs[1, 0].any()
    assert torch.equal(unpatchify(x, 10)[0], values[0])
    assert torch.equal(unpatchify(x, 10)[1, 3:], values[1, 3:])
    targets, mask = next_patch_targets(x, obs, obs.any(-1))
    # Row 1's first patch is all padding: it predicts nothing.
    assert not mask[1, 0].any() and mask[0, 0].all() and torch.equal(targets, x[:, 1:])


def test_causal_and_left_padding_changes_nothing():
    torch.manual_seed(0)
    model = MoiraiMoEModel(_tiny()).double().eval()
    x = torch.randn(1, 48, dtype=torch.float64)
    out = model(x).params
    changed = x.clone()
    changed[0, 40:] += 5.0  # the last patch
    torch.testing.assert_close(model(changed).params[:, :-1], out[:, :-1], rtol=1e-10, atol=1e-10)
    padded = torch.cat([torch.zeros(1, 16, dtype=torch.float64), x], 1)
    observed = torch.cat([torch.zeros(1, 16, dtype=torch.bool), torch.ones(1, 48, dtype=torch.bool)], 1)
    # Shifted RoPE positions round differently in the float32 tables: float32-level tolerance.
    torch.testing.assert_close(model(padded, observed).params[:, 2:], out, rtol=1e-5, atol=1e-7)


def test_sampling_is_seeded_and_quantiles_monotone():
    torch.manual_seed(0)
    model = MoiraiMoEModel(_tiny()).eval()
    ctx = torch.randn(2, 40)
    obs = torch.ones(2, 40, dtype=torch.bool)
    state = torch.get_rng_state()
    a = sample_paths(model, ctx, obs, horizon=13, num_samples=20, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert a.shape == (2, 20, 13)
    assert torch.equal(a, sample_paths(model, ctx, obs, horizon=13, num_samples=20, seed=5))
    assert not torch.equal(a, sample_paths(model, ctx, obs, horizon=13, num_samples=20, seed=6))
    series = [Series("a", np.sin(np.arange(60.0)) * 10 + 50), Series("b", np.arange(30.0))]
    frame = MoiraiForecaster(model).predict_df(series, 5, quantiles=(0.9, 0.1, 0.5), num_samples=30)
    assert frame.names == ["unique_id", "ds", "mean", "q0.1", "q0.5", "q0.9"]
    assert len(frame) == 10 and list(frame["ds"][:5]) == [60, 61, 62, 63, 64]
    assert np.all(frame["q0.1"] <= frame["q0.5"]) and np.all(frame["q0.5"] <= frame["q0.9"])
    # Forecasts are in the series' units (de-normalised): around 50 for "a".
    assert 20 < float(frame["mean"][:5].mean()) < 80


def test_save_and_load_through_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = MoiraiMoEModel(_tiny())
    with torch.no_grad():
        model.layers[0].ffn.router.centroids.mul_(3.0)
    model.save_pretrained(tmp_path / "m")
    loaded = moekit.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, MoiraiMoEModel) and family_of(loaded).name == "moirai_moe"
    assert loaded.config == model.config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 32)
    torch.testing.assert_close(loaded(x).params, model.eval()(x).params)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="components"):
        _tiny(components=("gamma",))
    with pytest.raises(ValueError, match="moe.dim"):
        _tiny(dim=64, num_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="scale_method"):
        _tiny(scale_method="minmax")
    cfg = get_moirai_preset("moirai-moe-small")
    twin = get_moirai_preset("moirai-dense-small")
    assert twin.moe is None and twin.ffn_dim == cfg.moe.top_k * cfg.moe.ffn_dim
    moe_active = MoiraiMoEModel(cfg).num_parameters(active_only=True)
    dense = MoiraiMoEModel(twin).num_parameters()
    # Equal active FFN compute; the centroid router adds no parameter.
    assert moe_active == dense
    assert MoiraiMoEConfig.from_json(cfg.to_json()) == cfg


@pytest.fixture
def one_thread():
    """Training tests run on one thread: on a shared 2-core machine two threads are 5x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _sinusoid_series(num: int, length: int = 400, period: int = 16, seed: int = 0) -> list[Series]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        t = np.arange(length, dtype=np.float64)
        phase, slope = rng.uniform(0, 2 * np.pi), rng.uniform(0.01, 0.03)
        y = 3 * np.sin(2 * np.pi * t / period + phase) + slope * t + 0.2 * rng.standard_normal(length)
        out.append(Series(f"s{i}", y))
    return out


def _loop(**kw) -> LoopConfig:
    base = dict(max_steps=120, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_interval=100, log_interval=20)
    base.update(kw)
    return LoopConfig(**base)


def test_brief_training_lowers_nll_and_beats_seasonal_naive(one_thread):
    seed_everything(0)
    train, val = _sinusoid_series(16, seed=0), _sinusoid_series(4, seed=1)
    data = MoiraiDataModule(train, val, patch_size=8, context_patches=12, batch_size=16, num_val_batches=2)
    model = MoiraiMoEModel(_tiny(max_patches=12))
    objective = MoiraiObjective()
    before = objective.evaluate(model, data.val_batches())
    result = fit(model, objective, data, _loop(max_steps=200), None, progress=False, device="cpu")
    assert result.val_loss < before - 0.5, (before, result.val_loss)
    # Probabilistic forecast of the held-out series' last 16 values against SeasonalNaive(16).
    horizon, period = 16, 16
    hist = [Series(s.unique_id, s.values[:-horizon]) for s in val]
    actual = np.stack([s.values[-horizon:] for s in val])
    samples = MoiraiForecaster(model, num_samples=64).sample(hist, horizon)
    snaive = np.stack([np.tile(h.values[-period:], 1)[:horizon] for h in hist])
    crps_model = crps_from_samples(actual, samples).mean()
    crps_snaive = crps_from_samples(actual, snaive[:, None, :]).mean()  # a point forecast: MAE
    print(
        f"val NLL {before:.3f} -> {result.val_loss:.3f}; CRPS {crps_model:.3f} vs SeasonalNaive {crps_snaive:.3f}"
    )
    assert crps_model < crps_snaive, (crps_model, crps_snaive)


def _run(out_dir, resume=False, seed=0, max_steps=6, router_type="centroid"):
    seed_everything(seed)
    data = MoiraiDataModule(
        _sinusoid_series(6, length=120), _sinusoid_series(2, length=120, seed=3),
        patch_size=8, context_patches=8, batch_size=4, num_val_batches=1,
    )  # fmt: skip
    model = MoiraiMoEModel(_tiny(router_type, max_patches=8))
    loop = _loop(max_steps=max_steps, warmup_steps=0, eval_interval=3, save_interval=3, log_interval=1)
    result = fit(model, MoiraiObjective(), data, loop, out_dir, resume=resume, progress=False, device="cpu")
    return model, result


def test_resume_through_fit_is_exact(tmp_path, one_thread, monkeypatch):
    full_model, full = _run(tmp_path / "a")
    # Ctrl-C in the middle of step 5 (its batch drawn), then resume a differently seeded model.
    real = MoiraiDataModule.next_train_batch
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(MoiraiDataModule, "next_train_batch", flaky)
    _, part = _run(tmp_path / "b")
    monkeypatch.undo()
    model, resumed = _run(tmp_path / "b", resume=True, seed=99)
    assert part.stop_reason == "interrupted" and part.step == 4 and resumed.step == 6
    assert part.losses + resumed.losses == full.losses
    for (name, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.val_loss == full.val_loss
    # The run folder opens with the one loader, centroids included.
    loaded = moekit.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, MoiraiMoEModel)
    assert torch.equal(loaded.layers[0].ffn.router.centroids, full_model.layers[0].ffn.router.centroids)


def test_learned_router_option_trains(one_thread):
    model, result = _run(None, router_type="topk")
    router = model.layers[0].ffn.router
    assert router.weight is not None and router.centroids is None
    assert result.losses[-1][1] < result.losses[0][1]
    # The centroid router has no trainable routing parameter at all.
    centroid = MoiraiMoEModel(_tiny())
    assert not [n for n, _ in centroid.named_parameters() if ".router." in n]
    assert "layers.0.ffn.router.weight" in MoiraiMoEModel(_tiny("topk")).parameter_groups()["router"]


def test_fit_centroids_from_the_dense_twin():
    torch.manual_seed(0)
    moe_cfg = _tiny()
    dense = MoiraiMoEModel(moe_cfg.dense_twin())
    moe = MoiraiMoEModel(moe_cfg)
    data = MoiraiDataModule(_sinusoid_series(4, length=100), patch_size=8, context_patches=8, batch_size=8)
    batches = [data.next_train_batch() for _ in range(3)]
    fitted = fit_centroids(moe, batches, source=dense, seed=0)
    c = fitted.layers[1].ffn.router.centroids
    assert not torch.equal(c, moe.layers[1].ffn.router.centroids)
    # Centroids live where the dense model's FFN inputs live: RMS-normed states, RMS ~ 1 per dim.
    rms = float(c.square().mean().sqrt())
    assert 0.3 < rms < 3.0 and math.isfinite(rms)
    # Every expert gets tokens from the fitted centroids on the same data.
    with torch.no_grad():
        out = fitted(batches[0]["values"], batches[0]["observed"])
    assert bool((out.routing[1].tokens_per_expert > 0).all())


def test_predict_df_takes_a_long_dataframe_and_constant_series():
    pd = pytest.importorskip("pandas")
    torch.manual_seed(0)
    model = MoiraiMoEModel(_tiny())
    df = pd.DataFrame(
        {
            "unique_id": ["flat"] * 20 + ["ramp"] * 30,
            "ds": list(pd.date_range("2020-01-01", periods=20, freq="MS"))
            + list(pd.date_range("2020-01-01", periods=30, freq="MS")),
            "y": [4.0] * 20 + list(np.arange(30.0)),
        }
    )
    frame = MoiraiForecaster(model).predict_df(df, 3, num_samples=10)
    assert list(frame["unique_id"]) == ["flat"] * 3 + ["ramp"] * 3
    assert str(frame["ds"][0])[:10] == "2021-09-01" and str(frame["ds"][3])[:10] == "2022-07-01"
    assert np.all(np.isfinite(frame["mean"]))  # a constant series normalises with scale 1
    with pytest.raises(ValueError, match="horizon=0"):
        MoiraiForecaster(model).predict_df(df, 0)
