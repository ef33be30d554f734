"""The crisis guard's in-process detectors: a learned classifier and the regular-expression backstop.

Learned: logistic regression over hashed word, character and concept n-grams, trained with numpy/scipy on
domains/counseling/data/crisis_train.jsonl and crisis_examples.jsonl; its weights and threshold are
serve/crisis_model.npz (`python -m serve.crisis train` rebuilds them, deterministically). The threshold spends
the false-alarm budget (10% on cross-validation, backstop included) on recall. The backstop: a message is
flagged when either the classifier or one of the regular expressions fires.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.stats import wilson_interval

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "domains" / "counseling" / "data"
TRAIN_FILES = [DATA / "crisis_train.jsonl", DATA / "crisis_examples.jsonl"]
MODEL_PATH = Path(__file__).with_name("crisis_model.npz")


# ------------------------------------------------------------------------------------------ backstop

# Written against crisis_examples.jsonl; alone they caught 4 of 20 separately written risk messages, so they
# only add to the detector's recall. Idioms such as "this deadline is killing me" are excluded. Their false
# alarms spend the same 10% budget as the learned part's: "suicide", "self-harm" and "overdose" as topics
# (a counsellor's question, a pharmacology class) and past, recovered risk cost 7 points of the ensemble's
# cross-validated recall, so those words count only in the first person, and nothing fires when _PAST does.
_RISK = [
    # direct statements (typos such as "kil myself" included)
    r"(?<!not thinking of )(?<!never )(?<!never wanted to )(?<!ever thought about )"
    r"\b(kill|kil|kll|killing|hurt|hurting|harm|harming)\s*(my\s*self|myself|meself)\b"
    r"(?!\s+(laughing|at|lifting|playing|tripping|while))",
    r"\b(cut|cutting)\s+(my\s*self|myself)\b(?!\s+(shaving|while|on|by|accidentally|cooking|with\s+a\s+kitchen))",
    # "suicide" and "self-harm" in the first person, now (said of others or as a topic they are not risk)
    r"(?<!not )\b(i'?m|i\s+am|feel|feeling|been|getting|still|actively)\s+(so\s+|really\s+|very\s+|kinda\s+)?suicidal\b",
    r"(?<!not )(?<!never )\b(commit|committing|attempt|attempting|contemplating|considering|thinking\s+(about|of))"
    r"\s+suicide\b",
    r"\bi\s+(self[-\s]?harm|keep\s+self[-\s]?harming|('?ve|have)\s+been\s+self[-\s]?harming|started\s+self[-\s]?harming)\b",
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
    r"\b(take|taking|took|taken|do|doing|going\s+to|gonna|want\s+to|wanna)\s+(an?\s+)?(overdose|od)\b(?!\s+(of|on)\b)",
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
    r"\b(uccidermi|suicidarmi|ammazzarmi|farla\s+finita(?!\s+con\b)|togliermi\s+la\s+vita|non\s+voglio\s+più\s+vivere)\b",
]
_PATTERNS = [re.compile(p, re.IGNORECASE) for p in _RISK]
# risk told as past ("three years ago I tried to end my life, today I graduated"): the learned part decides
_PAST = re.compile(r"\b(years?\s+ago|months\s+ago|used\s+to|back\s+in|when\s+i\s+was|years?\s+(since|clean|free)|"
                   r"(clean|free)\s+(from|of)|anni\s+fa|mesi\s+fa|una\s+volta|quando\s+ero|da\s+ragazz[oa]|pensavo\s+di)\b",
                   re.IGNORECASE)


def regex_fires(text: str) -> bool:
    return not _PAST.search(text or "") and any(p.search(text or "") for p in _PATTERNS)


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


def logistic(X, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression on a dense or sparse matrix, both classes weighted equally, by
    L-BFGS from zero (deterministic): (weights, bias). The n-gram model and the ensemble's head both fit with it."""
    from scipy import optimize

    sign = 2.0 * y - 1
    pos = y.mean()
    sample = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)) / len(y)

    def loss(p):
        w, b = p[:-1], p[-1]
        margin = -sign * (X @ w + b)
        grad = sample * -sign / (1 + np.exp(-margin))
        return (np.sum(sample * np.logaddexp(0, margin)) + 0.5 * l2 * w @ w,
                np.concatenate([X.T @ grad + l2 * w, [grad.sum()]]))

    result = optimize.minimize(loss, np.zeros(X.shape[1] + 1), jac=True, method="L-BFGS-B",
                               options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-14})
    return result.x[:-1], float(result.x[-1])


def fit(X, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """The n-gram model's regression. Features never seen in training keep weight 0, so only the seen columns
    are optimised."""
    cols = np.unique(X.indices)
    seen, bias = logistic(X[:, cols].tocsr(), y, l2)
    w = np.zeros(DIM)
    w[cols] = seen
    return w, bias


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


def rates(rows: list[dict], flagged: list[bool]) -> dict:
    """Recall on risk rows and false alarms on the others, each with its Wilson 95% interval."""
    risk = [f for r, f in zip(rows, flagged) if r["risk"]]
    safe = [f for r, f in zip(rows, flagged) if not r["risk"]]
    return {"n": len(rows), "risk": len(risk), "ordinary": len(safe),
            "recall": sum(risk) / len(risk) if risk else float("nan"), "recall_ci": wilson_interval(sum(risk), len(risk)),
            "false_alarms": sum(safe) / len(safe) if safe else float("nan"),
            "false_alarms_ci": wilson_interval(sum(safe), len(safe))}
