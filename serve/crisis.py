"""Crisis guard: messages showing risk of suicide or self-harm get a fixed reply with crisis lines, not the model's.

Safety is not left to a 135M-parameter model. The guard reads the latest user message and decides with the
detector the pack names in `serve.crisis_detector`:
- learned (default; offline, about a millisecond on a CPU): logistic regression over hashed word, character
  and concept n-grams, trained on domains/counseling/data/crisis_train.jsonl and crisis_examples.jsonl. Its
  weights and threshold are serve/crisis_model.npz; `python -m serve.crisis train` rebuilds them.
- served: a guard model (Llama Guard 3/4, Qwen3Guard) served by vLLM at `serve.crisis_guard_url`, asked
  through an OpenAI-compatible chat completion; "unsafe" with the self-harm category (Llama Guard S11)
  means risk. When it fails, the learned detector decides and the audit line says why.
Under either, the regular expressions below are a backstop: a message is flagged when either fires.

Where it runs:
- the arena (serve/arena.py) calls `crisis_reply(text, locale)` before a prompt reaches the models;
- vLLM loads `CrisisMiddleware` (--middleware serve.crisis.CrisisMiddleware; the launcher adds it when the
  pack sets `serve.crisis_guard: true`). Every route that runs the model (ROUTES) is inspected, and a
  risky request is answered in that route's own shape, streamed or not, without reaching the model.

Each decision is audited without the message text: one JSON line to the logger "crisis_guard" and, when
CRISIS_AUDIT_LOG names a file, appended to it (the launcher uses runs/<domain>/serve/crisis_audit.jsonl).

    python -m serve.crisis train             # retrain serve/crisis_model.npz (deterministic)
    python -m serve.crisis cv                # cross-validated recall and false alarms on the training data
    python -m serve.crisis evaluate FILE     # recall and false alarms with Wilson 95% intervals, per language

A false alarm costs one unneeded list of helplines; a miss costs more. The threshold spends the issue's
false-alarm budget (10% on cross-validation, backstop included) on recall.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import os
import re
import sys
import time
import unicodedata
import urllib.request
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "domains" / "counseling" / "data"
TRAIN_FILES = [DATA / "crisis_train.jsonl", DATA / "crisis_examples.jsonl"]
MODEL_PATH = Path(__file__).with_name("crisis_model.npz")

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


# ------------------------------------------------------------------------------------------ backstop

# Written against crisis_examples.jsonl; alone they caught 4 of 20 separately written risk messages, so they
# only add to the detector's recall. Idioms such as "this deadline is killing me" are excluded.
_RISK = [
    # direct statements (typos such as "kil myself" included)
    r"(?<!not thinking of )(?<!never )\b(kill|kil|kll|killing|hurt|hurting|harm|harming)\s*(my\s*self|myself|meself)\b"
    r"(?!\s+(laughing|at|lifting|playing|tripping|while))",
    r"\b(cut|cutting)\s+(my\s*self|myself)\b(?!\s+(shaving|while|on|by|accidentally|cooking|with\s+a\s+kitchen))",
    # "suicide" said of others, in the past or at work ("died by suicide", "suicide prevention") is not risk
    r"(?<!died by )(?<!committed )(?<!signs of )(?<!not )(?<!prevention )\bsuicid(e|al)\b"
    r"(?!\s+(prevention|rates?|risk|hotline|awareness|years\s+ago))(?!.{0,30}\b(years\s+ago|student|client|patient)s?\b)",
    r"(?<!free of )(?<!used to )\bself[-\s]?harm(?!.{0,30}\b(client|patient|clinically|years|free)\b)",
    r"\b(end|ending|take|taking)\s+(my|my\s+own)\s+life\b",
    r"\bend\s+it\b.{0,20}\b(all|tonight|today|now|soon|for\s+good)\b",
    r"\b(want|wanna|plan|planning|ready)\s+to\s+(die|end\s+it)\b(?!\s+(of|with)\b)",
    r"\bwanna\s+die\b",
    r"\bwish\s+i\s+(was|were)\s+dead\b",
    r"\b(better\s+off|be\s+better)\s+(dead|without\s+me)\b",
    r"\b(don'?t|do\s+not|no\s+longer)\s+want\s+to\s+(be\s+here|live|be\s+alive|exist|wake\s+up)\b",
    r"\b(and|to)\s+(never|not)\s+wake\s+up\b",
    # hopelessness about living
    r"\b(no|what'?s\s+the)\s+(reason|point)\s+(to|in|of)\s+(live|living|life|go(ing)?\s+on|being\s+alive)\b",
    r"\b(can'?t|cannot)\s+go\s+on\s+(anymore|any\s+more|living)\b",
    r"\bno\s+way\s+out\b.{0,40}\b(dying|death|die|end)\b",
    r"\bexcept\s+(dying|death|to\s+die)\b",
    r"\b(no\s*one|nobody)\s+(will|would)\s+(miss|notice)\s+me\b",
    r"\b(disappear|dissapear|disapear|vanish)\b.{0,15}\b(for\s+good|forever)\b",
    r"\b(pain|it|everything)\s+to\s+stop\b.{0,15}\b(forever|for\s+good|permanently)\b",
    # plans, means and preparations
    r"\b(know|decided|figured\s+out)\s+how\s+i'?m?\s*(going\s+to|gonna|will)\s+do\s+it\b",
    r"\b(jump|jumping)\s+(off|from|in\s+front\s+of)\b",
    r"\b(drive|driving|crash|crashing)\b.{0,40}\bon\s+purpose\b",
    r"\b(bought|buying|got|have)\s+(a\s+)?(rope|noose|gun)\b",
    r"(?<!died of an )\b(overdose|od)\b(?!\s+(of|on)\b)",
    r"\b(saving|stockpiling|hoarding|collecting)\s+(up\s+)?(my\s+)?(pills|tablets|meds|medication)\b",
    r"\b(pills|tablets)\b.{0,40}\b(not\s+wake|never\s+wake|to\s+die|enough)\b",
    r"\b(this|today|tonight)\s+(is|will\s+be|is\s+going\s+to\s+be)\s+my\s+last\s+(day|night|week)\b(?!\s+(at|of|in|on|with)\b)",
    r"\bwon'?t\s+need\s+(anything|it|them)\s+(after|anymore|any\s+more)\b",
    r"\b(won'?t|will\s+not|not\s+going\s+to)\s+be\s+around\b",
    r"\bgiv(e|ing)\s+away\s+(all\s+)?my\s+(stuff|things|belongings)\b",
    r"\bgiv(e|ing)\s+(all\s+)?my\s+(stuff|things|belongings)\s+away\b",
    r"\bremember\s+me\s+by\b",
    r"\b(said|saying|say)\s+goodbye\s+to\s+everyone\b",
    r"\b(letters?|notes?)\b.{0,40}\bgoodbye\b|\bgoodbye\s+(letters?|notes?)\b",
    # Italian
    r"\b(uccidermi|suicidarmi|ammazzarmi|farla\s+finita|togliermi\s+la\s+vita|non\s+voglio\s+più\s+vivere)\b",
]
_PATTERNS = [re.compile(p, re.IGNORECASE) for p in _RISK]


def regex_fires(text: str) -> bool:
    return any(p.search(text or "") for p in _PATTERNS)


# ---------------------------------------------------------------------------------- learned detector

DIM = 1 << 20          # hashed feature space; only the features seen in training get a weight
L2 = 1e-5              # chosen by cross-validation (README, "Safety")
CONCEPT_WEIGHT = 2.0   # the concept block counts double: it is what carries over to unseen wordings
FALSE_ALARM_BUDGET = 0.10
FOLDS = 5

# Concepts: synonyms, English and Italian, that share one tag, so that a weight learned for "pills ... enough"
# also applies to "pastiglie ... abbastanza" and to a typo seen once. Only a vocabulary: which tag sequences
# mean risk is learned from the labelled messages, like every other weight.
_CONCEPTS = {
    "SUICIDE": "suicide suicidal suicidio suicida suicidi suicidarmi suicidarsi suicidato suicidata kms kys unalive "
               "unaliving unalived sewerslide ctb suiside suicidle suicdal sucidal sucide suicido sucidi",
    "DIE": "die dies dying died dead death deaths deadly lethal fatal deadliest morire muoio muori morto morta morti "
           "morte mortale letale morissi morie mori dei",
    "KILL": "kill kills killing kil kll killin murder uccidere uccidermi uccidersi ucciderm uccido ammazzare "
            "ammazzarmi ammazzo amazzare ammazza off",
    "LIFE": "life lives living live alive exist existing existence vita vivere vivo viva esistere esistenza lyfe "
            "world earth mondo",
    "SELF": "myself meself self slef myslef mi me stesso stessa",
    "END": "end ending ended finish over stop finita finto finire finisca smettere basta done out",
    "WANT": "want wanna wnat wana wish wished hope hoping rather voglio vorrei volevo spero desire urge tempted "
            "tempting considering",
    "INTENT": "plan planning planned decided decision going gonna ready tonight tomorrow deciso pronto pronta "
              "stasera stanotte domani finna ima date countdown counting deadline",
    "NEG": "not no never dont don cant wont nobody nothing noone non mai nessuno niente nn",
    "METHOD": "pills pill pils tablets tablet overdose overdoze od rope noose hang hanging hanged gun guns pistol "
              "revolver shoot shooting bridge jump jumping jumped roof rooftop ledge balcony cliff cliffs train "
              "knife razor blade wrists wrist bleed bleeding drown drowning poison bleach insulin engine "
              "paracetamol tylenol acetaminophen sonniferi pastiglie pillole medicine farmaci corda cappio "
              "impiccarmi impiccarsi ponte tetto buttarmi buttarsi saltare coltello lametta polsi pistola treno "
              "veleno tachipirina piano floor bottle packet diazepam oxycodone sleeping",
    "DOSE": "many much dose doses mg enough quante quanti quanta quanto abbastanza",
    "GOODBYE": "goodbye goodbyes bye farewell addio note notes letter letters testamento will last ultimo ultima ultimi",
    "HARM": "hurt hurting harm harming cut cutting cuting cuts burn burning hit hitting punch punched scratch "
            "scratched bruise bruises scars scar carved taglio tagliarmi tagliata tagliato brucio bruciata male "
            "pugni relapse relapsed",
    "BURDEN": "burden burdens better peso meglio",
    "HOPELESS": "point pointless hopeless reason reasons future senso motivo speranza uscita way",
    "GONE": "disappear disapear dissapear vanish gone sparire sparisca sparito delete anymore anymroe anymor longer "
            "piu more around here",
    "SLEEP": "wake sleep svegliarmi svegliarsi dormire",
    "THIRD": "friend asking hypothetically curious story character someone research amico amica ipoteticamente chiedo",
    "PAIN": "pain painless painful hurts dolore indolore doloroso soffrire",
    "FIRST": "i im ive id ill io",
    "JOKE": "lol lmao haha jk joking literally scherzo ahah",
}
_TAG = {}
for _tag, _words in _CONCEPTS.items():
    for _w in _words.split():
        _TAG.setdefault(_w, _tag)


def normalise(text: str) -> str:
    """Lower case without accents ("più" = "piu", as typed on many phones), digits as 0, "sooo" as "soo"."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"\d+", "0", text)
    return re.sub(r"(.)\1{2,}", r"\1\1", text)


