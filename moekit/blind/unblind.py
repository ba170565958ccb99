"""``blind unblind``: join the ratings with the sealed key and compute what evaluators expect.

Units. A *judgment* is one rater's verdict on one pair. When several raters judged a pair, the
win-rate, sign, Wilcoxon, length and Bradley-Terry numbers use one *consensus* outcome per pair
(the most common verdict in system terms; a split vote counts as a tie; scores averaged), so a pair
is never counted twice as if raters were independent samples. Position bias is a property of each
rater, so it is counted over judgments, as is rater agreement (over pairs with two or more raters).

Verdicts in system terms: a system's name (it won), ``tie`` or ``both_bad``. Both-bad counts as a
tie in win rates (FastChat's ``tie (bothbad)``) and is reported on its own too.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from moekit.blind.make import read_key, read_pairs
from moekit.blind.ratings import read_folder_ratings
from moekit.blind.stats import (
    binomial_p,
    bradley_terry_bootstrap,
    cohen_kappa,
    krippendorff_alpha_nominal,
    wilcoxon_scores,
    wilson_interval,
    win_rate,
)


@dataclass(frozen=True)
class ShownPair:
    """A pair with the key applied: who answered on each side."""

    unit: str  # "<folder>/<pair_id>": unique across several blind folders
    pair_id: str
    prompt_id: str
    prompt: str
    left: str
    right: str
    left_system: str
    right_system: str


@dataclass(frozen=True)
class Judgment:
    """One rater's verdict on one pair, in screen and in system terms."""

    pair: ShownPair
    rater: str
    choice: str  # left, right, tie, both_bad
    score_left: int | None
    score_right: int | None
    time: float

    @property
    def verdict(self) -> str:
        """The winning system's name, ``tie`` or ``both_bad``."""
        return {"left": self.pair.left_system, "right": self.pair.right_system}.get(self.choice, self.choice)


def unblinded_pairs(folder: str | Path) -> list[ShownPair]:
    """The pairs of a blind folder with the sealed key applied (in rating order)."""
    key, _ = read_key(folder)
    out = []
    for p in read_pairs(folder):
        if p.pair_id not in key:
            raise ValueError(f"{folder}: pair {p.pair_id} is not in the key")
        k = key[p.pair_id]
        out.append(
            ShownPair(
                f"{folder}/{p.pair_id}", p.pair_id, p.prompt_id, p.prompt, p.left, p.right, k.left, k.right
            )
        )
    return out


def system_order(folders) -> list[str]:
    """Every system of the folders, in the order their keys list them (``--a`` before ``--b``)."""
    names: list[str] = []
    for folder in folders:
        for name in read_key(folder)[1]["systems"]:
            if name not in names:
                names.append(name)
    return names


def collect_judgments(
    folders, raters=None, skip_bad_lines=False, warn=None
) -> tuple[list[ShownPair], list[Judgment]]:
    """All pairs and all verdicts (ratings with a choice) of the folders."""
    pairs, judgments = [], []
    for folder in folders:
        shown = unblinded_pairs(folder)
        by_id = {p.pair_id: p for p in shown}
        pairs += shown
        for rater, current in read_folder_ratings(folder, raters, skip_bad_lines, warn).items():
            for pair_id, r in current.items():
                if pair_id not in by_id:
                    raise ValueError(
                        f"{folder}: rater {rater!r} rated pair {pair_id!r}, which is not in pairs.jsonl"
                    )
                if r.choice is not None:
                    judgments.append(
                        Judgment(by_id[pair_id], rater, r.choice, r.score_left, r.score_right, r.time)
                    )
    return pairs, judgments


@dataclass(frozen=True)
class Consensus:
    """One pair's outcome over its raters: verdict in system terms and mean scores per system."""

    pair: ShownPair
    verdict: str
    score: dict  # system -> mean score over the raters who scored that side (absent: none did)
    num_raters: int


