"""Expert specialisation of a trained forecaster: expert use per series, grouped by frequency/regime.

Usage (after ``moekit ts-train``)::

    python benchmarks/ts_specialisation.py --model runs/timemoe-small \
        --png docs/img/ts_specialisation_timemoe.png

Each series (the held-out and pretraining real series, plus unseen synthetic series drawn with
another seed) is cut to the model's last ``context_length`` steps, normalised the way
``forecast`` does, and run through one forward pass alone (no padding). ``MoEOutput.routing``
gives the expert ids per token; their counts make one expert-use distribution per series and MoE
layer. Groups: real series by frequency (``MS``, ``QS``, ``YS``), synthetic series by dominant
period (``syn p=12``), and, within synthetic series, the tokens of regime 0 against regime 1.

Prints, per MoE layer, the mean Jensen-Shannon divergence (bits, 0..1) between pairs of series in
the same group and in different groups; a ratio between/within above 1 means expert use depends
on the group. Saves a heatmap (series rows sorted by group, layer x expert columns).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

import moekit
from moekit.timeseries import SyntheticConfig, fit_scale, generate_synthetic, load_builtin


def js_divergence(p_E: np.ndarray, q_E: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two distributions ``[E]`` (0 = equal, 1 = disjoint)."""
    m_E = 0.5 * (p_E + q_E)

    def kl(a_E: np.ndarray) -> float:
        nz = a_E > 0
        return float(np.sum(a_E[nz] * np.log2(a_E[nz] / m_E[nz])))

    return 0.5 * kl(p_E) + 0.5 * kl(q_E)


def _context(model) -> tuple[int, str]:
    cfg = model.config
    method = getattr(cfg, "normalization", None) or getattr(cfg, "scale_method", "std")
    return int(cfg.context_length), method


