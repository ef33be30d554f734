"""Eval and report stages on tiny models: caching, report files, the judge. (The scoring itself: test_scoring.py.)"""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import build_tiny_model, make_pack

from core.pack import load_pack
from pipeline import runner

PACK = """\
    name: toy
    system_prompt: You are a toy assistant.
    cpt: {enabled: false}
    eval:
      text: [{path: data/eval/text.jsonl, licence: permissive}]
      sft: [{path: data/eval/sft.jsonl, licence: permissive}]
      pref: [{path: data/eval/pref.jsonl, licence: permissive}]
      prompts: [{path: data/eval/prompts.jsonl, licence: permissive}]
      max_new_tokens: 8
"""
FILES = {
    "data/eval/text.jsonl": [{"text": "A bond pays a fixed coupon."}, {"text": "Equity is ownership."}],
    "data/eval/sft.jsonl": [{"messages": [{"role": "user", "content": "What is a share?"},
                                          {"role": "assistant", "content": "A unit of ownership."}]}],
    "data/eval/pref.jsonl": [{"prompt": "2+2?", "chosen": "4", "rejected": "It is 5."},
                             {"prompt": "Capital of Italy?", "chosen": "Rome", "rejected": "Milan"}],
    "data/eval/prompts.jsonl": [{"prompt": "Define yield."}, {"prompt": "What is inflation?"}],
}


def publish_model(run_dir, stage, model_src, fingerprint):
    (run_dir / stage).mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_src, run_dir / stage / "model", dirs_exist_ok=True)
    (run_dir / stage / "stage.json").write_text(json.dumps({"fingerprint": fingerprint, "model": "model",
                                                            "wall_time_s": 1.5, "metrics": {"tokens": 100}}))


