"""The arena's Leaderboard tab as markdown: with more than two contestants a Bradley-Terry ranking (ratings on
the Elo scale, bootstrap 95% intervals) and each pair's win rates; then tuned vs base in detail. The numbers
are core/stats.py's; this module only lays them out.
"""
from __future__ import annotations


def pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f}%"  # NaN (no votes yet) as a dash


def interval(ci: tuple[float, float]) -> str:
    return "–" if ci[0] != ci[0] else f"[{pct(ci[0])}, {pct(ci[1])}]"


def ranking_table(rank: dict | None, contestants: list[tuple[str, str]]) -> list[str]:
    """The ranking of `rank` (core.stats.ranking, None before the first vote) over the arena's contestants,
    [(served name, role)], and of any other model found in the votes (an earlier arena's); a contestant
    without a voted battle is listed last."""
    role = dict(contestants)
    order = list(rank["order"]) if rank else []
    unvoted = [m for m, _ in contestants if m not in order]
    out = [f"### Ranking of {len(order) + len(unvoted)} models (Bradley-Terry)", "",
           "Ratings on the Elo scale (1000 = the average model; 100 points ≈ 64% expected win rate), ties as half; "
           "the interval is a bootstrap over resampled battles.", "",
           "| rank | model | rating | 95% interval | battles |", "|---|---|---|---|---|"]
    for i, m in enumerate(order, 1):
        lo, hi = rank["bradley_terry_95"][m]
        name = f"`{m}` ({role[m]})" if m in role else f"`{m}`"
        rating, n = rank["bradley_terry"][m], rank["battles_of"][m]
        out.append(f"| {i} | {name} | {rating:.0f} | [{lo:.0f}, {hi:.0f}] | {n} |")
    out += [f"| – | `{m}` ({role[m]}) | no votes yet | – | 0 |" for m in unvoted]
    if rank and rank["pairs"]:
        out += ["", "#### Each pair: how often the first model wins", "",
                "| pair | battles | win rate (ties as half) | Wilson 95% | bootstrap 95% | length-controlled |",
                "|---|---|---|---|---|---|"]
        out += [f"| `{p['first']}` vs `{p['second']}` | {p['n']} | {pct(p['win_rate'])} | {interval(p['wilson_95'])} "
                f"| {interval(p['bootstrap_95'])} | {pct(p['lc_win_rate'])} |" for p in rank["pairs"]]
    return out + [""]


def tuned_vs_base(s: dict) -> list[str]:
    """The detail of core.stats.summarise: tuned vs base, every statistic."""
    v = s["votes"]
    if s["votes_needed"] is None:
        need = "–" if s["wins"] + s["losses"] == 0 else "never at exactly 50%"
    elif s["votes_needed"] == 0:
        need = "already separated from 50% (p < 0.05)"
    else:
        need = f"about {s['votes_needed']} more decisive votes at the current rate"
    rows = [
        ("Battles (voted)", f"{s['battles']}"),
        ("Votes by kind", f"A better {v['model_a']} · B better {v['model_b']} · tie {v['tie']} · "
                          f"both bad {v['tie (bothbad)']}"),
        ("Tuned wins / losses / ties", f"{s['wins']} / {s['losses']} / {s['ties']}  (of {s['n']} tuned-vs-base)"),
        ("**Win rate of tuned** (ties as half)", f"**{pct(s['win_rate'])}**"),
        ("Wilson 95% interval", interval(s["wilson_95"])),
        ("Bootstrap 95% interval (battles resampled)", interval(s["bootstrap_95"])),
        ("Decisive win rate", pct(s["decisive_win_rate"])),
        ("Sign test, exact two-sided p", f"{s['sign_test_p']:.3g}"),
        ("Length-controlled win rate", f"{pct(s['lc_win_rate'])} (mean answer: tuned "
                                       f"{s['mean_len_tuned']:.0f} chars, base {s['mean_len_base']:.0f})"
         if s["n"] else "–"),
        ("Left-side (A) preference", f"A chosen in {pct(s['left_share'])} of decisive votes "
                                     f"(p = {s['left_p']:.3g}; a small p means raters favour the left side)"),
        ("To separate from 50%", need),
    ]
    out = [f"### Tuned `{s['tuned']}` vs base `{s['base']}`", "", "| statistic | value |", "|---|---|"]
    return out + [f"| {k} | {val} |" for k, val in rows]


def render(summary: dict, rank: dict | None, contestants: list[tuple[str, str]]) -> str:
    """The whole tab: the ranking when the arena has more than two contestants (or the votes hold more than
    two models), then tuned vs base."""
    head = ranking_table(rank, contestants) if len(contestants) > 2 or rank else []
    return "\n".join(head + tuned_vs_base(summary))
