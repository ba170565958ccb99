"""Pure training helpers: per-series normalisation, multi-horizon windows, horizon decomposition.

Shape legend: ``B`` windows, ``L`` context length, ``h`` one head's horizon, ``T`` series length.
Masks are boolean, ``True`` where a value is real (observed), ``False`` for padding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moekit.config import check_choice

_MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its std


@dataclass(frozen=True, eq=False)
class Scale:
    """Per-series affine normalisation ``(x - loc) / scale``; ``loc``/``scale`` have shape (..., 1)."""

    loc: np.ndarray
    scale: np.ndarray
    method: str = "std"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalises ``x`` (..., T) (any T; leading axes broadcast against ``loc``)."""
        return (np.asarray(x, dtype=np.float64) - self.loc) / self.scale

    def invert(self, z: np.ndarray) -> np.ndarray:
        """The exact inverse of :meth:`apply`: ``z * scale + loc`` for ``z`` (..., H).

        For sample paths (N, S, H) of N series, pass ``z`` with the series axis first and use
        ``Scale(loc[:, None], scale[:, None])`` or :meth:`expand`.
        """
        return np.asarray(z, dtype=np.float64) * self.scale + self.loc

    def expand(self, axis: int = -2) -> Scale:
        """The same scale with one more broadcast axis inserted (for samples or quantiles)."""
        return Scale(np.expand_dims(self.loc, axis), np.expand_dims(self.scale, axis), self.method)