@torch.no_grad()
def expert_use(
    model, values: np.ndarray, regime: np.ndarray | None = None
) -> tuple[np.ndarray, list, np.ndarray | None]:
    """``(use [L, E], ids per layer [T, K], regime per token [T] or None)`` of one series.

    ``use`` is the share of token assignments per expert in each MoE layer. A token's regime is
    that of its last step (Moirai tokens are patches, left-padded to a multiple of P).
    """
    ctx, method = _context(model)
    x_1T = np.asarray(values, np.float64)[-ctx:][None, :]
    z_1T = fit_scale(x_1T, method).apply(x_1T)
    param = next(model.parameters())
    model.eval()
    out = model(torch.as_tensor(z_1T, dtype=param.dtype, device=param.device))
    num_tokens = out.routing[0].expert_ids.shape[0]
    step = -(-x_1T.shape[1] // num_tokens)
    reg_T = None
    if regime is not None:
        r = np.asarray(regime)[-ctx:]
        ends = r.shape[0] - 1 - (num_tokens - 1 - np.arange(num_tokens)) * step
        reg_T = r[np.clip(ends, 0, r.shape[0] - 1)]
    use_LE, ids = [], []
    for info in out.routing:
        ids_TK = info.expert_ids.cpu().numpy()
        ids.append(ids_TK)
        use_LE.append(_shares(ids_TK, info.router_logits.shape[-1]))
    return np.array(use_LE), ids, reg_T


def _shares(ids_TK: np.ndarray, num_experts: int) -> np.ndarray:
    counts = np.bincount(ids_TK[ids_TK >= 0], minlength=num_experts).astype(np.float64)
    return counts / counts.sum() if counts.sum() else np.full(num_experts, np.nan)


def collect(model, num_synthetic: int, seed: int):
    """Rows ``(unique_id, group, use [L, E])`` and, for synthetic series, ``(ids per layer, regime [T])``."""
    rows = []
    for s in load_builtin("all"):
        if len(s) >= 16:
            rows.append((s.unique_id, f"real {s.freq}", expert_use(model, s.values)[0]))
    syn = generate_synthetic(SyntheticConfig(num_series=num_synthetic, seed=seed))
    tokens = []
    for s, period, reg in zip(syn.series, syn.periods, syn.regimes, strict=True):
        use, ids, reg_T = expert_use(model, s.values, reg)
        rows.append((s.unique_id, f"syn p={int(period)}", use))
        tokens.append((ids, reg_T))
    return rows, tokens


def regime_divergence(tokens, layer: int, shift_rng: np.random.Generator | None = None) -> float:
    """Mean JS between the expert use of a series' regime-0 and regime-1 tokens (series with both).

    With ``shift_rng`` the regime labels are circularly shifted by a random offset first: the
    control keeps the segments' lengths and contiguity but breaks their link to the regime.
    """
    out = []
    for ids, reg_T in tokens:
        if shift_rng is not None:
            reg_T = np.roll(reg_T, int(shift_rng.integers(1, reg_T.shape[0])))
        ids_TK = ids[layer]
        num_e = int(ids_TK.max()) + 1
        a, b = _shares(ids_TK[reg_T == 0], num_e), _shares(ids_TK[reg_T == 1], num_e)
        if not (np.isnan(a).any() or np.isnan(b).any()):
            out.append(js_divergence(a, b))
    return float(np.mean(out)) if out else float("nan")


def group_divergence(rows, layer: int, labels: list[str] | None = None) -> tuple[float, float]:
    """(mean JS within groups, mean JS between groups) over all pairs of series, in one layer."""
    labels = labels or [r[1] for r in rows]
    within, between = [], []
    for (ga, ra), (gb, rb) in itertools.combinations(zip(labels, rows, strict=True), 2):
        (within if ga == gb else between).append(js_divergence(ra[2][layer], rb[2][layer]))
    return float(np.mean(within)), float(np.mean(between))


def plot(rows, png: Path, title: str) -> None:
    """Heatmap: one row per series (sorted by group), columns layer x expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (not r[1].startswith("real"), r[1], r[0]))
    num_layers, num_e = rows[0][2].shape
    mat = np.stack([r[2].reshape(-1) for r in rows])
    fig, ax = plt.subplots(figsize=(2.2 + 0.35 * num_layers * num_e, 2 + 0.12 * len(rows)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest")
    for layer in range(1, num_layers):
        ax.axvline(layer * num_e - 0.5, color="white", lw=2)
    groups = [r[1] for r in rows]
    starts = [i for i in range(len(groups)) if i == 0 or groups[i] != groups[i - 1]]
    for i in starts[1:]:
        ax.axhline(i - 0.5, color="white", lw=1)
    ax.set_yticks([(a + b - 1) / 2 for a, b in zip(starts, [*starts[1:], len(groups)], strict=True)])
    ax.set_yticklabels(
        [f"{groups[i]} ({n})" for i, n in zip(starts, np.diff([*starts, len(groups)]), strict=True)]
    )
    ax.set_xticks(range(num_layers * num_e))
    ax.set_xticklabels(
        [f"L{i // num_e}e{i % num_e}" for i in range(num_layers * num_e)], rotation=90, fontsize=7
    )
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of token assignments")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a forecast-family run/model folder")
    p.add_argument("--png", required=True, help="heatmap output path")
    p.add_argument("--num-synthetic", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234, help="synthetic seed (not the pretraining one)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = moekit.from_pretrained(args.model)
    rows, tokens = collect(model, args.num_synthetic, args.seed)
    name = Path(args.model).name
    num_layers = rows[0][2].shape[0]
    rng = np.random.default_rng(0)
    print(f"{name}: {len(rows)} series, groups " + ", ".join(sorted({r[1] for r in rows})))
    print("layer | JS within | JS between | between/within | same, labels shuffled (20x)")
    for layer in range(num_layers):
        w, b = group_divergence(rows, layer)
        shuffled = []
        for _ in range(20):
            labels = [r[1] for r in rows]
            rng.shuffle(labels)
            sw, sb = group_divergence(rows, layer, labels)
            shuffled.append(sb / sw)
        print(
            f"{layer} | {w:.4f} | {b:.4f} | {b / w:.2f} | {np.mean(shuffled):.2f} +- {np.std(shuffled):.2f}"
        )
    print("layer | JS regime-0 vs regime-1 tokens, same series | control: labels circularly shifted (20x)")
    for layer in range(num_layers):
        real = regime_divergence(tokens, layer)
        ctrl = [regime_divergence(tokens, layer, rng) for _ in range(20)]
        print(f"{layer} | {real:.4f} | {np.mean(ctrl):.4f} +- {np.std(ctrl):.4f}")
    plot(rows, Path(args.png), f"{name}: expert use per series (rows grouped by frequency / period)")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
