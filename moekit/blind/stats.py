"""The statistics of a blind comparison: pure functions on counts and arrays.

scipy does the tests (``binomtest`` with its Wilson interval, ``wilcoxon``, ``bootstrap``) and
scikit-learn Cohen's kappa. Two things are written here because neither library has them:
Bradley-Terry fitted by maximum likelihood (with ``scipy.optimize``) and Krippendorff's alpha for
nominal data (the coincidence-matrix formula, tested against the ``krippendorff`` package).

Ties, both ways: *dropped* counts decisive pairs only; *split* gives each side half of the ties.
The split counts must be whole numbers for the binomial test, so an odd tie count leaves one tie
out (``wins + ties // 2`` of ``decisive + 2 * (ties // 2)``; Dixon and Mood's rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (scipy's ``proportion_ci``).

    ``trials == 0`` gives ``(nan, nan)``.
    """
    if trials == 0:
        return (math.nan, math.nan)
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def binomial_p(successes: int, trials: int, p: float = 0.5) -> float:
    """Two-sided exact binomial test p-value (``nan`` with no trials)."""
    if trials == 0:
        return math.nan
    from scipy.stats import binomtest

    return float(binomtest(successes, trials, p, alternative="two-sided").pvalue)


def win_rate(wins: int, losses: int, ties: int, confidence: float = 0.95) -> dict:
    """Win rate, Wilson interval and sign-test p-value, with ties dropped and with ties split.

    Returns:
        ``{"wins", "losses", "ties", "dropped": {"rate", "low", "high", "p", "n"}, "split": {...}}``
        where ``n`` is the number of trials the binomial sees.
    """
    out = {"wins": wins, "losses": losses, "ties": ties}
    for mode, (k, n) in {
        "dropped": (wins, wins + losses),
        "split": (wins + ties // 2, wins + losses + 2 * (ties // 2)),
    }.items():
        low, high = wilson_interval(k, n, confidence)
        out[mode] = {
            "rate": k / n if n else math.nan,
            "low": low,
            "high": high,
            "p": binomial_p(k, n),
            "n": n,
        }
    return out


def wilcoxon_scores(scores_a: Sequence[float], scores_b: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test on paired 1-5 scores (scipy; zero differences dropped, "wilcox").

    Returns ``{"n", "n_nonzero", "mean_a", "mean_b", "statistic", "p"}``; statistic and p are
    ``nan`` when there are no nonzero differences.
    """
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal lengths, got {a.shape} and {b.shape}")
    nonzero = int(np.count_nonzero(a - b))
    out = {
        "n": int(a.size),
        "n_nonzero": nonzero,
        "mean_a": float(a.mean()) if a.size else math.nan,
        "mean_b": float(b.mean()) if b.size else math.nan,
        "statistic": math.nan,
        "p": math.nan,
    }
    if nonzero:
        from scipy.stats import wilcoxon

        res = wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
        out["statistic"], out["p"] = float(res.statistic), float(res.pvalue)
    return out


ELO_SCALE, ELO_BASE, ELO_INIT = 400.0, 10.0, 1000.0  # FastChat's Elo scale for Bradley-Terry


def bradley_terry(
    winners: Sequence[int],
    losers: Sequence[int],
    weights: Sequence[float],
    num_systems: int,
    ridge: float = 1e-4,
) -> np.ndarray:
    """Bradley-Terry strengths ``theta`` (natural-log scale, summing to 0) by penalised maximum likelihood.

    P(i beats j) = sigmoid(theta_i - theta_j). Each game is ``(winner, loser, weight)``; a tie is
    two half-weight games, one each way. ``ridge`` adds ``ridge/2 * ||theta||^2`` to the negative
    log-likelihood: it keeps strengths finite when one system wins every game, and makes the
    minimiser the one with ``sum(theta) == 0``. This is L2 logistic regression without intercept on
    rows ``e_winner - e_loser`` with ``C = 1/ridge`` (what the tests compare against).
    """
    from scipy.optimize import minimize

    w_idx, l_idx = np.asarray(winners, dtype=np.int64), np.asarray(losers, dtype=np.int64)
    weight = np.asarray(weights, dtype=float)

    def loss(theta):
        d = theta[w_idx] - theta[l_idx]
        nll = np.sum(weight * np.logaddexp(0.0, -d))
        sig = weight * (1.0 / (1.0 + np.exp(d)))  # d(-log sigmoid(d))/dd = -sigmoid(-d)
        grad = np.zeros_like(theta)
        np.add.at(grad, w_idx, -sig)
        np.add.at(grad, l_idx, sig)
        return nll + 0.5 * ridge * theta @ theta, grad + ridge * theta

    res = minimize(loss, np.zeros(num_systems), jac=True, method="L-BFGS-B", options={"gtol": 1e-10})
    return res.x - res.x.mean()


def elo(theta: np.ndarray) -> np.ndarray:
    """Bradley-Terry strengths on FastChat's Elo scale (400 points = 10x odds, mean 1000)."""
    return ELO_INIT + ELO_SCALE * np.asarray(theta) / math.log(ELO_BASE)


def battle_games(outcomes: Sequence[tuple[int, int, float]]) -> tuple[list[int], list[int], list[float]]:
    """``(i, j, score_i)`` outcomes (1 win, 0 loss, 0.5 tie) as weighted ``(winner, loser)`` games."""
    winners, losers, weights = [], [], []
    for i, j, s in outcomes:
        if s == 0.5:
            winners += [i, j]
            losers += [j, i]
            weights += [0.5, 0.5]
        elif s in (0, 1):
            winners.append(i if s == 1 else j)
            losers.append(j if s == 1 else i)
            weights.append(1.0)
        else:
            raise ValueError(f"an outcome score must be 0, 0.5 or 1, got {s}")
    return winners, losers, weights


def bradley_terry_bootstrap(
    outcomes: Sequence[tuple[int, int, float]],
    num_systems: int,
    num_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Elo-scale Bradley-Terry ratings with percentile bootstrap intervals (``scipy.stats.bootstrap``).

    The outcomes (battles) are resampled with replacement and refitted. Returns
    ``{"elo": [S], "low": [S], "high": [S]}`` as lists.
    """
    from scipy.stats import bootstrap

    outcomes = list(outcomes)

    def fit(rows) -> np.ndarray:
        return elo(bradley_terry(*battle_games(rows), num_systems))

    point = fit(outcomes)
    index = np.arange(len(outcomes))
    res = bootstrap(
        (index,),
        lambda idx: fit([outcomes[i] for i in idx]),
        vectorized=False,
        n_resamples=num_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return {"elo": point.tolist(), "low": np.asarray(ci.low).tolist(), "high": np.asarray(ci.high).tolist()}


def cohen_kappa(labels_1: Sequence[str], labels_2: Sequence[str]) -> float:
    """Cohen's kappa of two raters over the same items (scikit-learn); ``nan`` with no items."""
    if len(labels_1) != len(labels_2):
        raise ValueError("Cohen's kappa needs both raters' labels for the same items")
    if not labels_1:
        return math.nan
    from sklearn.metrics import cohen_kappa_score

    if len(set(labels_1) | set(labels_2)) == 1:
        return 1.0  # one category used by both: perfect agreement (sklearn gives nan, 0/0)
    return float(cohen_kappa_score(list(labels_1), list(labels_2)))


def krippendorff_alpha_nominal(units: Sequence[Sequence[str | None]]) -> float:
    """Krippendorff's alpha for nominal labels.

    Args:
        units: one row per item, one entry per rater, ``None`` where a rater did not rate it.

    ``alpha = 1 - D_o / D_e`` from the coincidence matrix: each unit with ``m >= 2`` labels adds
    ``1/(m-1)`` for every ordered pair of its labels from different raters. ``nan`` when fewer than
    two pairable labels exist; 1.0 when only one category occurs (no disagreement possible).
    """
    cats = sorted({v for row in units for v in row if v is not None})
    where = {c: i for i, c in enumerate(cats)}
    o = np.zeros((len(cats), len(cats)))
    for row in units:
        vals = [where[v] for v in row if v is not None]
        m = len(vals)
        if m < 2:
            continue
        counts = np.bincount(vals, minlength=len(cats)).astype(float)
        o += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    n = o.sum()
    if n < 2:
        return math.nan
    marg = o.sum(axis=1)
    observed = n - np.trace(o)  # disagreeing pairs (nominal distance 1 off the diagonal)
    expected = (n * n - marg @ marg) / (n - 1)
    if expected == 0:
        return 1.0
    return float(1.0 - observed / expected)


def exact_sign_test_power(n: int, p_true: float, alpha: float = 0.05) -> float:
    """Power of the two-sided exact binomial (sign) test at level ``alpha`` with ``n`` decisive pairs.

    The rejection region is every k whose two-sided p-value is <= alpha; the power is its
    probability under Binomial(n, p_true). Under the null p = 0.5 the distribution is symmetric,
    so scipy's ``binomtest`` p-value is ``min(1, 2 * P(X <= min(k, n - k)))``: computed here for all
    k at once (the tests check it equals ``binomtest`` k by k).
    """
    from scipy.stats import binom

    k = np.arange(n + 1)
    pvalue = np.minimum(1.0, 2.0 * binom.cdf(np.minimum(k, n - k), n, 0.5))
    reject = k[pvalue <= alpha]
    return float(binom.pmf(reject, n, p_true).sum())
