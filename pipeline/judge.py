"""Optional automatic judge for the eval stage: an OpenAI-compatible model compares tuned vs base.

Each prompt is judged twice, once with the tuned answer shown first and once with it second; when the
two verdicts disagree (position bias) the pair counts as a tie. Configure it in the pack:

    eval:
      judge: {base_url: http://127.0.0.1:9000/v1, model: judge-model, api_key_env: JUDGE_API_KEY}
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from core.errors import PackError

INSTRUCTIONS = (
    "You compare two answers to the same user request. Judge helpfulness, correctness, safety and "
    "clarity; ignore length unless it hurts clarity. Reply with exactly one of: A, B, tie."
)


def ask(client, model: str, prompt: str, first: str, second: str) -> str:
    """One verdict: 'A', 'B' or 'tie' (anything unparseable is a tie)."""
    content = f"[User request]\n{prompt}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\nVerdict (A, B or tie):"
    reply = client.chat.completions.create(
        model=model, temperature=0, max_tokens=8,
        messages=[{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": content}],
    ).choices[0].message.content or ""
    match = re.search(r"\b(A|B|tie)\b", reply.strip(), flags=re.IGNORECASE)
    verdict = match.group(1) if match else "tie"
    return verdict if verdict in ("A", "B") else "tie"


def judge_pair(client, model: str, prompt: str, tuned: str, base: str) -> tuple[str, list[str]]:
    """'tuned', 'base' or 'tie', from two verdicts with the order swapped."""
    first = ask(client, model, prompt, tuned, base)   # tuned is A
    second = ask(client, model, prompt, base, tuned)  # tuned is B
    as_winner = [{"A": "tuned", "B": "base"}.get(first, "tie"), {"A": "base", "B": "tuned"}.get(second, "tie")]
    return (as_winner[0] if as_winner[0] == as_winner[1] else "tie"), [first, second]


def judge_run(judge, prompts: list[str], tuned: list[str], base: list[str], out: Path, log) -> dict:
    from openai import OpenAI

    from core.stats import Battle, summarise

    key = os.environ.get(judge.api_key_env, "")
    if not key:
        raise PackError(f"eval.judge: set the environment variable {judge.api_key_env} to the judge's API key")
    client = OpenAI(base_url=judge.base_url, api_key=key, max_retries=1, timeout=120)

    counts = {"tuned": 0, "base": 0, "tie": 0}
    battles = []
    with open(out, "w", encoding="utf-8") as f:
        for prompt, t, b in zip(prompts, tuned, base):
            try:
                winner, verdicts = judge_pair(client, judge.model, prompt, t, b)
            except Exception as e:  # the endpoint is the user's: say which and why
                raise PackError(f"eval.judge: {judge.base_url} (model {judge.model}) failed: {e}")
            counts[winner] += 1
            battles.append(Battle("tuned", "base", {"tuned": "model_a", "base": "model_b"}.get(winner, "tie"),
                                  len(t), len(b)))
            f.write(json.dumps({"prompt": prompt, "tuned": t, "base": b, "verdicts": verdicts,
                                "winner": winner}, ensure_ascii=False) + "\n")
    log(f"judge: tuned {counts['tuned']}, base {counts['base']}, tie {counts['tie']}")
    stats = summarise(battles, "tuned", "base")
    keep = ("win_rate", "wilson_95", "bootstrap_95", "sign_test_p", "lc_win_rate", "decisive_win_rate")
    return {"counts": counts, **{k: stats[k] for k in keep}}
