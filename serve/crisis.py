"""Crisis guard: messages showing risk of suicide or self-harm get a fixed reply with crisis lines, not the model's.

Safety is not left to a 135M-parameter model. The guard reads the latest user message and decides with the
detector the pack names in `serve.crisis_detector`:
- learned (default; offline, about a millisecond on a CPU): logistic regression over hashed word, character
  and concept n-grams, trained on domains/counseling/data/crisis_train.jsonl and crisis_examples.jsonl. Its
  weights and threshold are serve/crisis_model.npz; `python -m serve.crisis train` rebuilds them.
- ensemble (the counseling pack's; offline): the learned probability averaged with a head on the embedded
  SmolLM2-135M's hidden states (serve/crisis_embed.py, serve/crisis_embed.npz); higher recall, a forward pass
  of the 135M model a message. When SmolLM2 cannot load, the learned detector decides and the audit says why.
- served: a guard model (Llama Guard 3/4, Qwen3Guard) served by vLLM at `serve.crisis_guard_url`, asked
  through an OpenAI-compatible chat completion; "unsafe" with the self-harm category (Llama Guard S11)
  means risk. When it fails, the learned detector decides and the audit line says why.
Under either, the regular expressions below are a backstop: a message is flagged when either fires.

Where it runs:
- the arena (serve/battle.py) calls `crisis_reply(text, locale)` before a prompt reaches the models;
- vLLM loads `CrisisMiddleware` (serve/crisis_middleware.py; the launcher adds it when the
  pack sets `serve.crisis_guard: true`). Every route that runs the model (ROUTES) is inspected, and a
  risky request is answered in that route's own shape, streamed or not, without reaching the model.

Each decision is audited without the message text: one JSON line to the logger "crisis_guard" and, when
CRISIS_AUDIT_LOG names a file, appended to it (the launcher uses runs/<domain>/serve/crisis_audit.jsonl).

    python -m serve.crisis train             # retrain serve/crisis_model.npz and crisis_embed.npz
    python -m serve.crisis cv                # cross-validated recall and false alarms on the training data
    python -m serve.crisis evaluate FILE     # recall and false alarms with Wilson 95% intervals, per language

A false alarm costs one unneeded list of helplines; a miss costs more. The threshold spends the issue's
false-alarm budget (10% on cross-validation, backstop included) on recall.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from serve.crisis_embed import EMBED_PATH, EncoderMissing, embed_head, ensemble_score, train_head
from serve.crisis_model import (
    FOLDS,
    MODEL_PATH,
    TRAIN_FILES,
    choose_threshold,
    learned_model,
    out_of_fold,
    rates,
    read_rows,
    regex_fires,
    train,
)

# Crisis lines by locale. US: 988 Suicide & Crisis Lifeline; EU: 112 is the emergency number everywhere
# in the EU; UK: Samaritans; IT: Telefono Amico Italia.
CRISIS_LINES = {
    "US": ["call or text 988 (Suicide & Crisis Lifeline)", "in an emergency call 911"],
    "EU": ["call 112 (emergency number in every EU country)"],
    "UK": ["call Samaritans on 116 123 (free, 24 hours)", "in an emergency call 999"],
    "IT": ["chiama il 112 (numero unico di emergenza)", "Telefono Amico Italia: 02 2327 2327"],
}


def crisis_text(locale: str = "US") -> str:
    lines = CRISIS_LINES.get(locale.upper(), CRISIS_LINES["US"])
    other = [f"{k}: {v[0]}" for k, v in CRISIS_LINES.items() if k != locale.upper()]
    return (
        "I'm really sorry you're feeling this way, and I'm glad you said it. You deserve support from a person "
        "right now, and I'm not able to give the help you need. Please reach out to a crisis line: "
        + "; ".join(lines) + ". If you are in immediate danger, call your local emergency number or go to the "
        "nearest emergency department. If you can, tell someone you trust and stay with them. "
        "Elsewhere: " + "; ".join(other) + "."
    )


# ---------------------------------------------------------------------------------- served detector


class GuardError(Exception):
    pass


def guard_verdict(reply: str) -> bool:
    """A guard model's reply -> self-harm risk. Llama Guard 3/4: "safe", or "unsafe" and a line of categories
    ("S11" is Suicide & Self-Harm). Qwen3Guard: "Safety: Unsafe|Controversial|Safe" and "Categories: ...".
    Unsafe for another category (violence, crime...) is not this guard's business."""
    low = reply.strip().lower()
    first = low.split("\n", 1)[0].strip()
    if first == "safe" or re.search(r"safety:\s*safe\b", low):
        return False
    if first == "unsafe" or re.search(r"safety:\s*(unsafe|controversial)\b", low):
        return bool(re.search(r"\bs11\b", low)) or "self-harm" in low or "suicide" in low
    raise GuardError(f"unrecognised guard reply {reply[:40]!r}")


