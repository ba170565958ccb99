"""Training Time-MoE: the multi-horizon Huber objective and the series data module.

Shape legend: B = windows in a batch, L = context steps, h = one head's horizon.

A batch is a dict of tensors: ``context`` ``[B, L]`` (normalised, 0 at padding), ``mask``
``[B, L]`` bool (True where observed; short series are left-padded), and per head ``k`` (in
``config.horizons`` order) ``target_k`` ``[B, L, h_k]`` and ``target_mask_k`` ``[B, L, h_k]``:
the value ``j + 1`` steps after position ``t``, masked past the end of the series and at padded
positions. Windows are cut exactly as :func:`moekit.timeseries.make_windows` cuts them (the tests
check it), and each window is normalised by its context's scale (``fit_scale`` over observed
context steps), so training sees what :meth:`TimeMoEForecaster.forecast` feeds the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import JsonConfig
from moekit.data import DataModule
from moekit.models.objectives import LossWeights, Objective, ObjectiveOutput
from moekit.timeseries import HOLDOUT, Series, SyntheticConfig, fit_scale, generate_synthetic, load_builtin


def masked_huber(
    pred_BLh: Tensor, target_BLh: Tensor, mask_BLh: Tensor, delta: float
) -> tuple[Tensor, Tensor]:
    """``(sum of Huber losses over masked-in elements, their count)``, in float32 or wider."""
    dtype = torch.promote_types(pred_BLh.dtype, torch.float32)
    loss = F.huber_loss(pred_BLh.to(dtype), target_BLh.to(dtype), reduction="none", delta=delta)
    m = mask_BLh.to(dtype)
    return (loss * m).sum(), m.sum()


class TimeMoEObjective(Objective):
    """Mean over heads of the masked Huber loss (each head averaged over its valid labels), plus
    the weighted aux losses.

    The aux losses come from the MoE layers, which count the router's real assignments, so the
    balance loss is right for any ``top_k`` (Time-MoE's official loss hard-codes k = 2).
    Logged metrics: ``huber`` and ``aux_loss``.

    Args:
        weights: aux-loss coefficients (:meth:`LossWeights.from_model_config` gives the config's).
        huber_delta: Huber's delta on normalised values.
    """

    def __init__(self, weights: LossWeights, huber_delta: float = 2.0) -> None:
        self.weights = weights
        self.huber_delta = float(huber_delta)

    @classmethod
    def for_config(cls, config: Any, **overrides: float | None) -> TimeMoEObjective:
        """The objective a :class:`~moekit.models.timemoe.TimeMoEConfig` recommends."""
        return cls(LossWeights.from_model_config(config, **overrides), config.huber_delta)

    def forward(self, model: nn.Module, batch: dict[str, Tensor], moe_k: int | None = None) -> Any:
        """``model(context, mask, moe_k=moe_k)``."""
        return model(batch["context"], batch["mask"], moe_k=moe_k)

    def task_loss(self, output: Any, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """``(mean over heads of each head's mean Huber, number of valid labels)``."""
        per_head, count = [], 0
        for k, pred in enumerate(output.predictions):
            total, n = masked_huber(pred, batch[f"target_{k}"], batch[f"target_mask_{k}"], self.huber_delta)
            per_head.append(total / n.clamp_min(1.0))
            count += int(n)
        return torch.stack(per_head).mean(), count

    def loss(self, output: Any, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """``huber + weighted aux``."""
        huber, _ = self.task_loss(output, batch)
        aux_losses = output.aux_losses or {}
        aux = self.weights.weighted(aux_losses, huber)
        return ObjectiveOutput(
            loss=huber + aux,
            metrics={"huber": huber, "aux_loss": aux},
            aux_losses=aux_losses,
            routing=list(output.routing or []),
        )

    def eval_loss(self, output: Any, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """Mean Huber over heads and the number of valid labels."""
        return self.task_loss(output, batch)


@dataclass(kw_only=True)
class SeriesDataConfig(JsonConfig):
    """Where the pretraining windows come from and how they are drawn.

    Attributes:
        batch_size: windows per batch.
        num_synthetic: synthetic series (:func:`moekit.timeseries.generate_synthetic`).
        synthetic_seed: their seed.
        real_series: built-in real series to add (``"pretrain"``, a list of names, or ``"none"``);
            the :data:`~moekit.timeseries.HOLDOUT` series are refused, so zero-shot numbers stay
            zero-shot.
        num_val_series: synthetic validation series (another seed), one fixed window each.
        seed: the batch sampler's seed.
        min_context: windows end at least this many steps into a series.
    """

    batch_size: int = 32
    num_synthetic: int = 256
    synthetic_seed: int = 0
    real_series: str | tuple[str, ...] = "pretrain"
    num_val_series: int = 32
    seed: int = 0
    min_context: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.real_series, list):
            self.real_series = tuple(self.real_series)
        for f in ("batch_size", "num_val_series", "min_context"):
            if getattr(self, f) < 1:
                raise ValueError(f"SeriesDataConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.num_synthetic < 0:
            raise ValueError(f"SeriesDataConfig.num_synthetic must be >= 0, got {self.num_synthetic}")
        names = (self.real_series,) if isinstance(self.real_series, str) else self.real_series
        held = sorted(set(names) & {*HOLDOUT, "holdout", "all"})
        if held:
            raise ValueError(
                f"SeriesDataConfig.real_series includes held-out series {held}; they are kept for "
                "zero-shot evaluation: use 'pretrain' or names outside moekit.timeseries.HOLDOUT"
            )


def cut_windows(
    values: list[np.ndarray], series_index: np.ndarray, ends: np.ndarray, context_length: int, horizons
) -> dict[str, np.ndarray]:
    """Windows of ``context_length`` steps ending (exclusive) at ``ends[b]`` in series
    ``series_index[b]``, with every head's labels (``make_windows``' layout), normalised by the
    context's scale. Returns numpy arrays named as the batch keys (see the module doc)."""
    max_h = max(horizons)
    num_b, length = len(ends), context_length
    ctx = np.zeros((num_b, length))
    ctx_mask = np.zeros((num_b, length), dtype=bool)
    padded_rows, real_rows = [], []
    for b, (i, end) in enumerate(zip(series_index, ends)):
        x = values[int(i)]
        padded = np.concatenate([np.zeros(length), x, np.zeros(max_h)])
        real = np.concatenate([np.zeros(length, bool), np.ones(x.shape[0], bool), np.zeros(max_h, bool)])
        pos = np.arange(length) + int(end)  # end - L + offset, shifted by the L-step left pad
        ctx[b], ctx_mask[b] = padded[pos], real[pos]
        padded_rows.append(padded[pos[0] : pos[-1] + max_h + 1])
        real_rows.append(real[pos[0] : pos[-1] + max_h + 1])
    scale = fit_scale(ctx, "std", ctx_mask)
    seg = np.stack(padded_rows)
    seg_real = np.stack(real_rows)
    out = {"context": np.where(ctx_mask, scale.apply(ctx), 0.0), "mask": ctx_mask}
    for k, h in enumerate(horizons):
        idx_Lh = np.arange(length)[:, None] + 1 + np.arange(h)[None, :]
        mask_BLh = seg_real[:, idx_Lh] & ctx_mask[:, :, None]
        scaled = (seg[:, idx_Lh] - scale.loc[:, :, None]) / scale.scale[:, :, None]
        out[f"target_{k}"] = np.where(mask_BLh, scaled, 0.0)
        out[f"target_mask_{k}"] = mask_BLh
    return out


def _to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {
        k: torch.from_numpy(v) if v.dtype == bool else torch.from_numpy(v.astype(np.float32))
        for k, v in arrays.items()
    }


def training_series(config: SeriesDataConfig, series: list[Series] | None = None) -> list[Series]:
    """The pretraining series ``config`` describes (synthetic, then built-in real), or ``series``,
    keeping those longer than ``min_context``; ValueError on a hold-out series or none left."""
    if series is None:
        series = (
            list(
                generate_synthetic(
                    SyntheticConfig(num_series=config.num_synthetic, seed=config.synthetic_seed)
                ).series
            )
            if config.num_synthetic
            else []
        )
        if config.real_series != "none":
            series += load_builtin(config.real_series)
    held = [s.unique_id for s in series if s.unique_id in HOLDOUT]
    if held:
        raise ValueError(f"training series {held} are in the zero-shot hold-out; remove them")
    series = [s for s in series if len(s) > config.min_context]
    if not series:
        raise ValueError(f"no training series longer than min_context={config.min_context} steps")
    return series


def validation_series(config: SeriesDataConfig) -> list[Series]:
    """``num_val_series`` synthetic validation series (their own seed, apart from training's)."""
    val_cfg = SyntheticConfig(num_series=config.num_val_series, seed=config.synthetic_seed + 10_007)
    return list(generate_synthetic(val_cfg).series)


class SeriesDataModule(DataModule):
    """Random pretraining windows from synthetic and built-in real series; resumable exactly.

    Each batch draws ``batch_size`` (series, end) pairs uniformly over all valid context ends
    (so long series give more windows) from its own ``torch.Generator``. Validation is one fixed
    window per synthetic validation series (a different seed), ending ``max(horizons)`` steps
    before the series end so every label is real.

    Args:
        config: the :class:`SeriesDataConfig`.
        context_length: the model's context L.
        horizons: the model's heads, in its order.
        series: use these training series instead of the built-in ones (tests, user data).
    """

    def __init__(
        self,
        config: SeriesDataConfig,
        context_length: int,
        horizons: tuple[int, ...],
        series: list[Series] | None = None,
    ) -> None:
        self.config = config
        self.context_length = int(context_length)
        self.horizons = tuple(horizons)
        series = training_series(config, series)
        self.series = series
        self._values = [s.values for s in series]
        # Valid exclusive context ends of series i: min_context .. T_i - 1 (one label at least).
        self._num_ends = np.array([len(s) - config.min_context for s in series], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._num_ends)])
        self.generator = torch.Generator().manual_seed(config.seed)
        self.num_batches = 0
        self._val_values = [s.values for s in validation_series(config)]

    @classmethod
    def for_model(
        cls, config: SeriesDataConfig, model_config: Any, series: list[Series] | None = None
    ) -> SeriesDataModule:
        """The data module for a model config with ``context_length`` and ``horizons``."""
        return cls(config, model_config.context_length, tuple(model_config.horizons), series)

    def _sample(self) -> tuple[np.ndarray, np.ndarray]:
        flat = torch.randint(
            int(self._offsets[-1]), (self.config.batch_size,), generator=self.generator
        ).numpy()
        index = np.searchsorted(self._offsets, flat, side="right") - 1
        ends = flat - self._offsets[index] + self.config.min_context
        return index, ends

    def next_train_batch(self) -> dict[str, Tensor]:
        """The next random batch (advances the generator)."""
        index, ends = self._sample()
        self.num_batches += 1
        return _to_tensors(cut_windows(self._values, index, ends, self.context_length, self.horizons))

    def val_batches(self) -> list[dict[str, Tensor]]:
        """Fixed windows of the validation series, in batches of ``batch_size``."""
        max_h = max(self.horizons)
        idx = np.arange(len(self._val_values))
        ends = np.array([max(1, v.shape[0] - max_h) for v in self._val_values])
        size = self.config.batch_size
        return [
            _to_tensors(
                cut_windows(
                    self._val_values,
                    idx[i : i + size],
                    ends[i : i + size],
                    self.context_length,
                    self.horizons,
                )
            )
            for i in range(0, len(idx), size)
        ]

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": state tensor, "num_batches"}``."""
        return {"generator": self.generator.get_state(), "num_batches": self.num_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
        self.num_batches = int(state["num_batches"])

    def describe(self) -> dict[str, Any]:
        """Series counts and steps, and the held-out names (for the run log)."""
        return {
            "num_series": len(self.series),
            "num_steps": int(sum(len(s) for s in self.series)),
            "num_real_series": sum(not s.unique_id.startswith("synthetic.") for s in self.series),
            "holdout": list(HOLDOUT),
        }
