"""Win-rate statistics for the arena leaderboard: is the tuned model preferred over the base model, and how do
all the arena's contestants rank?

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
- the left-side check asks whether raters prefer answer A (shown on the left) regardless of model;
- with more than two models, Bradley-Terry ratings on the Elo scale (as Chatbot Arena's leaderboard) with
  percentile bootstrap intervals over resampled battles, beside the statistics above for each pair.
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


def _bt_categories(battles: list[tuple[str, str, float]]):
    """(models, index of a, index of b, score of a, count) of the distinct (a, b, score) outcomes: the
    likelihood depends on the battles only through these counts, so a fit costs the same for 10 or 10^6 votes."""
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    idx = {m: i for i, m in enumerate(models)}
    cats: dict[tuple[int, int, float], int] = {}
    for a, b, sc in battles:
        key = (idx[a], idx[b], float(sc))
        cats[key] = cats.get(key, 0) + 1
    keys = list(cats)
    ia, ib, s = (np.array([k[j] for k in keys]) for j in range(3))
    return models, ia.astype(int), ib.astype(int), s.astype(float), np.array([cats[k] for k in keys], dtype=float)


def _bt_fit(ia, ib, s, w, k: int) -> np.ndarray:
    """Maximum-likelihood log-strengths (centred) for outcome counts w, with a weak ridge (so a model that
    never lost stays finite)."""
    def loss(theta):
        z = theta[ia] - theta[ib]
        return np.sum(w * (np.logaddexp(0, z) - s * z)) + 0.01 * np.sum(theta ** 2)

    def grad(theta):
        r = w * (1 / (1 + np.exp(-(theta[ia] - theta[ib]))) - s)
        return np.bincount(ia, r, k) - np.bincount(ib, r, k) + 0.02 * theta

    theta = optimize.minimize(loss, np.zeros(k), jac=grad, method="L-BFGS-B").x
    return theta - theta.mean()


def bradley_terry(battles: list[tuple[str, str, float]], scale: float = 400, base: float = 1000) -> dict[str, float]:
    """Bradley-Terry ratings on the Elo scale from (model_a, model_b, score of a) battles, ties as half.

    Maximum likelihood with a weak ridge (so a model that never lost stays finite), centred on `base`.
    """
    models, ia, ib, s, w = _bt_categories(battles)
    if len(models) < 2:
        return {m: base for m in models}
    theta = _bt_fit(ia, ib, s, w, len(models))
    return {m: float(base + scale / math.log(10) * theta[i]) for i, m in enumerate(models)}


def _bt_newton(ia, ib, s, w, k: int, start: np.ndarray, steps: int = 100) -> np.ndarray:
    """The fit of _bt_fit for many weight vectors at once (rows of w), by Newton's method from `start`:
    the bootstrap's hundreds of refits in milliseconds (L-BFGS one at a time took ~10 ms each)."""
    theta = np.tile(start, (w.shape[0], 1))
    eye = 0.02 * np.eye(k)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(theta[:, ia] - theta[:, ib])))
        r, h = w * (p - s), w * p * (1 - p)
        g = 0.02 * theta
        hess = np.broadcast_to(eye, (w.shape[0], k, k)).copy()
        for j in range(ia.size):  # a handful of distinct outcomes: k models, two orders, three scores
            a, b = ia[j], ib[j]
            g[:, a] += r[:, j]
            g[:, b] -= r[:, j]
            hess[:, a, a] += h[:, j]
            hess[:, b, b] += h[:, j]
            hess[:, a, b] -= h[:, j]
            hess[:, b, a] -= h[:, j]
        step = np.linalg.solve(hess, g[..., None])[..., 0]
        step = np.clip(step, -2, 2)  # damped: a resample where a model never lost sits far out
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return theta - theta.mean(axis=1, keepdims=True)