def _block(names: list[str], weight: float, out: dict[int, float]) -> None:
    # crc32, not hash(): Python salts str hashes per process, and the weights must mean the same everywhere
    idx = {zlib.crc32(n.encode()) % DIM for n in names}
    for i in idx:
        out[i] = out.get(i, 0.0) + weight / np.sqrt(len(idx))


def features(text: str) -> dict[int, float]:
    """Hashed, binary, per-block L2-normalised: words and word pairs; character 3-5-grams (typos, slang,
    Italian inflections); concept tags in order, in pairs and triples, and the words with their tags."""
    tokens = re.findall(r"[a-z0]+", normalise(text))
    out: dict[int, float] = {}
    if not tokens:
        return out
    _block(["w|" + t for t in tokens] + ["b|" + a + " " + b for a, b in zip(tokens, tokens[1:])], 1.0, out)
    s = " " + " ".join(tokens) + " "
    _block(["c|" + s[i:i + n] for n in (3, 4, 5) for i in range(len(s) - n + 1)], 1.0, out)
    tags = [_TAG[t] for t in tokens if t in _TAG]
    mixed = [_TAG.get(t, t) for t in tokens]
    unique = sorted(set(tags))
    concept = (["k|" + t for t in tags] + ["kb|" + a + " " + b for a, b in zip(tags, tags[1:])]
               + ["kt|" + " ".join(x) for x in zip(tags, tags[1:], tags[2:])]
               + ["kp|" + a + "+" + b for i, a in enumerate(unique) for b in unique[i + 1:]]
               + ["mb|" + a + " " + b for a, b in zip(mixed, mixed[1:])])
    _block(concept, CONCEPT_WEIGHT, out)
    return out


