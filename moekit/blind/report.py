"""The files ``blind unblind`` writes: report.md, plot.png, summary.json, FastChat battles, alpaca_eval JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from moekit.blind.unblind import alpaca_eval, analyse, fastchat_battles


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x) -> str:
    """A p-value: 4 decimals, or two significant digits below 0.001 (never a bare 0.0000)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.4f}"


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def render_markdown(result: dict) -> str:
    """The markdown report of :func:`moekit.blind.unblind.analyse`'s result."""
    lines = [
        "# Blind comparison: unblinded",
        "",
        f"Folders: {', '.join(result['folders'])}. Systems: {', '.join(f'`{s}`' for s in result['systems'])}.",
        f"{result['num_judged_pairs']} of {result['num_pairs']} pairs judged, {result['num_judgments']} "
        f"judgments by {len(result['raters'])} rater(s): {', '.join(result['raters']) or 'none'}.",
        "When several raters judged a pair, its outcome is their most common verdict (a split vote is a tie).",
        "",
        "## Head to head",
        "",
        "| A | B | pairs | A wins | B wins | ties (both bad) | A win rate, ties dropped [95% Wilson] | sign test p |"
        " A win rate, ties split [95% Wilson] | p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in result["head_to_head"]:
        d, s = h["dropped"], h["split"]
        lines.append(
            f"| `{h['a']}` | `{h['b']}` | {h['num_pairs']} | {h['wins']} | {h['losses']} | {h['ties']} ({h['both_bad']}) | "
            f"{_pct(d['rate'])} [{_pct(d['low'])}, {_pct(d['high'])}] | {_p(d['p'])} | "
            f"{_pct(s['rate'])} [{_pct(s['low'])}, {_pct(s['high'])}] | {_p(s['p'])} |"
        )
    lines += [
        "",
        "Sign test: two-sided exact binomial test against 0.5 (scipy.stats.binomtest) on the decisive pairs; "
        "ties split gives each side half the ties (an odd tie left out).",
        "",
        "### Scores (1-5), Wilcoxon signed-rank",
        "",
        "| A | B | pairs scored on both sides | nonzero differences | mean A | mean B | W | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h in result["head_to_head"]:
        w = h["wilcoxon"]
        lines.append(
            f"| `{h['a']}` | `{h['b']}` | {w['n']} | {w['n_nonzero']} | {_f(w['mean_a'], 2)} | {_f(w['mean_b'], 2)} | "
            f"{_f(w['statistic'], 1)} | {_p(w['p'])} |"
        )
    identical = sum(h["identical_answers"] for h in result["head_to_head"])
    if identical:
        lines += [
            "",
            f"{identical} pair(s) had character-identical answers (a rater can only call those a tie).",
        ]
    bt = result.get("bradley_terry")
    if bt:
        lines += [
            "",
            "## Bradley-Terry (Elo scale, 95% percentile bootstrap)",
            "",
            "| system | Elo | interval |",
            "|---|---|---|",
        ]
        order = sorted(range(len(bt["systems"])), key=lambda i: -bt["elo"][i])
        for i in order:
            lines.append(
                f"| `{bt['systems'][i]}` | {bt['elo'][i]:.0f} | [{bt['low'][i]:.0f}, {bt['high'][i]:.0f}] |"
            )
    pb, lb = result["position_bias"], result["length_bias"]
    lines += [
        "",
        "## Biases",
        "",
        f"- Position: the left answer won {pb['left_wins']} of {pb['decisive']} decisive judgments "
        f"({_pct(pb['rate'])} [{_pct(pb['low'])}, {_pct(pb['high'])}]), binomial p = {_p(pb['p'])} against 50%.",
        f"- Length: the longer answer won {lb['longer_wins']} of {lb['decisive_unequal']} decisive pairs of unequal length "
        f"({_pct(lb['rate'])} [{_pct(lb['low'])}, {_pct(lb['high'])}]), binomial p = {_p(lb['p'])}.",
        "- Mean answer length (characters): "
        + ", ".join(f"`{s}` {_f(v, 1)}" for s, v in result["mean_length"].items())
        + ".",
    ]
    if len(result["position_bias_by_rater"]) > 1:
        for rater, p in result["position_bias_by_rater"].items():
            lines.append(f"  - `{rater}`: left won {p['left_wins']} of {p['decisive']} (p = {_p(p['p'])})")
    ag = result["agreement"]
    lines += ["", "## Rater agreement", ""]
    if ag["shared_pairs"]:
        lines.append(
            f"{ag['shared_pairs']} pairs judged by two or more raters; Krippendorff's alpha (nominal) = {_f(ag['alpha'])}."
        )
        for name, k in ag["kappa"].items():
            lines.append(f"- Cohen's kappa, {name}: {_f(k['kappa'])} over {k['n']} pairs")
    else:
        lines.append("No pair was judged by two raters.")
    lines += [
        "",
        "## Files",
        "",
        "- `plot.png`: win / tie / loss shares with the Wilson interval (and Bradley-Terry ratings with more than two systems)",
        "- `battles.jsonl`: one FastChat battle row per judgment (`model_a` is the left answer)",
        "- `alpaca_eval.json`: alpaca_eval annotations and leaderboard against the baseline",
        "- `summary.json`: every number above",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Stacked win/tie/loss bars per head-to-head with the ties-dropped Wilson interval; BT ratings too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = result["head_to_head"]
    bt = result.get("bradley_terry")
    fig, axes = plt.subplots(
        1, 2 if bt else 1, figsize=(11 if bt else 7, 1.9 + 0.6 * max(1, len(heads))), squeeze=False
    )
    ax = axes[0][0]
    for row, h in enumerate(heads):
        n = max(1, h["num_pairs"])
        shares = [h["wins"] / n, (h["ties"] - h["both_bad"]) / n, h["both_bad"] / n, h["losses"] / n]
        left = 0.0
        for share, color, label in zip(
            shares, ["#4f9d69", "#c9c9c9", "#8c8c8c", "#c0504d"], ["A wins", "tie", "both bad", "B wins"]
        ):
            ax.barh(row, share, left=left, color=color, label=label if row == 0 else None)
            left += share
        d = h["dropped"]
        if not math.isnan(d["rate"]):
            ax.errorbar(
                d["rate"],
                row,
                xerr=[[d["rate"] - d["low"]], [d["high"] - d["rate"]]],
                fmt="ko",
                capsize=4,
                label="A win rate, ties dropped (95% Wilson)" if row == 0 else None,
            )
    ax.axvline(0.5, color="k", lw=0.6, ls=":")
    ax.set_yticks(range(len(heads)), [f"{h['a']}\nvs {h['b']}" for h in heads], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judged pairs")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.02), ncol=3, frameon=False)
    if bt:
        ax2 = axes[0][1]
        order = sorted(range(len(bt["systems"])), key=lambda i: bt["elo"][i])
        ys = range(len(order))
        elo = [bt["elo"][i] for i in order]
        ax2.errorbar(
            elo,
            ys,
            xerr=[
                [e - bt["low"][i] for e, i in zip(elo, order)],
                [bt["high"][i] - e for e, i in zip(elo, order)],
            ],
            fmt="o",
            capsize=4,
        )
        ax2.set_yticks(list(ys), [bt["systems"][i] for i in order], fontsize=8)
        ax2.set_xlabel("Bradley-Terry rating (Elo scale, 95% bootstrap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _clean(obj):
    """NaN (no data) as JSON null, so summary.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_unblind(
    folders,
    out: str | Path | None = None,
    raters=None,
    skip_bad_lines=False,
    warn=None,
    num_resamples: int = 200,
    seed: int = 0,
    make_plot: bool = True,
) -> tuple[Path, dict]:
    """Runs :func:`~moekit.blind.unblind.analyse` and writes every output file under ``out``.

    ``out`` defaults to ``<first folder>/unblind``. Returns ``(out, result)``.
    """
    folders = [Path(f) for f in folders]
    result, judgments, outcomes = analyse(folders, raters, skip_bad_lines, warn, num_resamples, seed)
    out = Path(out) if out else folders[0] / "unblind"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(_clean(result), indent=1) + "\n")
    (out / "report.md").write_text(render_markdown(result))
    with open(out / "battles.jsonl", "w") as f:
        for row in fastchat_battles(judgments):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "alpaca_eval.json").write_text(
        json.dumps(_clean(alpaca_eval(outcomes, result["systems"])), indent=1, ensure_ascii=False) + "\n"
    )
    if make_plot and result["head_to_head"]:
        plot(result, out / "plot.png")
    return out, result
