"""The shipped multiple-choice benchmarks, the lm-eval task check, the serve gate on benchmark accuracy, and (slow)
the eval stage running a benchmark through lm-evaluation-harness on a tiny model."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
from conftest import build_tiny_model, make_pack

from core.errors import PackError
from core.pack import load_pack
from core.rows import load_source
from core.schema import Source

DOMAINS = Path(__file__).resolve().parents[1] / "domains"
SHIPPED = sorted(DOMAINS.glob("*/data/eval/mc.jsonl"))


def six_grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + 6]) for i in range(len(words) - 5)}


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in strings(v)] if isinstance(value, list) else []


def test_a_benchmark_ships():
    assert [p.parts[-4] for p in SHIPPED], "no domains/<name>/data/eval/mc.jsonl"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parts[-4] for p in SHIPPED])
def test_shipped_benchmark_is_valid_balanced_and_disjoint_from_training(path):
    rows, problems = load_source(Source(path=str(path), licence="permissive"), path.parent, "mc")
    assert problems == [] and len(rows) >= 100
    counts = collections.Counter(r["answer"] for r in rows)
    assert all(abs(counts[i] - len(rows) / 4) <= len(rows) * 0.05 for i in range(4)), counts
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == len(questions)
    pack, training = load_pack(path.parts[-4]), set()
    files = {pack.dir / s.path for stage in ("cpt", "sft", "pref") for s in pack.sources(stage) if s.path}
    assert files, "no local training files found"
    for f in files:  # what the stages train on (not, e.g., the crisis guard's own data)
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                for s in strings(json.loads(line)):
                    training |= six_grams(s)
    shared = {q: sorted(six_grams(q) & training)[:1] for q in questions if six_grams(q) & training}
    assert shared == {}


def blind_baselines(rows: list[dict]) -> dict[str, float]:
    """Accuracy of answering without reading the question: always the longest choice, always the shortest
    (a tie counts as a random pick among the tied ones, so 1/k), always the most common answer position."""
    def always(pick) -> float:
        total = 0.0
        for r in rows:
            lengths = [len(c) for c in r["choices"]]
            tied = [i for i, n in enumerate(lengths) if n == pick(lengths)]
            total += (r["answer"] in tied) / len(tied)
        return total / len(rows)
    positions = collections.Counter(r["answer"] for r in rows)
    return {"longest": always(max), "shortest": always(min), "same position": max(positions.values()) / len(rows)}


def test_blind_baselines_split_ties_and_count_positions():
    rows = [{"choices": ["aa", "b", "cc", "d"], "answer": 0}, {"choices": ["a", "b", "c", "dddd"], "answer": 3}]
    assert blind_baselines(rows) == {"longest": (0.5 + 1) / 2, "shortest": (0 + 0) / 2, "same position": 0.5}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parts[-4] for p in SHIPPED])
def test_shipped_benchmark_cannot_be_passed_by_choice_length_or_position(path):
    # Chance is 0.25; on 100 items its standard error is ~0.043, so 0.40 is ~3.5 standard errors above it. Before
    # its rewrite, counseling's right answer was the longest choice in 96% of items: lm-eval's `acc` (summed
    # log-likelihood, which favours short choices) then scored the base model 0.02, and `acc_norm` inflated.
    rows, problems = load_source(Source(path=str(path), licence="permissive"), path.parent, "mc")
    assert problems == [] and len(rows) >= 100, (problems[:3], len(rows))
    baselines = blind_baselines(rows)
    assert max(baselines.values()) <= 0.40, (
        f"{path}: a model that never reads the question scores {baselines}; rewrite distractors so the right "
        "answer is not systematically the longest or shortest choice, and move answers between positions")


MC = [{"question": f"Which number is {n}?", "choices": [str(n), str(n + 1), str(n + 2), str(n + 3)], "answer": 0}
      for n in range(6)]
PACK = """\
    name: toy
    system_prompt: You are a toy assistant.
    eval:
      general_text: false
      benchmarks: [{path: data/eval/mc.jsonl, licence: permissive}]
      lm_eval_tasks: [%s]
