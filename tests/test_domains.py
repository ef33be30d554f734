"""The four shipped domain packs: sizes, exact row schemas, no duplicates, no train/held-out overlap."""
from __future__ import annotations

import json
import re

import pytest
from conftest import REPO

from core.pack import load_pack

DOMAINS = ("finance", "medical", "counseling", "italian")
SCHEMA = {
    "cpt.jsonl": {"text"},
    "sft.jsonl": {"messages"},
    "pref.jsonl": {"prompt", "chosen", "rejected", "reason"},
    "eval/text.jsonl": {"text"},
    "eval/sft.jsonl": {"messages"},
    "eval/pref.jsonl": {"prompt", "chosen", "rejected", "reason"},
    "eval/prompts.jsonl": {"prompt"},
}
MINIMUM = {"sft.jsonl": 200, "pref.jsonl": 150, "eval/prompts.jsonl": 40, "eval/pref.jsonl": 40, "eval/sft.jsonl": 20}


def rows(domain: str, name: str) -> list[dict]:
    path = REPO / "domains" / domain / "data" / name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def first_user(row: dict) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


@pytest.mark.parametrize("domain", DOMAINS)
def test_pack_files_have_exact_schemas_and_sizes(domain):
    pack = load_pack(domain)
    assert (REPO / "domains" / domain / "rubric.md").read_text().strip()
    for name, keys in SCHEMA.items():
        data = rows(domain, name)
        if name == "cpt.jsonl" and not pack.cpt.enabled:
            continue
        assert data, f"{domain}/{name} is missing or empty"
        assert all(set(r) == keys for r in data), f"{domain}/{name}: rows must have exactly {sorted(keys)}"
        assert len(data) >= MINIMUM.get(name, 1), f"{domain}/{name}: {len(data)} rows"
        if "messages" in keys:
            for r in data:
                roles = [m["role"] for m in r["messages"]]
                assert roles[0] == "user" and roles[-1] == "assistant"
                assert all(a != b for a, b in zip(roles, roles[1:])), "turns must alternate"
        if "chosen" in keys:
            assert all(r["chosen"] != r["rejected"] for r in data)
    assert len(rows(domain, "eval/prompts.jsonl")) == 40 and len(rows(domain, "eval/pref.jsonl")) == 40


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_duplicates_and_no_overlap_between_training_and_held_out(domain):
    keyed = {
        "cpt": [norm(r["text"]) for r in rows(domain, "cpt.jsonl")],
        "sft": [norm(json.dumps(r["messages"])) for r in rows(domain, "sft.jsonl")],
        "pref": [norm(r["prompt"]) for r in rows(domain, "pref.jsonl")],
        "eval/text": [norm(r["text"]) for r in rows(domain, "eval/text.jsonl")],
        "eval/sft": [norm(json.dumps(r["messages"])) for r in rows(domain, "eval/sft.jsonl")],
        "eval/pref": [norm(r["prompt"]) for r in rows(domain, "eval/pref.jsonl")],
        "eval/prompts": [norm(r["prompt"]) for r in rows(domain, "eval/prompts.jsonl")],
    }
    for name, values in keyed.items():
        assert len(values) == len(set(values)), f"{domain}/{name} has duplicate rows"
    train_prompts = {norm(first_user(r)) for r in rows(domain, "sft.jsonl")} | set(keyed["pref"])
    held_prompts = ({norm(first_user(r)) for r in rows(domain, "eval/sft.jsonl")} | set(keyed["eval/pref"])
                    | set(keyed["eval/prompts"]))
    assert not train_prompts & held_prompts, f"{domain}: held-out prompts seen in training"
    assert not set(keyed["cpt"]) & set(keyed["eval/text"]), f"{domain}: held-out text seen in CPT"


@pytest.mark.parametrize("domain", [d for d in DOMAINS if d != "counseling"])
def test_cpt_text_has_thirty_thousand_tokens(domain, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    total = sum(len(tok(r["text"])["input_ids"]) for r in rows(domain, "cpt.jsonl"))
    assert total >= 30_000, f"{domain}: {total} CPT tokens"
