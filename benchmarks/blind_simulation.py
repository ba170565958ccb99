"""Simulated raters with a known preference, position bias and ties: does `blind unblind` say what it should?

Model of one judgment. With probability ``ties`` the rater calls a tie (a quarter of those "both
bad"). Otherwise, with probability ``lazy`` the rater picks whichever answer is on the left
(position bias), and otherwise the truly better answer, where A is better with probability
``pref``. Sides are randomised per pair, so among decisive judgments A wins with probability

    p* = lazy / 2 + (1 - lazy) * pref

and the left answer wins with probability ``lazy + (1 - lazy) / 2``. Checked over many runs:

* coverage: the 95% Wilson interval (ties dropped) holds p* in ~95% of runs;
* power: the sign test's rejection rate at 5% equals the exact binomial power, averaged over the
  random number of decisive pairs (``E_n[power(n, p*)]``, n ~ Binomial(N, 1 - ties));
* the position-bias test rejects at the rate the same formula gives for the left-win probability.

The fast loop calls ``moekit.blind.stats.win_rate`` / ``binomial_p`` (what ``unblind`` calls) on
simulated counts; ``--end-to-end R`` also runs R comparisons through the real files (``make``
with fake systems, ratings appended line by line, ``unblind``'s ``analyse``) and checks that it
counts exactly what was simulated.

Run: ``OMP_NUM_THREADS=1 python benchmarks/blind_simulation.py [--runs 2000] [--end-to-end 100]``
(about a minute on one core). Prints a markdown table and writes JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import binom

from moekit.blind.stats import binomial_p, exact_sign_test_power, win_rate

SETTINGS = [  # (pairs, pref, lazy, ties)
    (50, 0.5, 0.2, 0.2),
    (50, 0.7, 0.2, 0.2),
    (100, 0.6, 0.1, 0.3),
    (100, 0.7, 0.3, 0.1),
    (200, 0.6, 0.2, 0.2),
    (200, 0.55, 0.0, 0.3),
]


def simulate(rng: np.random.Generator, pairs: int, pref: float, lazy: float, ties: float):
    """One comparison: per pair (a_on_left, verdict) with verdict in {"A", "B", "tie", "both_bad"}."""
    a_left = rng.random(pairs) < 0.5
    tie = rng.random(pairs) < ties
    both_bad = tie & (rng.random(pairs) < 0.25)
    lazy_pick = rng.random(pairs) < lazy
    a_better = rng.random(pairs) < pref
    a_wins = np.where(lazy_pick, a_left, a_better)
    verdict = np.where(tie, np.where(both_bad, "both_bad", "tie"), np.where(a_wins, "A", "B"))
    return a_left, verdict


def expected_power(pairs: int, p: float, ties: float) -> float:
    """Sign-test power averaged over the number of decisive pairs, n ~ Binomial(pairs, 1 - ties)."""
    weights = binom.pmf(np.arange(pairs + 1), pairs, 1 - ties)
    return float(sum(w * exact_sign_test_power(n, p) for n, w in enumerate(weights) if w > 1e-9 and n > 0))


def fast_loop(runs: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for pairs, pref, lazy, ties in SETTINGS:
        p_star = lazy / 2 + (1 - lazy) * pref
        p_left = lazy + (1 - lazy) / 2
        covered = rejected = left_rejected = 0
        for _ in range(runs):
            a_left, verdict = simulate(rng, pairs, pref, lazy, ties)
            wins, losses = int(np.sum(verdict == "A")), int(np.sum(verdict == "B"))
            r = win_rate(wins, losses, pairs - wins - losses)["dropped"]
            covered += r["low"] <= p_star <= r["high"]
            rejected += r["p"] <= 0.05
            decisive = (verdict == "A") | (verdict == "B")
            left_wins = int(np.sum(decisive & ((verdict == "A") == a_left)))
            left_rejected += binomial_p(left_wins, int(decisive.sum())) <= 0.05
        rows.append(
            {
                "pairs": pairs,
                "pref": pref,
                "lazy": lazy,
                "ties": ties,
                "p_star": p_star,
                "coverage": covered / runs,
                "sign_power_observed": rejected / runs,
                "sign_power_exact": expected_power(pairs, p_star, ties),
                "position_power_observed": left_rejected / runs,
                "position_power_exact": expected_power(pairs, p_left, ties),
                "runs": runs,
            }
        )
    return rows


def end_to_end(
    runs: int, seed: int, pairs: int = 60, pref: float = 0.7, lazy: float = 0.2, ties: float = 0.2
) -> dict:
    """Runs comparisons through the real files; checks unblind counts exactly what was simulated."""
    from moekit.blind import SystemSpec, make_blind, unblinded_pairs
    from moekit.blind.ratings import Rating, append_rating, rater_file
    from moekit.blind.spec import Prompt
    from moekit.blind.unblind import analyse

    rng = np.random.default_rng(seed)
    p_star = lazy / 2 + (1 - lazy) * pref
    specs = [SystemSpec(model="/sim/a", name="A"), SystemSpec(model="/sim/b", name="B")]
    prompts = [Prompt(str(i), f"q{i}") for i in range(pairs)]
    covered = exact = 0
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            out = make_blind(
                specs,
                prompts,
                Path(tmp) / str(run),
                seed=int(rng.integers(2**31)),
                answer=lambda s, t, c: [f"{s.name}{i}" for i in range(len(t))],
            )
            shown = unblinded_pairs(out)
            want = {"A": 0, "B": 0, "left": 0}
            for p in shown:
                tie = rng.random() < ties
                if tie:
                    choice = "both_bad" if rng.random() < 0.25 else "tie"
                else:
                    winner = p.left_system if rng.random() < lazy else ("A" if rng.random() < pref else "B")
                    choice = "left" if winner == p.left_system else "right"
                    want[winner] += 1
                    want["left"] += choice == "left"
                append_rating(rater_file(out, "sim"), Rating(rater="sim", pair_id=p.pair_id, choice=choice))
            result, _, _ = analyse([out])
            h = result["head_to_head"][0]
            exact += (h["wins"], h["losses"], result["position_bias"]["left_wins"]) == (
                want["A"],
                want["B"],
                want["left"],
            )
            covered += h["dropped"]["low"] <= p_star <= h["dropped"]["high"]
    return {
        "runs": runs,
        "pairs": pairs,
        "pref": pref,
        "lazy": lazy,
        "ties": ties,
        "counts_exact": exact / runs,
        "coverage": covered / runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--end-to-end", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = fast_loop(args.runs, args.seed)
    print(
        "| pairs | A pref | lazy (left) | ties | p* | Wilson coverage | sign-test power, observed | exact | "
        "position test power, observed | exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pairs']} | {r['pref']} | {r['lazy']} | {r['ties']} | {r['p_star']:.3f} | {r['coverage']:.3f} | "
            f"{r['sign_power_observed']:.3f} | {r['sign_power_exact']:.3f} | {r['position_power_observed']:.3f} | "
            f"{r['position_power_exact']:.3f} |"
        )
    e2e = end_to_end(args.end_to_end, args.seed + 1) if args.end_to_end else None
    if e2e:
        print(f"\nend to end through make/ratings files/analyse: {e2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": rows, "end_to_end": e2e}, indent=1) + "\n")


if __name__ == "__main__":
    main()