"""


@pytest.mark.slow  # lm-eval indexes its thousands of task YAMLs: ~30 s
def test_unknown_lm_eval_task_is_one_pack_error(workspace):
    from pipeline.evaluate import write_tasks

    make_pack(workspace, "toy", PACK % "no_such_task_xyz", {"data/eval/mc.jsonl": MC})
    pack = load_pack("toy")
    with pytest.raises(PackError) as e:
        write_tasks(pack, workspace / "tasks", workspace / "ds")
    assert "no_such_task_xyz" in str(e.value) and "eval.lm_eval_tasks" in str(e.value)


def test_bad_benchmark_row_is_named_by_file_and_line(workspace):
    from pipeline.evaluate import write_tasks

    bad = [*MC, {"question": "Q?", "choices": ["a", "b", "c"], "answer": 4}]
    make_pack(workspace, "toy", PACK % "", {"data/eval/mc.jsonl": bad})
    with pytest.raises(PackError) as e:
        write_tasks(load_pack("toy"), workspace / "tasks", workspace / "ds")
    assert "mc.jsonl:7" in str(e.value) and "'choices'" in str(e.value) and "'answer'" in str(e.value)


def write_eval_stage(run_dir: Path, base: float, final: float) -> None:
    (run_dir / "eval").mkdir(parents=True)
    models = {"base": {"benchmark_acc": base, "benchmark_acc_stderr": 0.04},
              "merge": {"benchmark_acc": final, "benchmark_acc_stderr": 0.04}}
    (run_dir / "eval" / "stage.json").write_text(json.dumps({"fingerprint": "x", "metrics": {"models": models}}))


def test_serve_gate_refuses_when_final_is_below_base_by_more_than_the_margin(workspace):
    from serve.launch import check_benchmark_gate, serve

    make_pack(workspace, "toy", "name: toy\nsystem_prompt: s\nserve: {min_benchmark_delta: -0.05}\n")
    run_dir = workspace / "runs" / "toy"
    write_eval_stage(run_dir, base=0.50, final=0.40)
    with pytest.raises(PackError) as e:
        serve(load_pack("toy"), run_dir)  # refused before any model or server is looked at
    assert "not serving" in str(e.value) and "-0.100" in str(e.value) and "min_benchmark_delta=-0.05" in str(e.value)

    (run_dir / "eval" / "stage.json").unlink()
    write_eval_stage(run_dir.parent / "ok", base=0.50, final=0.47)
    passed = check_benchmark_gate(load_pack("toy"), run_dir.parent / "ok")
    assert passed.startswith("[serve] benchmark accuracy 0.470 vs base 0.500 (-0.030")
    with pytest.raises(PackError, match="run `make domain=toy eval`"):
        check_benchmark_gate(load_pack("toy"), run_dir)  # asked for, but no benchmark numbers
    make_pack(workspace, "toy", "name: toy\nsystem_prompt: s\n")
    assert check_benchmark_gate(load_pack("toy"), run_dir) is None  # not asked for: no eval needed


@pytest.mark.slow
def test_eval_stage_reports_benchmark_accuracy_with_stderr(workspace, tiny_model_dir, tokenizer_dir, monkeypatch):
    from test_evaluate import publish_model

    from pipeline import runner

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_pack(workspace, "toy", PACK % "", {"data/eval/mc.jsonl": MC})
    run_dir = workspace / "runs" / "toy"
    publish_model(run_dir, "base", tiny_model_dir, "fp-base")
    publish_model(run_dir, "merge", build_tiny_model(workspace / "m", tokenizer_dir, seed=1), "fp-merge")
    pack = load_pack("toy")
    runner.run_stage(pack, "eval", run_dir)
    models = json.loads((run_dir / "eval" / "stage.json").read_text())["metrics"]["models"]
    for stage in ("base", "merge"):
        m = models[stage]
        assert 0 <= m["benchmark_acc"] <= 1 and m["benchmark_acc"] * len(MC) == pytest.approx(
            round(m["benchmark_acc"] * len(MC)))
        assert m["benchmark_acc_stderr"] == pytest.approx((m["benchmark_acc"] * (1 - m["benchmark_acc"])
                                                           / (len(MC) - 1)) ** 0.5)
    runner.run_stage(pack, "report", run_dir)
    md = (run_dir / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| benchmark accuracy (± stderr) ↑"))
    assert re.fullmatch(r"\| benchmark accuracy \(± stderr\) ↑ \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \(.+\) \|", row), row
    assert "benchmark accuracy (± stderr)" in (run_dir / "report" / "report.html").read_text()
