"""The eval stage's cost per model, before and after the faster scorer, side by side in one run.

    .venv/bin/python bench/eval_speed.py                       # the embedded SmolLM2-135M, the finance pack
    .venv/bin/python bench/eval_speed.py --model runs/finance/sft/model --domain finance --before 86bfdd4

For one model, the three parts of what the eval stage does per model, timed with the scorer of git revision
`--before` (loaded from git, unchanged) and with the one in the working tree:
- scoring: held-out domain text, general text, conversations and preference pairs (core/scoring.py's Scorer);
  before: batches of 8 in file order, full-vocabulary log-softmax; after: shortest first in token-budget
  batches, the LM head on target positions only with fused cross-entropy;
- generation: the greedy answers to the pack's eval prompts; before: 8 per batch in file order; after: sorted,
  as many per batch as the token budget allows;
- benchmark: the pack's multiple-choice file through lm-evaluation-harness; before: lm-eval loads the model
  from its folder, batch 8; after: lm-eval wraps the model already loaded, batch 32.
It prints seconds, the speed-up, and the largest difference of any metric between the two (they must agree).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def scorer_module_at(rev: str) -> types.ModuleType:
    """core/scoring.py as it was at git revision `rev`, imported under another name."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:core/scoring.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("scoring_before")
    exec(compile(source, f"{rev}:core/scoring.py", "exec"), module.__dict__)
    return module


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def score_all(scorer, pack, data, general: list[str]) -> dict:
    from core.chat import as_messages, with_system
    from core.scoring import ranking_metrics

    sp = pack.system_prompt
    out = {"domain_nll": scorer.text_nll([r["text"] for r in data["text"]])[0],
           "general_nll": scorer.text_nll(general)[0],
           "sft_nll": scorer.conversation_nll([with_system(r["messages"], sp) for r in data["sft"]])[0]}
    prompts = [with_system(as_messages(r["prompt"], "user"), sp) for r in data["pref"]]
    chosen = scorer.completion_logps(prompts, [as_messages(r["chosen"], "assistant") for r in data["pref"]])
    rejected = scorer.completion_logps(prompts, [as_messages(r["rejected"], "assistant") for r in data["pref"]])
    out.update(ranking_metrics(chosen, rejected))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a model folder (default: the embedded SmolLM2-135M, saved to a temp folder)")
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--before", default="86bfdd4", help="git revision of the scorer to compare against")
    ap.add_argument("--skip", nargs="*", default=[], choices=["scoring", "generation", "benchmark"])
    args = ap.parse_args()

    from core.chat import as_messages, with_system
    from core.pack import load_pack
    from core.scoring import Scorer
    from pipeline import evaluate

    pack = load_pack(args.domain)
    data = evaluate.eval_data(pack)
    general = evaluate.GENERAL_TEXT.read_text(encoding="utf-8").split("\n\n")
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(args.model) if args.model else Path(tmp.name) / "model"
    if not args.model:
        from pipeline.base import load_base

        model, tok, _ = load_base("embedded", REPO)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
    old = scorer_module_at(args.before).Scorer(model_dir)
    new = Scorer(model_dir)
    rows = []

    if "scoring" not in args.skip:
        a, ta = timed(lambda: score_all(old, pack, data, general))
        b, tb = timed(lambda: score_all(new, pack, data, general))
        rows.append(("scoring (text, general, conversations, pairs)", ta, tb,
                     max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-9) for k in a), "largest relative difference"))
    if "generation" not in args.skip and data["prompts"]:
        prompts = [with_system(as_messages(r["prompt"], "user"), pack.system_prompt) for r in data["prompts"]]
        a, ta = timed(lambda: old.generate(prompts, pack.eval.max_new_tokens))
        b, tb = timed(lambda: new.generate(prompts, pack.eval.max_new_tokens))
        rows.append((f"generation ({len(prompts)} prompts, {pack.eval.max_new_tokens} new tokens)", ta, tb,
                     sum(x != y for x, y in zip(a, b)), "answers that differ (greedy; batch numerics)"))
    if "benchmark" not in args.skip:
        import lm_eval

        tasks, manager = evaluate.write_tasks(pack, Path(tmp.name) / "tasks", Path(tmp.name) / "datasets")
        if tasks:
            task = tasks[0]

            def before():
                out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                              tasks=[task], task_manager=manager, batch_size=8, device="cpu")
                return out["results"][task]["acc,none"]

            a, ta = timed(before)
            b, tb = timed(lambda: evaluate.run_benchmarks(new, [task], manager)["benchmark_acc"])
            rows.append((f"benchmark ({task}, lm-evaluation-harness)", ta, tb, abs(a - b), "accuracy difference"))

    print(f"\neval cost per model, {args.domain} pack, {model_dir}:")
    print(f"  {'part':50s} {'before s':>9s} {'after s':>9s} {'speed-up':>9s}")
    for name, ta, tb, diff, what in rows:
        print(f"  {name:50s} {ta:9.1f} {tb:9.1f} {ta / tb:8.2f}x   {what}: {diff:.3g}")
    total_a, total_b = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"  {'total':50s} {total_a:9.1f} {total_b:9.1f} {total_a / total_b:8.2f}x")


if __name__ == "__main__":
    main()