def feature_matrix(texts: list[str]):
    from scipy import sparse

    rows, cols, vals = [], [], []
    for r, text in enumerate(texts):
        f = features(text)
        rows += [r] * len(f)
        cols += list(f)
        vals += list(f.values())
    return sparse.csr_matrix((vals, (rows, cols)), shape=(len(texts), DIM), dtype=np.float64)


def fit(X, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression, both classes weighted equally, by L-BFGS from zero (deterministic).
    Features never seen in training keep weight 0, so only the seen columns are optimised."""
    from scipy import optimize

    cols = np.unique(X.indices)
    Xs = X[:, cols].tocsr()
    sign = 2.0 * y - 1
    pos = y.mean()
    sample = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)) / len(y)

    def loss(p):
        w, b = p[:-1], p[-1]
        margin = -sign * (Xs @ w + b)
        grad = sample * -sign / (1 + np.exp(-margin))
        return (np.sum(sample * np.logaddexp(0, margin)) + 0.5 * l2 * w @ w,
                np.concatenate([Xs.T @ grad + l2 * w, [grad.sum()]]))

    result = optimize.minimize(loss, np.zeros(len(cols) + 1), jac=True, method="L-BFGS-B",
                               options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-14})
    w = np.zeros(DIM)
    w[cols] = result.x[:-1]
    return w, float(result.x[-1])


@dataclass
class LearnedModel:
    weights: np.ndarray   # DIM float32
    bias: float
    threshold: float
    data_sha256: str      # of the training files, so a test notices data changed without a retrain

    def score(self, text: str) -> float:
        f = features(text)
        z = self.bias + sum(float(self.weights[i]) * v for i, v in f.items())
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: Path) -> None:
        """An .npz with fixed zip timestamps: the same training gives the same bytes."""
        idx = np.flatnonzero(self.weights).astype(np.int32)
        arrays = {"index": idx, "weight": self.weights[idx].astype(np.float32),
                  "bias": np.float64(self.bias), "threshold": np.float64(self.threshold),
                  "data_sha256": np.array(self.data_sha256)}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for name, array in arrays.items():
                buf = io.BytesIO()
                np.save(buf, array, allow_pickle=False)
                z.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                           zipfile.ZIP_DEFLATED)

    @classmethod
    def load(cls, path: Path) -> "LearnedModel":
        with np.load(path, allow_pickle=False) as z:
            weights = np.zeros(DIM, np.float32)
            weights[z["index"]] = z["weight"]
            return cls(weights, float(z["bias"]), float(z["threshold"]), str(z["data_sha256"]))


@lru_cache(maxsize=4)
def learned_model(path: Path = MODEL_PATH) -> LearnedModel:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m serve.crisis train`")
    return LearnedModel.load(path)


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("text"), str) or not isinstance(row.get("risk"), bool):
                    raise ValueError(f"{path}:{n}: each line needs \"text\" (a string) and \"risk\" (true/false)")
                rows.append({"lang": "en", "category": "", **row})
    return rows


def data_sha256(paths: list[Path] = TRAIN_FILES) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def fold_of(y: np.ndarray, k: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Stratified folds from a fixed seed: each class shuffled, then dealt out in turn."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for label in (0, 1):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % k
    return fold


def out_of_fold(rows: list[dict]) -> np.ndarray:
    """Each message scored by a model trained on the other folds."""
    X = feature_matrix([r["text"] for r in rows])
    y = np.array([r["risk"] for r in rows], float)
    folds, scores = fold_of(y), np.zeros(len(y))
    for k in range(FOLDS):
        w, b = fit(X[folds != k], y[folds != k])
        scores[folds == k] = 1 / (1 + np.exp(-(X[folds == k] @ w + b)))
    return scores


def choose_threshold(scores: np.ndarray, rows: list[dict], budget: float = FALSE_ALARM_BUDGET) -> float:
    """The lowest threshold whose out-of-fold false alarms, backstop included, stay within the budget."""
    y = np.array([r["risk"] for r in rows])
    backstop = np.array([regex_fires(r["text"]) for r in rows])
    for t in np.unique(np.round(scores, 4)):
        if np.mean((scores[~y] >= t) | backstop[~y]) <= budget:
            return float(t)
    return 1.0


def train(paths: list[Path] = TRAIN_FILES, say=print) -> tuple[LearnedModel, np.ndarray]:
    rows = read_rows(paths)
    say(f"[crisis] {len(rows)} messages ({sum(r['risk'] for r in rows)} risk); {FOLDS}-fold cross-validation")
    scores = out_of_fold(rows)
    threshold = choose_threshold(scores, rows)
    w, b = fit(feature_matrix([r["text"] for r in rows]), np.array([r["risk"] for r in rows], float))
    return LearnedModel(w.astype(np.float32), b, threshold, data_sha256(paths)), scores


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
    score: float             # learned: the highest probability among the texts; served: 1.0 unsafe S11, else 0.0
    detector: str            # the one that decided: learned | served
    backstop: bool           # the regular expressions fired
    fallback: str | None = None   # why the served guard was not used


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
        score = max((model.score(t) for t in texts), default=0.0)
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


# ------------------------------------------------------------------------------------ ASGI middleware

# vLLM's routes that run the model, by normalised path (lower case, no trailing slash) -> request shape.
ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/chat/completions/batch": "chat_batch",
    "/v1/completions": "completion",
    "/v1/responses": "responses",
    "/v1/messages": "messages",          # Anthropic Messages API
    "/invocations": "invocations",       # SageMaker: a chat or a completion request, told apart by its fields
}
# vLLM's AuthenticationMiddleware asks for the key on these prefixes only (so not on /invocations)
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")
MAX_BODY = 10 * 1024 * 1024


def request_texts(shape: str, request: dict) -> tuple[str, list[str]]:
    """(the reply shape, the user texts to check) of a parsed request body."""
    if shape == "invocations":
        shape = "chat" if "messages" in request else "completion"
    if shape in ("chat", "messages"):
        return shape, [last_user_text(request.get("messages"))]
    if shape == "chat_batch":
        return shape, [last_user_text(c) for c in request.get("messages") or [] if isinstance(c, list)]
    if shape == "completion":
        prompt = request.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
        return shape, [p for p in prompts if isinstance(p, str)]  # token-id prompts carry no text to read
    if shape == "responses":
        given = request.get("input")
        if isinstance(given, str):
            return shape, [given]
        users = [i.get("content") for i in given or [] if isinstance(i, dict) and i.get("role") == "user"]
        return shape, [_content_text(users[-1])] if users else []
    return shape, []


class CrisisMiddleware:
    """ASGI middleware for vLLM's OpenAI server: a risky request to any route in ROUTES gets the fixed reply.

    Settings from the environment (guard_env): CRISIS_DETECTOR, CRISIS_GUARD_*, CRISIS_LOCALE, CRISIS_AUDIT_LOG.
    A request vLLM would refuse with 401 (API_KEY set, path under GUARDED_PREFIX, no valid bearer key) passes
    through unread, so vLLM still answers it; the key is compared as vLLM does, in constant time.
    """

    def __init__(self, app):
        self.app = app
        self.guard = Guard.from_env()
        self.locale = os.environ.get("CRISIS_LOCALE", "US")
        key = os.environ.get("API_KEY") or os.environ.get("VLLM_API_KEY") or ""
        self.key_hash = hashlib.sha256(key.encode()).digest() if key else None
        learned_model()  # fail at start-up, not on the first request, when the weights are missing

    def authorised(self, scope) -> bool:
        if self.key_hash is None:
            return True
        # the FIRST Authorization header, as starlette's Headers.get (and so vLLM) reads it
        value = next((v for k, v in scope.get("headers") or [] if k.lower() == b"authorization"), b"")
        scheme, _, param = value.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(hashlib.sha256(param.encode()).digest(),
                                                                  self.key_hash)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        shape = ROUTES.get(re.sub("/+", "/", path).rstrip("/").lower())
        if shape is None or (path.startswith(GUARDED_PREFIX) and not self.authorised(scope)):
            return await self.app(scope, receive, send)

        headers = {k.lower(): v for k, v in reversed(scope.get("headers") or [])}  # first occurrence wins
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > MAX_BODY:
            return await _too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                return await _too_large(send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            # the body once; then the real channel, which blocks until the client disconnects. Returning the
            # body again would spin vLLM's disconnect listener forever and hang every request we pass on.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            request = json.loads(body)
            reply_shape, texts = request_texts(shape, request)
        except (ValueError, AttributeError, TypeError):
            return await self.app(scope, replay, send)  # not a JSON object: vLLM answers with its 400
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        route = "/" + path.strip("/")
        if self.guard.detector == "served":  # an HTTP call: off the event loop, which serves every stream
            decision = await asyncio.to_thread(self.guard.check, texts, route, request_id)
        else:
            decision = self.guard.check(texts, route, request_id)
        if not decision.risk:
            return await self.app(scope, replay, send)
        payload, content_type = fixed_response(reply_shape, request, crisis_text(self.locale), max(1, len(texts)))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()),
                                (b"x-crisis-guard", b"1"), (b"x-request-id", request_id.encode("latin-1"))]})
        await send({"type": "http.response.body", "body": payload})


async def _too_large(send) -> None:
    payload = json.dumps({"error": {"message": f"request body over {MAX_BODY // 2**20} MiB",
                                    "type": "RequestEntityTooLarge", "param": None, "code": 413}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _sse(events: list, named: bool = False) -> bytes:
    """Server-sent events: OpenAI chat and completions end with [DONE]; Responses and Anthropic name each event."""
    if named:
        return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


def fixed_response(shape: str, request: dict, reply: str, n: int) -> tuple[bytes, bytes]:
    """The fixed reply as the route itself would answer: (body, content type). `n`: choices (one per prompt
    or conversation of a batch, each answered with the crisis text)."""
    created, model, stream = int(time.time()), request.get("model") or "", bool(request.get("stream"))
    ident = uuid.uuid4().hex[:24]
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if shape in ("chat", "chat_batch"):
        count = n if shape == "chat_batch" else 1
        if stream and shape == "chat":
            head = {"id": f"chatcmpl-{ident}", "object": "chat.completion.chunk", "created": created, "model": model}
            deltas = [({"role": "assistant", "content": ""}, None), ({"content": reply}, None), ({}, "stop")]
            return _sse([{**head, "choices": [{"index": 0, "delta": d, "finish_reason": f}]}
                         for d, f in deltas]), b"text/event-stream"
        choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}
                   for i in range(count)]
        return json.dumps({"id": f"chatcmpl-{ident}", "object": "chat.completion", "created": created,
                           "model": model, "choices": choices, "usage": zero}).encode(), b"application/json"
    if shape == "completion":
        head = {"id": f"cmpl-{ident}", "object": "text_completion", "created": created, "model": model}
        if stream:
            events = [{**head, "choices": [{"index": i, "text": reply, "logprobs": None, "finish_reason": None}]}
                      for i in range(n)]
            events += [{**head, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}]}
                       for i in range(n)]
            return _sse(events), b"text/event-stream"
        choices = [{"index": i, "text": reply, "logprobs": None, "finish_reason": "stop"} for i in range(n)]
        return json.dumps({**head, "choices": choices, "usage": zero}).encode(), b"application/json"
    if shape == "responses":
        part = {"type": "output_text", "text": reply, "annotations": []}
        item = {"id": f"msg_{ident}", "type": "message", "status": "completed", "role": "assistant",
                "content": [part]}
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        done = {"id": f"resp_{ident}", "object": "response", "created_at": created, "model": model,
                "status": "completed", "output": [item], "parallel_tool_calls": False, "tool_choice": "none",
                "tools": [], "usage": usage}
        if not stream:
            return json.dumps(done).encode(), b"application/json"
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        empty_item = {**item, "status": "in_progress", "content": []}
        events = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {"type": "response.output_item.added", "output_index": 0, "item": empty_item},
            {"type": "response.content_part.added", "item_id": item["id"], "output_index": 0, "content_index": 0,
             "part": {**part, "text": ""}},
            {"type": "response.output_text.delta", "item_id": item["id"], "output_index": 0, "content_index": 0,
             "delta": reply, "logprobs": []},
            {"type": "response.output_text.done", "item_id": item["id"], "output_index": 0, "content_index": 0,
             "text": reply, "logprobs": []},
            {"type": "response.content_part.done", "item_id": item["id"], "output_index": 0, "content_index": 0,
             "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": done},
        ]
        return _sse([{**e, "sequence_number": i} for i, e in enumerate(events)], named=True), b"text/event-stream"
    # Anthropic Messages API
    message = {"id": f"msg_{ident}", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 0, "output_tokens": 0}}
    if not stream:
        return json.dumps(message).encode(), b"application/json"
    events = [
        {"type": "message_start", "message": {**message, "content": [], "stop_reason": None}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": reply}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 0}},
        {"type": "message_stop"},
    ]
    return _sse(events, named=True), b"text/event-stream"


# ------------------------------------------------------------------------------- training and evaluation


def rates(rows: list[dict], flagged: list[bool]) -> dict:
    """Recall on risk rows and false alarms on the others, each with its Wilson 95% interval."""
    from serve.stats import wilson_interval

    risk = [f for r, f in zip(rows, flagged) if r["risk"]]
    safe = [f for r, f in zip(rows, flagged) if not r["risk"]]
    return {"n": len(rows), "risk": len(risk), "ordinary": len(safe),
            "recall": sum(risk) / len(risk) if risk else float("nan"), "recall_ci": wilson_interval(sum(risk), len(risk)),
            "false_alarms": sum(safe) / len(safe) if safe else float("nan"),
            "false_alarms_ci": wilson_interval(sum(safe), len(safe))}


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
    what = f"{'/'.join(used)}, learned threshold {learned_model().threshold:.4f}, + backstop" + (
        f"; {fallbacks} served-guard failures decided by the learned detector" if fallbacks else "")
    return report(rows, [d.risk for d in decisions], f"crisis guard ({what}) on {path}", say)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m serve.crisis", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="retrain serve/crisis_model.npz from the training files")
    p.add_argument("--out", type=Path, default=MODEL_PATH)
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
        return 0
    rows = read_rows(TRAIN_FILES)
    scores = out_of_fold(rows)
    threshold = choose_threshold(scores, rows)
    for name, flagged in [("learned alone", scores >= threshold),
                          ("backstop alone", [regex_fires(r["text"]) for r in rows]),
                          ("learned + backstop", [(s >= threshold) or regex_fires(r["text"])
                                                  for s, r in zip(scores, rows)])]:
        report(rows, list(flagged), f"{FOLDS}-fold cross-validation, {name} (threshold {threshold:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