def bradley_terry_intervals(battles: list[tuple[str, str, float]], n_boot: int = 1000, seed: int = 0,
                            level: float = 0.95, scale: float = 400, base: float = 1000) -> dict[str, tuple]:
    """Percentile bootstrap intervals of the Bradley-Terry ratings, resampling whole battles (as Chatbot Arena
    does): each round draws len(battles) battles with replacement, i.e. multinomial counts of the distinct
    outcomes, and refits. A fixed seed keeps the page from flickering."""
    models, ia, ib, s, w = _bt_categories(battles)
    if len(models) < 2:
        return {m: (math.nan, math.nan) for m in models}
    rng, k, n = np.random.default_rng(seed), len(models), int(w.sum())
    draws = _bt_newton(ia, ib, s, rng.multinomial(n, w / n, size=n_boot).astype(float), k,
                       _bt_fit(ia, ib, s, w, k))
    lo, hi = np.quantile(base + scale / math.log(10) * draws, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return {m: (float(lo[i]), float(hi[i])) for i, m in enumerate(models)}


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


def head_to_head(battles: list[Battle], first: str, second: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """The statistics of the `first`-vs-`second` battles among `battles`, from `first`'s point of view."""
    outcomes, l1, l2 = [], [], []
    wins = losses = left = right = 0
    for b in battles:
        if {b.model_a, b.model_b} != {first, second}:
            continue
        first_is_a = b.model_a == first
        sa = b.score_a()
        outcomes.append(sa if first_is_a else 1 - sa)
        l1.append(b.len_a if first_is_a else b.len_b)
        l2.append(b.len_b if first_is_a else b.len_a)
        if b.winner == "model_a":
            left += 1
        elif b.winner == "model_b":
            right += 1
        if outcomes[-1] == 1.0:
            wins += 1
        elif outcomes[-1] == 0.0:
            losses += 1
    n = len(outcomes)
    lc, slope = length_controlled_win_rate(outcomes, l1, l2)
    left_share, left_p = side_preference(left, right)
    return {
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
        "mean_len_first": float(np.mean(l1)) if l1 else math.nan,
        "mean_len_second": float(np.mean(l2)) if l2 else math.nan,
        "left_share": left_share,
        "left_p": left_p,
        "votes_needed": votes_needed(wins, losses),
    }


def ranking(battles: list[Battle], n_boot: int = 1000, seed: int = 0) -> dict:
    """Bradley-Terry ratings of every model in `battles` with bootstrap 95% intervals, the models from best to
    worst, and head_to_head() of each pair that met (the better-rated model first)."""
    scored = [(b.model_a, b.model_b, b.score_a()) for b in battles]
    ratings = bradley_terry(scored)
    order = sorted(ratings, key=lambda m: -ratings[m])
    met = {tuple(sorted((b.model_a, b.model_b), key=order.index)) for b in battles}
    return {
        "order": order,
        "bradley_terry": ratings,
        "bradley_terry_95": bradley_terry_intervals(scored, n_boot=n_boot, seed=seed),
        "battles_of": {m: sum(m in (b.model_a, b.model_b) for b in battles) for m in order},
        "pairs": [{"first": a, "second": b, **head_to_head(battles, a, b, seed=seed)}
                  for a, b in sorted(met, key=lambda p: (order.index(p[0]), order.index(p[1])))],
    }


def summarise(battles: list[Battle], tuned: str, base: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """Everything the leaderboard shows: the vote counts, the tuned-vs-base statistics (head_to_head), and with
    more than two models the ranking() of them all."""
    kinds = {w: 0 for w in WINNERS}
    for b in battles:
        kinds[b.winner] += 1
    h = head_to_head(battles, tuned, base, n_boot=n_boot, seed=seed)
    h["mean_len_tuned"], h["mean_len_base"] = h.pop("mean_len_first"), h.pop("mean_len_second")
    out = {"battles": len(battles), "votes": kinds, "tuned": tuned, "base": base, **h}
    models = {m for b in battles for m in (b.model_a, b.model_b)}
    if len(models) > 2:
        out.update(ranking(battles, seed=seed))
    return out