def consensus(judgments: list[Judgment]) -> list[Consensus]:
    """One outcome per pair: the most common verdict, a tied vote becoming ``tie``."""
    by_unit: dict[str, list[Judgment]] = {}
    for j in judgments:
        by_unit.setdefault(j.pair.unit, []).append(j)
    out = []
    for group in by_unit.values():
        counts = Counter(j.verdict for j in group).most_common()
        top = [v for v, c in counts if c == counts[0][1]]
        verdict = top[0] if len(top) == 1 else "tie"
        pair = group[0].pair
        score = {}
        for system, side in ((pair.left_system, "score_left"), (pair.right_system, "score_right")):
            vals = [getattr(j, side) for j in group if getattr(j, side) is not None]
            if vals:
                score[system] = sum(vals) / len(vals)
        out.append(Consensus(pair, verdict, score, len(group)))
    return out


def head_to_head(outcomes: list[Consensus], a: str, b: str) -> dict:
    """Win rate of ``a`` against ``b`` (both tie treatments), both-bad count, Wilcoxon on scores."""
    mine = [c for c in outcomes if {c.pair.left_system, c.pair.right_system} == {a, b}]
    wins = sum(c.verdict == a for c in mine)
    losses = sum(c.verdict == b for c in mine)
    both_bad = sum(c.verdict == "both_bad" for c in mine)
    ties = len(mine) - wins - losses
    scored = [c for c in mine if a in c.score and b in c.score]
    out = {"a": a, "b": b, "num_pairs": len(mine), "both_bad": both_bad, **win_rate(wins, losses, ties)}
    out["wilcoxon"] = wilcoxon_scores([c.score[a] for c in scored], [c.score[b] for c in scored])
    out["identical_answers"] = sum(c.pair.left == c.pair.right for c in mine)
    return out


def position_bias(judgments: list[Judgment]) -> dict:
    """How often the left answer wins among decisive judgments, with a binomial test against 0.5."""
    decisive = [j for j in judgments if j.choice in ("left", "right")]
    left = sum(j.choice == "left" for j in decisive)
    low, high = wilson_interval(left, len(decisive))
    return {
        "decisive": len(decisive),
        "left_wins": left,
        "rate": left / len(decisive) if decisive else math.nan,
        "low": low,
        "high": high,
        "p": binomial_p(left, len(decisive)),
    }


def length_bias(outcomes: list[Consensus]) -> dict:
    """How often the longer answer (in characters) wins among decisive pairs of unequal length."""
    rows = []
    for c in outcomes:
        if c.verdict not in (c.pair.left_system, c.pair.right_system) or len(c.pair.left) == len(
            c.pair.right
        ):
            continue
        longer = c.pair.left_system if len(c.pair.left) > len(c.pair.right) else c.pair.right_system
        rows.append(c.verdict == longer)
    k, n = sum(rows), len(rows)
    low, high = wilson_interval(k, n)
    return {
        "decisive_unequal": n,
        "longer_wins": k,
        "rate": k / n if n else math.nan,
        "low": low,
        "high": high,
        "p": binomial_p(k, n),
    }


def agreement(judgments: list[Judgment]) -> dict:
    """Rater agreement on pairs judged by two or more raters: Krippendorff's alpha (nominal, any
    number of raters) and Cohen's kappa for each pair of raters, over the pairs both judged."""
    raters = sorted({j.rater for j in judgments})
    table: dict[str, dict[str, str]] = {}
    for j in judgments:
        table.setdefault(j.pair.unit, {})[j.rater] = j.verdict
    shared = {u: v for u, v in table.items() if len(v) >= 2}
    out = {"raters": raters, "shared_pairs": len(shared), "alpha": math.nan, "kappa": {}}
    if not shared:
        return out
    out["alpha"] = krippendorff_alpha_nominal([[row.get(r) for r in raters] for row in shared.values()])
    for r1, r2 in itertools.combinations(raters, 2):
        both = [row for row in shared.values() if r1 in row and r2 in row]
        if both:
            out["kappa"][f"{r1} vs {r2}"] = {
                "n": len(both),
                "kappa": cohen_kappa([b[r1] for b in both], [b[r2] for b in both]),
            }
    return out