def ask_guard(text: str, url: str, model: str, timeout_s: float, api_key: str = "") -> bool:
    """One chat completion to the guard model; vLLM applies the guard's own chat template (its policy)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 20,
                       "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers=headers)
    # no proxy: the guard server sits beside vLLM, and a proxy from the environment would see the messages
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout_s) as r:
        reply = json.load(r)["choices"][0]["message"]["content"]
    if not isinstance(reply, str):
        raise GuardError("the guard's reply has no text content")
    return guard_verdict(reply)


# ------------------------------------------------------------------------------------- the decision

audit_log = logging.getLogger("crisis_guard")


@dataclass
class Decision:
    risk: bool
    score: float             # learned/ensemble: the highest probability among the texts; served: 1.0 unsafe S11
    detector: str            # the one that decided: learned | ensemble | served
    backstop: bool           # the regular expressions fired
    fallback: str | None = None   # why the chosen detector (served, ensemble) was not used


@dataclass
class Guard:
    """The detector and its settings, from the environment the launcher sets (guard_env)."""

    detector: str = "learned"
    url: str = ""
    model: str = ""
    timeout_s: float = 5.0
    api_key: str = ""
    audit_path: str = ""

    @classmethod
    def from_env(cls) -> "Guard":
        e = os.environ
        return cls(detector=e.get("CRISIS_DETECTOR", "learned"), url=e.get("CRISIS_GUARD_URL", ""),
                   model=e.get("CRISIS_GUARD_MODEL", ""), timeout_s=float(e.get("CRISIS_GUARD_TIMEOUT_S", "5")),
                   api_key=e.get("CRISIS_GUARD_API_KEY", ""), audit_path=e.get("CRISIS_AUDIT_LOG", ""))

    def decide(self, texts: list[str]) -> Decision:
        backstop = any(regex_fires(t) for t in texts)
        fallback = None
        if self.detector == "served":
            try:
                risk = any(ask_guard(t, self.url, self.model, self.timeout_s, self.api_key) for t in texts)
                return Decision(risk or backstop, 1.0 if risk else 0.0, "served", backstop)
            except (OSError, ValueError, KeyError, IndexError, TypeError, GuardError) as e:
                # the exception names the error, never the message (URLError, HTTPError, JSON position)
                fallback = f"served guard failed ({type(e).__name__}: {str(e)[:120]}); learned detector used"
        model = learned_model()
        scores = [model.score(t) for t in texts]
        if self.detector == "ensemble":
            try:
                score = max((ensemble_score(t, s) for t, s in zip(texts, scores)), default=0.0)
                return Decision(score >= embed_head().threshold or backstop, score, "ensemble", backstop)
            except (EncoderMissing, FileNotFoundError) as e:
                fallback = f"ensemble unavailable ({str(e)[:160]}); learned detector used"
        score = max(scores, default=0.0)
        return Decision(score >= model.threshold or backstop, score, "learned", backstop, fallback)

    def check(self, texts: list[str], route: str, request_id: str | None = None) -> Decision:
        """decide() plus the audit line."""
        start = time.perf_counter()
        decision = self.decide(texts)
        self.audit(decision, route, request_id or uuid.uuid4().hex, time.perf_counter() - start, len(texts))
        return decision

    def audit(self, d: Decision, route: str, request_id: str, seconds: float, texts: int) -> None:
        line = json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "request_id": request_id, "route": route,
            "detector": d.detector, "decision": "crisis" if d.risk else "pass", "score": round(d.score, 4),
            "backstop": d.backstop, "latency_ms": round(seconds * 1000, 2), "texts": texts, "fallback": d.fallback})
        (audit_log.warning if d.fallback else audit_log.info)(line)
        if self.audit_path:
            try:
                path = Path(self.audit_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as f:  # one short append per line: lines do not interleave
                    f.write(line + "\n")
            except OSError as e:
                audit_log.error("cannot append to CRISIS_AUDIT_LOG %s: %s", self.audit_path, e)


def guard_env(serve_cfg) -> dict[str, str]:
    """The environment that configures the guard in vLLM's process and the arena's (see Guard.from_env)."""
    env = {"CRISIS_LOCALE": serve_cfg.crisis_locale, "CRISIS_DETECTOR": serve_cfg.crisis_detector}
    if serve_cfg.crisis_detector == "served":
        env.update(CRISIS_GUARD_URL=serve_cfg.crisis_guard_url, CRISIS_GUARD_MODEL=serve_cfg.crisis_guard_model,
                   CRISIS_GUARD_TIMEOUT_S=str(serve_cfg.crisis_guard_timeout_s))
    return env


def shows_risk(text: str) -> bool:
    """The default guard's decision (learned detector or backstop), without an audit line."""
    return Guard().decide([text]).risk