@pytest.mark.slow
def test_eval_and_report_stages(workspace, tiny_model_dir, tokenizer_dir, capsys):
    make_pack(workspace, "toy", PACK, FILES)
    run_dir = workspace / "runs" / "toy"
    publish_model(run_dir, "base", tiny_model_dir, "fp-base")
    publish_model(run_dir, "merge", build_tiny_model(workspace / "m2", tokenizer_dir, seed=1), "fp-merge-1")
    (run_dir / "sft").mkdir()
    (run_dir / "sft" / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10}) + "\n"
                                                       for s in range(1, 6)) + json.dumps({"step": 5, "eval_loss": 2.9}) + "\n")
    (run_dir / "sft" / "stage.json").write_text(json.dumps({"fingerprint": "fp-sft", "model": "../base/model",
                                                            "disabled": True}))
    pack = load_pack("toy")

    runner.run_stage(pack, "eval", run_dir)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert list(metrics) == ["base", "merge"]  # the disabled sft stage is the base model: not scored twice
    for key in ("domain_ppl", "general_ppl", "sft_loss", "pref_accuracy", "pref_margin"):
        assert key in metrics["base"] and key in metrics["merge"]
    assert "reward_accuracy" in metrics["merge"] and "reward_accuracy" not in metrics["base"]
    assert metrics["base"]["domain_ppl"] > 1000  # a random model over a 49k vocabulary
    answers = [json.loads(line) for line in (run_dir / "eval" / "answers.jsonl").read_text().splitlines()]
    assert [a["prompt"] for a in answers] == ["Define yield.", "What is inflation?"]
    assert set(answers[0]) == {"prompt", "base", "merge"}

    # A new merge: base comes from the cache, only the merge model is scored again.
    publish_model(run_dir, "merge", build_tiny_model(workspace / "m3", tokenizer_dir, seed=2), "fp-merge-2")
    capsys.readouterr()
    runner.run_stage(pack, "eval", run_dir)
    log = capsys.readouterr().out
    assert "base: cached scores" in log and "merge: scoring" in log
    assert json.loads((run_dir / "eval" / "metrics.json").read_text())["base"] == metrics["base"]

    from core.votes import Store

    store = Store(run_dir / "arena.sqlite")
    for i, kind in enumerate(["model_a", "model_a", "model_b", "tie"]):
        battle = store.new_battle("toy", "toy-base")
        store.add_turn(battle, 0, f"question {i}")
        store.add_generation(battle, 0, "a", "toy", "tuned answer", finish_reason="stop")
        store.add_generation(battle, 0, "b", "toy-base", "base answer", finish_reason="stop")
        store.vote(battle, kind, "rater")

    runner.run_stage(pack, "report", run_dir)
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Arena (blind human votes)" in md and "| tuned wins / losses / ties | 2 / 1 / 1 |" in md
    assert "| win rate (ties as half) | 0.625 |" in md
    assert "| stage | status | wall time (s) |" in md and "held-out domain perplexity ↓" in md
    assert "| merge | built |" in md and "disabled (passes its input through)" in md
    html_text = (run_dir / "report" / "report.html").read_text()
    assert html_text.count("data:image/png;base64,") == 2
    for png in ("loss_curves.png", "metrics.png"):
        assert (run_dir / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (run_dir / "report" / "model_card.md").read_text()
    assert "# toy model" in card and "held-out domain perplexity" in card
    assert not (run_dir / "report.md").exists()  # the report writes into its own folder only


@pytest.mark.slow
def test_answers_come_from_base_and_final_model_unless_all(workspace, tiny_model_dir, tokenizer_dir, capsys):
    make_pack(workspace, "toy", PACK, FILES)
    run_dir = workspace / "runs" / "toy"
    publish_model(run_dir, "base", tiny_model_dir, "fp-base")
    publish_model(run_dir, "pref", build_tiny_model(workspace / "p", tokenizer_dir, seed=3), "fp-pref")
    publish_model(run_dir, "merge", build_tiny_model(workspace / "m", tokenizer_dir, seed=4), "fp-merge")

    def answered():
        rows = [json.loads(line) for line in (run_dir / "eval" / "answers.jsonl").read_text().splitlines()]
        return set(rows[0]) - {"prompt"}

    runner.run_stage(load_pack("toy"), "eval", run_dir)
    assert list(json.loads((run_dir / "eval" / "metrics.json").read_text())) == ["base", "pref", "merge"]
    assert answered() == {"base", "merge"}  # pref is scored but not asked to generate
    assert "greedy answers" in capsys.readouterr().out

    # merge gone: pref is now the final model; its cached scores lack answers, so it is scored again
    shutil.rmtree(run_dir / "merge")
    runner.run_stage(load_pack("toy"), "eval", run_dir, force=True)
    log = capsys.readouterr().out
    assert "base: cached scores" in log and "pref: scoring" in log
    assert answered() == {"base", "pref"}

    publish_model(run_dir, "merge", build_tiny_model(workspace / "m", tokenizer_dir, seed=4), "fp-merge")
    runner.run_stage(load_pack("toy", ["eval.answers=all"]), "eval", run_dir)
    assert answered() == {"base", "pref", "merge"}


class JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge of the test's own: prefers the answer containing GOOD, or always 'A'."""

    biased = False

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        a = text.split("[Answer A]")[1].split("[Answer B]")[0]
        verdict = "A" if self.biased or "GOOD" in a else "B"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": verdict}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("biased", [False, True])
def test_judge_swaps_order_and_counts_disagreement_as_tie(biased, tmp_path, monkeypatch):
    from openai import OpenAI

    from core.schema import Judge
    from pipeline.judge import judge_pair, judge_run

    handler = type("H", (JudgeHandler,), {"biased": biased})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        client = OpenAI(base_url=url, api_key="k")
        tuned_wins = judge_pair(client, "judge", "q", "GOOD answer", "weak answer")
        base_wins = judge_pair(client, "judge", "q", "weak answer", "GOOD answer")
        monkeypatch.setenv("JUDGE_API_KEY", "k")
        summary = judge_run(Judge(base_url=url, model="judge"), ["q1", "q2", "q3", "q4"],
                            ["GOOD 1", "GOOD 2", "GOOD 3", "meh"], ["meh", "meh", "meh", "GOOD 4"],
                            tmp_path / "judge.jsonl", print)
    finally:
        server.shutdown()
    if biased:  # always 'A': the two orders disagree -> tie
        assert tuned_wins == ("tie", ["A", "A"]) and base_wins == ("tie", ["A", "A"])
        assert summary["counts"] == {"tuned": 0, "base": 0, "tie": 4} and summary["win_rate"] == 0.5
    else:
        assert tuned_wins == ("tuned", ["A", "B"]) and base_wins == ("base", ["B", "A"])
        assert summary["counts"] == {"tuned": 3, "base": 1, "tie": 0} and summary["win_rate"] == 0.75
    assert len((tmp_path / "judge.jsonl").read_text().splitlines()) == 4