def analyse(
    folders, raters=None, skip_bad_lines=False, warn=None, num_resamples: int = 200, seed: int = 0
) -> dict:
    """Everything ``unblind`` reports: ``(result, judgments, outcomes)``, ``result`` a JSON-able dict.

    ``num_resamples`` and ``seed`` drive the Bradley-Terry bootstrap (only with more than two systems).
    """
    folders = [Path(f) for f in folders]
    systems = system_order(folders)
    pairs, judgments = collect_judgments(folders, raters, skip_bad_lines, warn)
    outcomes = consensus(judgments)
    result = {
        "folders": [str(f) for f in folders],
        "systems": systems,
        "num_pairs": len(pairs),
        "num_judged_pairs": len(outcomes),
        "num_judgments": len(judgments),
        "raters": sorted({j.rater for j in judgments}),
        "head_to_head": [
            head_to_head(outcomes, a, b)
            for a, b in itertools.combinations(systems, 2)
            if any({c.pair.left_system, c.pair.right_system} == {a, b} for c in outcomes)
        ],
        "position_bias": position_bias(judgments),
        "position_bias_by_rater": {
            r: position_bias([j for j in judgments if j.rater == r])
            for r in sorted({j.rater for j in judgments})
        },
        "length_bias": length_bias(outcomes),
        "mean_length": {
            s: _mean(
                [len(p.left) for p in pairs if p.left_system == s]
                + [len(p.right) for p in pairs if p.right_system == s]
            )
            for s in systems
        },
        "agreement": agreement(judgments),
        "bradley_terry": None,
    }
    if len(systems) > 2 and outcomes:
        index = {s: i for i, s in enumerate(systems)}
        games = [
            (
                index[c.pair.left_system],
                index[c.pair.right_system],
                1.0 if c.verdict == c.pair.left_system else 0.0 if c.verdict == c.pair.right_system else 0.5,
            )
            for c in outcomes
        ]
        result["bradley_terry"] = {
            "systems": systems,
            **bradley_terry_bootstrap(games, len(systems), num_resamples, seed=seed),
        }
    return result, judgments, outcomes


def _mean(values) -> float:
    return sum(values) / len(values) if values else math.nan


FASTCHAT_WINNER = {"left": "model_a", "right": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}


def fastchat_battles(judgments: list[Judgment]) -> list[dict]:
    """One FastChat battle row per judgment (``clean_battle_data`` fields; model_a is the left side)."""
    return [
        {
            "question_id": j.pair.prompt_id,
            "model_a": j.pair.left_system,
            "model_b": j.pair.right_system,
            "winner": FASTCHAT_WINNER[j.choice],
            "judge": j.rater,
            "turn": 1,
            "anony": True,
            "language": "unknown",
            "tstamp": j.time,
        }
        for j in judgments
    ]


def alpaca_eval(outcomes: list[Consensus], systems: list[str]) -> dict:
    """alpaca_eval-style output against the baseline ``systems[1]`` (the ``--b`` of ``make``).

    Returns ``{"annotations": [...], "leaderboard": {...}}``: annotations use alpaca_eval's fields
    (output_1/generator_1 the baseline, output_2 the model; preference 1, 2, or 1.5 for a tie),
    the leaderboard its columns (win_rate and standard_error in percent).
    """
    base = systems[1] if len(systems) > 1 else systems[0]
    annotations, board = [], {}
    for c in outcomes:
        p = c.pair
        if base not in (p.left_system, p.right_system):
            continue
        model = p.right_system if p.left_system == base else p.left_system
        out_base, out_model = (p.left, p.right) if p.left_system == base else (p.right, p.left)
        pref = 1.0 if c.verdict == base else 2.0 if c.verdict == model else 1.5
        annotations.append(
            {
                "instruction": p.prompt,
                "output_1": out_base,
                "generator_1": base,
                "output_2": out_model,
                "generator_2": model,
                "annotator": "moekit-blind-consensus",
                "preference": pref,
            }
        )
    for model in systems:
        prefs = [a["preference"] - 1.0 for a in annotations if a["generator_2"] == model]
        if not prefs:
            continue
        from scipy.stats import sem

        n = len(prefs)
        board[model] = {
            "win_rate": 100 * sum(prefs) / n,
            "standard_error": 100 * float(sem(prefs)) if n > 1 else math.nan,
            "n_wins": sum(x == 1.0 for x in prefs),
            "n_wins_base": sum(x == 0.0 for x in prefs),
            "n_draws": sum(x == 0.5 for x in prefs),
            "n_total": n,
        }
    return {"baseline": base, "annotations": annotations, "leaderboard": board}