def _content_text(content) -> str:
    """A message's text: a string, or content parts (OpenAI, Anthropic, Responses) with a "text" each."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def last_user_text(messages) -> str:
    users = [m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
    return _content_text(users[-1]) if users else ""


def crisis_reply(messages_or_text, locale: str = "US", *, route: str = "arena") -> str | None:
    """The fixed reply when the latest user message shows risk, else None. The arena calls it with the
    default route name; the audit line records the decision."""
    text = messages_or_text if isinstance(messages_or_text, str) else last_user_text(messages_or_text)
    return crisis_text(locale) if Guard.from_env().check([text], route).risk else None


def report(rows: list[dict], flagged: list[bool], title: str, say=print) -> dict:
    def rate(value: float, ci: tuple, n: int) -> str:
        return f"{value:6.1%} [{ci[0]:5.1%}, {ci[1]:5.1%}]" if n else f"{'-':>6} {'':15}"

    def line(name: str, r: dict) -> str:
        return (f"  {name:30} {r['n']:5d} {r['risk']:5d}   {rate(r['recall'], r['recall_ci'], r['risk'])}   "
                f"{rate(r['false_alarms'], r['false_alarms_ci'], r['ordinary'])}")

    result = {"all": rates(rows, flagged)}
    say(title)
    say(f"  {'':30} {'n':>5} {'risk':>5}   {'recall [Wilson 95%]':24}   false alarms [Wilson 95%]")
    say(line("all", result["all"]))
    for key in ("lang", "category"):
        for value in sorted({r.get(key) or "" for r in rows} - {""}):
            pick = [i for i, r in enumerate(rows) if r.get(key) == value]
            result[f"{key}={value}"] = rates([rows[i] for i in pick], [flagged[i] for i in pick])
            say(line(f"{key} {value}", result[f"{key}={value}"]))
    return result


def evaluate(path: Path, say=print) -> dict:
    """The guard the environment configures (as in vLLM: learned by default, CRISIS_DETECTOR=served and the
    CRISIS_GUARD_* variables for a guard model), backstop included, on a labelled file; no audit lines."""
    rows = read_rows([path])
    guard = Guard.from_env()
    decisions = [guard.decide([r["text"]]) for r in rows]
    used = sorted({d.detector for d in decisions})
    fallbacks = sum(d.fallback is not None for d in decisions)
    what = f"{'/'.join(used)}, learned threshold {learned_model().threshold:.4f}" + (
        f", ensemble threshold {embed_head().threshold:.4f}" if "ensemble" in used else "") + ", + backstop" + (
        f"; {fallbacks} decided by the learned detector instead ({guard.detector} failed)" if fallbacks else "")
    return report(rows, [d.risk for d in decisions], f"crisis guard ({what}) on {path}", say)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m serve.crisis", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="retrain serve/crisis_model.npz and serve/crisis_embed.npz")
    p.add_argument("--out", type=Path, default=MODEL_PATH)
    p.add_argument("--embed-out", type=Path, default=EMBED_PATH)
    p.add_argument("--learned-only", action="store_true", help="skip the ensemble's SmolLM2 head")
    sub.add_parser("cv", help="cross-validated recall and false alarms on the training files")
    p = sub.add_parser("evaluate", help="recall and false alarms on a labelled .jsonl (text, risk, lang)")
    p.add_argument("file", type=Path)
    args = parser.parse_args(argv)

    if args.command == "evaluate":
        if not args.file.is_file():
            print(f"{args.file}: no such file", file=sys.stderr)
            return 2
        evaluate(args.file)
        return 0
    if args.command == "train":
        model, scores = train()
        model.save(args.out)
        learned_model.cache_clear()
        print(f"[crisis] wrote {args.out} ({args.out.stat().st_size // 1024} KiB, threshold {model.threshold:.4f})")
        if not args.learned_only:
            head, _ = train_head(read_rows(TRAIN_FILES), scores, model.data_sha256)
            head.save(args.embed_out)
            embed_head.cache_clear()
            print(f"[crisis] wrote {args.embed_out} ({args.embed_out.stat().st_size // 1024} KiB, "
                  f"ensemble threshold {head.threshold:.4f})")
        return 0
    rows = read_rows(TRAIN_FILES)
    scores = out_of_fold(rows)
    threshold = choose_threshold(scores, rows)
    backstop = [regex_fires(r["text"]) for r in rows]
    runs = [("learned alone", scores >= threshold, threshold), ("backstop alone", backstop, threshold),
            ("learned + backstop", (scores >= threshold) | backstop, threshold)]
    try:
        ensemble = train_head(rows, scores, "", say=print)[1]
        runs.append(("ensemble + backstop", (ensemble >= (t := choose_threshold(ensemble, rows))) | backstop, t))
    except EncoderMissing as e:
        print(f"[crisis] no ensemble: {e}")
    for name, flagged, t in runs:
        report(rows, list(flagged), f"{FOLDS}-fold cross-validation, {name} (threshold {t:.4f})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
