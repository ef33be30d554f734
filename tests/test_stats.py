"""The leaderboard statistics against independent computations (statsmodels, scipy, direct formulas)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from core import stats


@pytest.mark.parametrize("successes,n", [(0, 10), (3, 10), (7.5, 20), (50, 100), (99, 100), (1, 1)])
def test_wilson_matches_statsmodels(successes, n):
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(successes, n, alpha=0.05, method="wilson")
    ours = stats.wilson_interval(successes, n)
    assert ours == pytest.approx((lo, hi), abs=1e-9)


def test_sign_test_matches_scipy_and_direct_sum():
    for wins, losses in [(7, 3), (15, 5), (0, 6), (10, 10)]:
        n = wins + losses
        expected = sps.binomtest(wins, n, 0.5).pvalue
        assert stats.sign_test(wins, losses) == pytest.approx(expected)
        # direct: the probability of an outcome at least as extreme, both tails (p = 0.5 is symmetric)
        k = max(wins, losses)
        direct = min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)
        assert stats.sign_test(wins, losses) == pytest.approx(direct)
    assert stats.sign_test(0, 0) == 1.0


def test_bootstrap_fixed_seed_is_reproducible_and_brackets_the_mean():
    rng = np.random.default_rng(1)
    outcomes = rng.choice([0.0, 0.5, 1.0], size=200, p=[0.3, 0.1, 0.6])
    a = stats.bootstrap_interval(outcomes, n_boot=3000, seed=7)
    b = stats.bootstrap_interval(outcomes, n_boot=3000, seed=7)
    assert a == b
    lo, hi = a
    assert lo < outcomes.mean() < hi
    # independent check: the bootstrap interval is close to the normal-theory interval for a mean
    se = outcomes.std(ddof=1) / math.sqrt(outcomes.size)
    assert lo == pytest.approx(outcomes.mean() - 1.96 * se, abs=0.015)
    assert hi == pytest.approx(outcomes.mean() + 1.96 * se, abs=0.015)
    # same computation written out by hand with the same generator
    gen = np.random.default_rng(7)
    means = outcomes[gen.integers(0, outcomes.size, size=(3000, outcomes.size))].mean(axis=1)
    assert a == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def test_win_rates_count_ties_as_half():
    assert stats.win_rate([1, 0, 0.5, 0.5]) == 0.5
    assert stats.win_rate([1, 1, 0.5, 0]) == 0.625
    assert stats.decisive_win_rate(3, 1) == 0.75
    assert math.isnan(stats.decisive_win_rate(0, 0))


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    """Votes driven by length alone: the tuned model wins often because it writes longer answers, yet the
    length-controlled win rate is about 50%."""
    rng = np.random.default_rng(0)
    n = 3000
    len_base = rng.normal(300, 80, n).clip(20)
    len_tuned = len_base + rng.normal(120, 100, n)  # tuned answers are longer on average
    x = stats.normalised_length_difference(len_tuned, len_base)
    p_win = 1 / (1 + np.exp(-3.0 * x))  # only length matters
    outcomes = (rng.random(n) < p_win).astype(float)
    raw = stats.win_rate(outcomes)
    lc, coef = stats.length_controlled_win_rate(outcomes, len_tuned, len_base)
    assert raw > 0.68
    assert lc == pytest.approx(0.5, abs=0.04)
    assert coef == pytest.approx(3.0, abs=0.4)


def test_length_controlled_win_rate_keeps_a_real_preference():
    rng = np.random.default_rng(2)
    n = 3000
    len_base = rng.normal(300, 80, n)
    len_tuned = len_base + rng.normal(0, 100, n)
    x = stats.normalised_length_difference(len_tuned, len_base)
    p_win = 1 / (1 + np.exp(-(1.0 + 1.0 * x)))  # a quality effect (b0 = 1) plus a length effect
    outcomes = (rng.random(n) < p_win).astype(float)
    lc, _ = stats.length_controlled_win_rate(outcomes, len_tuned, len_base)
    assert lc == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.03)


def test_length_controlled_win_rate_agrees_with_statsmodels_logit():
    import statsmodels.api as sm

    rng = np.random.default_rng(3)
    n = 400
    lt, lb = rng.normal(300, 50, n), rng.normal(280, 50, n)
    x = stats.normalised_length_difference(lt, lb)
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.4 + 1.5 * x)))).astype(float)
    fit = sm.Logit(y, sm.add_constant(x)).fit(disp=0)
    lc, coef = stats.length_controlled_win_rate(y, lt, lb, l2=0.0)
    assert lc == pytest.approx(1 / (1 + math.exp(-fit.params[0])), abs=1e-4)
    assert coef == pytest.approx(fit.params[1], abs=1e-3)


def test_votes_needed():
    assert stats.votes_needed(20, 2) == 0  # already significant
    assert stats.votes_needed(5, 5) is None
    assert stats.votes_needed(0, 0) is None
    more = stats.votes_needed(6, 4)  # 60%: needs about (1.96*0.5/0.1)^2 ~ 96 decisive votes
    assert 70 < 10 + more < 130
    n = 10 + more
    assert sps.binomtest(round(0.6 * n), n, 0.5).pvalue < 0.05


def test_side_preference():
    share, p = stats.side_preference(30, 10)
    assert share == 0.75
    assert p == pytest.approx(sps.binomtest(30, 40, 0.5).pvalue)


def test_bradley_terry_orders_models_and_agrees_with_direct_likelihood():
    rng = np.random.default_rng(4)
    true = {"x": 1.0, "y": 0.0, "z": -1.0}
    battles = []
    for _ in range(1500):
        a, b = rng.choice(list(true), 2, replace=False)
        p = 1 / (1 + math.exp(-(true[a] - true[b])))
        battles.append((a, b, float(rng.random() < p)))
    r = stats.bradley_terry(battles)
    assert r["x"] > r["y"] > r["z"]
    # rating differences on the Elo scale map back to the true logit differences
    assert (r["x"] - r["z"]) * math.log(10) / 400 == pytest.approx(2.0, abs=0.3)


def test_summarise_from_the_tuned_models_point_of_view():
    B = stats.Battle
    battles = [
        B("tuned", "base", "model_a", 100, 50),  # tuned (left) wins
        B("base", "tuned", "model_b", 80, 90),  # tuned (right) wins
        B("base", "tuned", "model_a", 80, 90),  # base (left) wins
        B("tuned", "base", "tie", 10, 10),
        B("base", "tuned", "tie (bothbad)", 10, 10),
    ]
    s = stats.summarise(battles, "tuned", "base", n_boot=200)
    assert (s["n"], s["wins"], s["losses"], s["ties"]) == (5, 2, 1, 2)
    assert s["win_rate"] == pytest.approx(3 / 5)
    assert s["decisive_win_rate"] == pytest.approx(2 / 3)
    assert s["votes"] == {"model_a": 2, "model_b": 1, "tie": 1, "tie (bothbad)": 1}
    assert s["left_share"] == pytest.approx(2 / 3)
    assert "bradley_terry" not in s
    s3 = stats.summarise(battles + [B("tuned", "other", "model_a")], "tuned", "base", n_boot=200)
    assert set(s3["bradley_terry"]) == {"tuned", "base", "other"}


def three_models(n: int = 900, seed: int = 4):
    rng = np.random.default_rng(seed)
    true = {"x": 1.0, "y": 0.0, "z": -1.0}
    battles = []
    for _ in range(n):
        a, b = rng.choice(list(true), 2, replace=False)
        p = 1 / (1 + math.exp(-(true[a] - true[b])))
        u = rng.random()
        winner = "model_a" if u < p * 0.9 else "tie" if u < p * 0.9 + 0.1 else "model_b"
        battles.append(stats.Battle(str(a), str(b), winner, int(rng.integers(50, 150)), int(rng.integers(50, 150))))
    return battles


def test_bradley_terry_agrees_with_a_logistic_regression_without_intercept():
    """The fit on aggregated outcome counts equals statsmodels' logit of a's score on +1/-1 model indicators
    (ties as half a win: each tie is a win and a loss of weight 1/2), up to our weak ridge."""
    import statsmodels.api as sm

    battles = [(b.model_a, b.model_b, b.score_a()) for b in three_models()]
    models = ["x", "y", "z"]
    X, y, w = [], [], []
    for a, b, s in battles:
        row = [0.0, 0.0]  # z is the reference (log-strength 0)
        for m, sign in ((a, 1.0), (b, -1.0)):
            if m != "z":
                row[models.index(m)] = sign
        for outcome, weight in ((1.0, s), (0.0, 1 - s)):
            if weight:
                X.append(row), y.append(outcome), w.append(weight)
    fit = sm.GLM(np.array(y), np.array(X), family=sm.families.Binomial(), freq_weights=np.array(w)).fit()
    theta = np.array([*fit.params, 0.0])
    elo = 1000 + 400 / math.log(10) * (theta - theta.mean())
    ours = stats.bradley_terry(battles)
    assert [ours[m] for m in models] == pytest.approx(list(elo), abs=1.0)


def test_bradley_terry_bootstrap_intervals_bracket_the_ratings_and_narrow_with_votes():
    battles = [(b.model_a, b.model_b, b.score_a()) for b in three_models()]
    ratings = stats.bradley_terry(battles)
    ci = stats.bradley_terry_intervals(battles, n_boot=200, seed=3)
    assert ci == stats.bradley_terry_intervals(battles, n_boot=200, seed=3)  # fixed seed: the page does not flicker
    for m, (lo, hi) in ci.items():
        assert lo < ratings[m] < hi
    assert ci["x"][0] > ci["y"][1] and ci["y"][0] > ci["z"][1]  # 900 battles separate a logit step of 1
    few = stats.bradley_terry_intervals(battles[:60], n_boot=200, seed=3)
    assert all(few[m][1] - few[m][0] > ci[m][1] - ci[m][0] for m in ci)
    # same thing written out: resample whole battles, refit, take the percentiles
    rng, draws = np.random.default_rng(11), []
    for _ in range(200):
        sample = [battles[i] for i in rng.integers(0, len(battles), len(battles))]
        draws.append([stats.bradley_terry(sample)[m] for m in ("x", "y", "z")])
    lo, hi = np.quantile(np.array(draws), [0.025, 0.975], axis=0)
    for i, m in enumerate(("x", "y", "z")):
        assert ci[m] == pytest.approx((lo[i], hi[i]), abs=25)  # two bootstraps of 200 rounds agree to Monte Carlo noise


def test_ranking_orders_contestants_and_gives_every_pair_its_win_rates():
    battles = three_models()
    r = stats.ranking(battles)
    assert r["order"] == ["x", "y", "z"]
    assert sum(r["battles_of"].values()) == 2 * len(battles)
    pairs = {(p["first"], p["second"]): p for p in r["pairs"]}
    assert set(pairs) == {("x", "y"), ("x", "z"), ("y", "z")}  # the better-rated model first
    xy = pairs[("x", "y")]
    direct = stats.head_to_head(battles, "y", "x")
    assert xy["win_rate"] == pytest.approx(1 - direct["win_rate"]) and xy["n"] == direct["n"]
    assert (xy["wins"], xy["losses"]) == (direct["losses"], direct["wins"])
    assert xy["win_rate"] > 0.6 and pairs[("x", "z")]["win_rate"] > xy["win_rate"]
    assert 0.5 < xy["lc_win_rate"] < 1 and xy["wilson_95"][0] < xy["win_rate"] < xy["wilson_95"][1]
    s = stats.summarise(battles, "x", "z", n_boot=200)  # the tuned-vs-base table still reads one pair
    assert s["n"] == pairs[("x", "z")]["n"] and s["order"] == ["x", "y", "z"] and "bradley_terry_95" in s
