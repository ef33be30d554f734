"""Win-rate statistics for the arena leaderboard: is the tuned model preferred over the base model?

Pure numpy/scipy so the leaderboard (and `python -m core.pairs summary`) import fast. Conventions, after Chatbot
Arena (FastChat) and AlpacaEval:

- an outcome is the tuned model's score in one battle: 1 win, 0 loss, 0.5 tie or "both bad";
- win rate = mean outcome (ties as half); decisive win rate = wins / (wins + losses);
- the Wilson interval is computed on the win rate with ties counting half a success;
- the bootstrap interval resamples battles (with a fixed seed, so the page does not flicker);
- the sign test is the exact two-sided binomial test on decisive votes (`scipy.stats.binomtest`);
- the length-controlled win rate fits a logistic model of the outcome on the normalised length
  difference (tanh of the difference over its standard deviation, as AlpacaEval-LC) and predicts it at
  zero difference: the win rate the tuned model would have if both answers were equally long;
- the left-side check asks whether raters prefer answer A (shown on the left) regardless of model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

Z95 = 1.959963984540054
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")


def win_rate(outcomes) -> float:
    """Mean score with ties as half; nan when there are no battles."""
    x = np.asarray(outcomes, dtype=float)
    return float(x.mean()) if x.size else math.nan


def decisive_win_rate(wins: int, losses: int) -> float:
    return wins / (wins + losses) if wins + losses else math.nan


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion; `successes` may be fractional (ties as half)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(outcomes, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, resampling whole battles."""
    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value that decisive votes split 50/50; 1.0 without decisive votes."""
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def normalised_length_difference(len_tuned, len_base) -> np.ndarray:
    """tanh((tuned - base) / std): bounded in (-1, 1), 0 when both answers are equally long."""
    d = np.asarray(len_tuned, dtype=float) - np.asarray(len_base, dtype=float)
    sd = d.std()
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def length_controlled_win_rate(outcomes, len_tuned, len_base, l2: float = 1e-3) -> tuple[float, float]:
    """(LC win rate, length coefficient) of logit P(tuned preferred) = b0 + b1 * x, ties as half.

    A tiny ridge penalty keeps the fit finite when length separates the votes perfectly.
    """
    y = np.asarray(outcomes, dtype=float)
    if y.size < 2:
        return (win_rate(y), 0.0)
    x = normalised_length_difference(len_tuned, len_base)
    n = y.size

    def loss(b):
        z = b[0] + b[1] * x
        # cross-entropy with fractional targets, written with logaddexp for stability
        nll = np.sum(np.logaddexp(0, z) - y * z) / n
        return nll + l2 * (b[0] ** 2 + b[1] ** 2)

    def grad(b):
        p = 1 / (1 + np.exp(-(b[0] + b[1] * x)))
        r = (p - y) / n
        return np.array([r.sum() + 2 * l2 * b[0], (r * x).sum() + 2 * l2 * b[1]])

    res = optimize.minimize(loss, np.zeros(2), jac=grad, method="L-BFGS-B")
    b0, b1 = res.x
    return (float(1 / (1 + math.exp(-b0))), float(b1))


def side_preference(left_wins: int, right_wins: int) -> tuple[float, float]:
    """(share of decisive votes that went to the left answer A, exact two-sided p-value vs 50%)."""
    return (decisive_win_rate(left_wins, right_wins), sign_test(left_wins, right_wins))


def votes_needed(wins: int, losses: int, alpha: float = 0.05) -> int | None:
    """More decisive votes needed, if the current decisive rate held, for the sign test to reach alpha.

    0 when already significant; None when the rate is exactly 50% (or there are no decisive votes),
    since no number of votes at that rate separates from 50%.
    """
    n0 = wins + losses
    if n0 == 0:
        return None
    p = wins / n0
    if abs(p - 0.5) < 1e-12:
        return None
    if sign_test(wins, losses) < alpha:
        return 0

    def significant(n: int) -> bool:
        # binomtest's two-sided p at 0.5 is twice the upper tail of max(k, n - k): the same number,
        # without its root search (this runs on every vote)
        k = round(p * n)
        return 2 * stats.binom.sf(max(k, n - k) - 1, n, 0.5) < alpha

    # Normal approximation for the bracket, then bisection on the exact test.
    approx = (Z95 * 0.5 / abs(p - 0.5)) ** 2
    lo, hi = n0, max(n0 + 1, int(approx * 2) + 20)
    while not significant(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if significant(mid) else (mid, hi)
    return hi - n0


def bradley_terry(battles: list[tuple[str, str, float]], scale: float = 400, base: float = 1000) -> dict[str, float]:
    """Bradley-Terry ratings on the Elo scale from (model_a, model_b, score of a) battles, ties as half.

    Maximum likelihood with a weak ridge (so a model that never lost stays finite), centred on `base`.
    """
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    if len(models) < 2:
        return {m: base for m in models}
    idx = {m: i for i, m in enumerate(models)}
    ia = np.array([idx[a] for a, _, _ in battles])
    ib = np.array([idx[b] for _, b, _ in battles])
    s = np.array([sc for _, _, sc in battles], dtype=float)
    k = len(models)

    def loss(theta):
        z = theta[ia] - theta[ib]
        nll = np.sum(np.logaddexp(0, z) - s * z)
        return nll + 0.01 * np.sum(theta ** 2)

    def grad(theta):
        p = 1 / (1 + np.exp(-(theta[ia] - theta[ib])))
        r = p - s
        g = np.bincount(ia, r, k) - np.bincount(ib, r, k)
        return g + 0.02 * theta

    theta = optimize.minimize(loss, np.zeros(k), jac=grad, method="L-BFGS-B").x
    theta -= theta.mean()
    return {m: float(base + scale / math.log(10) * theta[idx[m]]) for m in models}


# ------------------------------------------------------------------------------------------ summary


@dataclass
class Battle:
    """One voted battle as the statistics see it."""

    model_a: str
    model_b: str
    winner: str  # one of WINNERS
    len_a: int = 0  # answer lengths (characters of the assistant turns)
    len_b: int = 0

    def score_a(self) -> float:
        return {"model_a": 1.0, "model_b": 0.0}.get(self.winner, 0.5)


def summarise(battles: list[Battle], tuned: str, base: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Everything the leaderboard shows, for the tuned-vs-base battles among `battles`."""
    kinds = {w: 0 for w in WINNERS}
    for b in battles:
        kinds[b.winner] += 1
    pair = [b for b in battles if {b.model_a, b.model_b} == {tuned, base}]
    outcomes, lt, lb = [], [], []
    wins = losses = left = right = 0
    for b in pair:
        tuned_is_a = b.model_a == tuned
        sa = b.score_a()
        outcomes.append(sa if tuned_is_a else 1 - sa)
        lt.append(b.len_a if tuned_is_a else b.len_b)
        lb.append(b.len_b if tuned_is_a else b.len_a)
        if b.winner == "model_a":
            left += 1
        elif b.winner == "model_b":
            right += 1
        if outcomes[-1] == 1.0:
            wins += 1
        elif outcomes[-1] == 0.0:
            losses += 1
    n = len(outcomes)
    lc, slope = length_controlled_win_rate(outcomes, lt, lb)
    left_share, left_p = side_preference(left, right)
    out = {
        "battles": len(battles),
        "votes": kinds,
        "tuned": tuned,
        "base": base,
        "n": n,
        "wins": wins,
        "losses": losses,
        "ties": n - wins - losses,
        "win_rate": win_rate(outcomes),
        "decisive_win_rate": decisive_win_rate(wins, losses),
        "wilson_95": wilson_interval(sum(outcomes), n),
        "bootstrap_95": bootstrap_interval(outcomes, n_boot=n_boot, seed=seed),
        "sign_test_p": sign_test(wins, losses),
        "lc_win_rate": lc,
        "length_coef": slope,
        "mean_len_tuned": float(np.mean(lt)) if lt else math.nan,
        "mean_len_base": float(np.mean(lb)) if lb else math.nan,
        "left_share": left_share,
        "left_p": left_p,
        "votes_needed": votes_needed(wins, losses),
    }
    models = {m for b in battles for m in (b.model_a, b.model_b)}
    if len(models) > 2:
        out["bradley_terry"] = bradley_terry([(b.model_a, b.model_b, b.score_a()) for b in battles])
    return out