def fit_scale(x: np.ndarray, method: str = "std", mask: np.ndarray | None = None) -> Scale:
    """Fits a per-row scale over the last axis of ``x`` (..., T), using only ``mask`` (..., T) positions.

    ``std``: mean and (population, ddof=0) standard deviation. ``robust``: median and 1.4826 x MAD, falling back to the
    std when the MAD is 0 (series that are mostly constant). A scale of 0 (a constant series, or
    no observed value) becomes 1, so a constant series normalises to zeros and inverts exactly.
    """
    check_choice("fit_scale", "method", method, ("std", "robust"))
    x = np.asarray(x, dtype=np.float64)
    valid = np.ones(x.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    xm = np.where(valid, x, np.nan)
    count = valid.sum(axis=-1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with no valid value give NaN, fixed below
        mean = np.nanmean(xm, axis=-1, keepdims=True)
        std = np.sqrt(np.nanmean((xm - mean) ** 2, axis=-1, keepdims=True))
        if method == "std":
            loc, scale = mean, std
        else:
            loc = np.nanmedian(xm, axis=-1, keepdims=True)
            mad = _MAD_TO_STD * np.nanmedian(np.abs(xm - loc), axis=-1, keepdims=True)
            scale = np.where(mad > 0, mad, std)
    loc = np.where(count > 0, loc, 0.0)
    scale = np.where((count > 0) & (scale > 0) & np.isfinite(scale), scale, 1.0)
    return Scale(loc, scale, method)


def _check_heads(heads: Sequence[int]) -> tuple[int, ...]:
    heads = tuple(int(h) for h in heads)
    if not heads or min(heads) < 1:
        raise ValueError(f"horizons {list(heads)} must be a non-empty list of positive integers")
    if len(set(heads)) != len(heads):
        raise ValueError(f"horizons {list(heads)} contain a duplicate; list each head once")
    return heads


def plan_horizon(horizon: int, heads: Sequence[int]) -> list[tuple[int, int]]:
    """Decomposes a forecast horizon into head calls: a list of ``(head, steps_kept)``.

    At each call the largest head that fits the remaining steps is used and all its steps are
    kept, then the forecast rolls forward. When no head fits (all heads exceed what remains),
    the smallest head is called and only the remaining steps are kept. ``heads`` may be in any
    order (the official Time-MoE code assumed ascending order). ``sum(kept) == horizon``.
    """
    heads = _check_heads(heads)
    if horizon < 0:
        raise ValueError(f"horizon={horizon} must be non-negative")
    plan = []
    remaining = horizon
    smallest = min(heads)
    while remaining > 0:
        fitting = [h for h in heads if h <= remaining]
        head = max(fitting) if fitting else smallest
        kept = min(head, remaining)
        plan.append((head, kept))
        remaining -= kept
    return plan


@dataclass(frozen=True, eq=False)
class Windows:
    """Training windows with multi-horizon labels.

    ``context`` (B, L) and ``context_mask`` (B, L): inputs, left-padded with 0/False for short
    series. ``targets[k]`` (B, L, h_k) and ``target_masks[k]`` (B, L, h_k) for ``horizons[k]`` (the
    caller's order): ``targets[k][b, t, j]`` is the value ``j + 1`` steps after context position
    ``t``; past the end of the series (or at padded positions) it is 0 and masked.
    ``series_index`` (B,) and ``end`` (B,): which series, and the exclusive end of the context in it.
    """

    context: np.ndarray
    context_mask: np.ndarray
    targets: tuple[np.ndarray, ...]
    target_masks: tuple[np.ndarray, ...]
    horizons: tuple[int, ...]
    series_index: np.ndarray
    end: np.ndarray


def window_ends(length: int, context_length: int, stride: int) -> np.ndarray:
    """Exclusive context ends for a series of ``length`` >= 2: ``L, L + stride, ...`` up to ``T - 1``.

    The last context ends at ``T - 1`` (its last input still has one label); a series with
    ``T - 1 < L`` gives one window ending at ``T - 1``, left-padded.
    """
    last = length - 1
    if last <= context_length:
        return np.array([last], dtype=np.int64)
    ends = np.arange(context_length, last + 1, stride, dtype=np.int64)
    return ends if ends[-1] == last else np.append(ends, last)


def make_windows(
    values: Sequence[np.ndarray],
    context_length: int,
    horizons: Sequence[int],
    stride: int | None = None,
) -> Windows:
    """Cuts series ``values`` (each (T_i,), T_i >= 2) into windows with labels for every horizon.

    ``stride`` (default ``context_length``: non-overlapping contexts) is the step between
    consecutive context ends; see :func:`window_ends`. Labels reach past the context into the
    series' later values and are masked only past the series end (``horizons`` unsorted is fine).
    """
    horizons = _check_heads(horizons)
    if context_length < 1:
        raise ValueError(f"context_length={context_length} must be at least 1")
    stride = context_length if stride is None else int(stride)
    if stride < 1:
        raise ValueError(f"stride={stride} must be at least 1")
    max_h = max(horizons)
    ctx, ctx_mask, series_idx, ends = [], [], [], []
    tgt: list[list[np.ndarray]] = [[] for _ in horizons]
    tgt_mask: list[list[np.ndarray]] = [[] for _ in horizons]
    offsets_L = np.arange(context_length)
    for i, raw in enumerate(values):
        x = np.asarray(raw, dtype=np.float64)
        if x.ndim != 1 or x.shape[0] < 2:
            raise ValueError(f"series {i} has shape {x.shape}; windows need 1-D series of at least 2 values")
        # Pad context_length zeros on the left and max_h on the right so every index is in range.
        padded = np.concatenate([np.zeros(context_length), x, np.zeros(max_h)])
        real = np.concatenate(
            [np.zeros(context_length, bool), np.ones(x.shape[0], bool), np.zeros(max_h, bool)]
        )
        for end in window_ends(x.shape[0], context_length, stride):
            pos_L = end - context_length + offsets_L + context_length  # index into padded
            ctx.append(padded[pos_L])
            ctx_mask.append(real[pos_L])
            for k, h in enumerate(horizons):
                idx_Lh = pos_L[:, None] + 1 + np.arange(h)[None, :]
                mask_Lh = real[idx_Lh] & real[pos_L][:, None]
                tgt[k].append(np.where(mask_Lh, padded[idx_Lh], 0.0))
                tgt_mask[k].append(mask_Lh)
            series_idx.append(i)
            ends.append(end)
    return Windows(
        context=np.stack(ctx),
        context_mask=np.stack(ctx_mask),
        targets=tuple(np.stack(t) for t in tgt),
        target_masks=tuple(np.stack(m) for m in tgt_mask),
        horizons=horizons,
        series_index=np.array(series_idx, dtype=np.int64),
        end=np.array(ends, dtype=np.int64),
    )
