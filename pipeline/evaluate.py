"""Eval stage: score every stage's model of the run on the pack's held-out data.

    python -m pipeline run eval --domain finance

For each model (base, cpt, sft, pref, merge; a disabled stage is the same model as its input and is
not scored twice):
- perplexity on held-out domain text (eval.text) and on a general-English text shipped with the project
  (pipeline/assets/general_en.txt), to catch forgetting;
- loss on the assistant tokens of held-out conversations (eval.sft);
- preference ranking on held-out pairs (eval.pref): is the length-normalised log-likelihood of `chosen`
  higher than of `rejected`, and by how much; for tuned models also the DPO implicit-reward accuracy with
  the base model as reference;
- greedy answers to the pack's eval prompts, saved side by side in answers.jsonl (the base and the final
  model; `eval.answers: all` adds every stage's);
- optionally, when the pack names an OpenAI-compatible judge, pairwise verdicts tuned vs base, each pair
  judged twice with the order swapped (a disagreement counts as a tie).
Results are cached per model fingerprint under runs/<domain>/.cache/eval/, so changing the merge does
not re-score the unchanged training stages. The scoring itself is core/scoring.py's (merge search and the int8
serving copy use the same).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from core.chat import as_messages, with_system
from core.errors import PackError
from core.layout import eval_cache, read_stage
from core.rows import EVAL_KIND, file_digest, load_rows
from core.scoring import Scorer, implicit_reward_accuracy, perplexity_from_nll, ranking_metrics
from core.stages import MODEL_STAGES
from pipeline.fingerprint import stage_config

GENERAL_TEXT = Path(__file__).parent / "assets" / "general_en.txt"


def eval_data(pack) -> dict:
    data = {}
    for key, kind in EVAL_KIND.items():
        sources = getattr(pack.eval, key)
        data[key] = load_rows(pack, sources, kind, f"eval.{key}") if sources else []
    return data


def score_model(model_dir: Path, pack, data: dict, ref_pairs: list | None, log,
                answer: bool = True) -> tuple[dict, list, list]:
    """Metrics, per-pair (chosen, rejected) log-prob sums, and greedy answers of one model (when `answer`)."""
    scorer = Scorer(model_dir)
    sp = pack.system_prompt
    metrics: dict = {}
    if data["text"]:
        nll, n = scorer.text_nll([r["text"] for r in data["text"]])
        metrics["domain_ppl"] = perplexity_from_nll(nll, n)
    if pack.eval.general_text:
        nll, n = scorer.text_nll(GENERAL_TEXT.read_text(encoding="utf-8").split("\n\n"))
        metrics["general_ppl"] = perplexity_from_nll(nll, n)
    if data["sft"]:
        nll, n = scorer.conversation_nll([with_system(r["messages"], sp) for r in data["sft"]])
        metrics["sft_loss"] = nll / max(n, 1)
    pair_sums = []
    if data["pref"]:
        prompts = [with_system(as_messages(r["prompt"], "user"), sp) for r in data["pref"]]
        chosen = scorer.completion_logps(prompts, [as_messages(r["chosen"], "assistant") for r in data["pref"]])
        rejected = scorer.completion_logps(prompts, [as_messages(r["rejected"], "assistant") for r in data["pref"]])
        metrics.update(ranking_metrics(chosen, rejected))
        pair_sums = [(c, r) for (c, _), (r, _) in zip(chosen, rejected)]
        if ref_pairs is not None:
            metrics.update(implicit_reward_accuracy(pair_sums, ref_pairs, beta=pack.pref.beta))
    answers = []
    if data["prompts"] and answer:
        log(f"  greedy answers to {len(data['prompts'])} prompts")
        answers = scorer.generate([with_system(as_messages(r["prompt"], "user"), sp) for r in data["prompts"]],
                                  pack.eval.max_new_tokens)
    return metrics, pair_sums, answers


def _eval_key(pack, ctx) -> str:
    files = {str(p): file_digest(p) for key in EVAL_KIND for s in getattr(pack.eval, key) if s.path
             for p in [pack.dir / s.path] if p.is_file()}
    files["general"] = file_digest(GENERAL_TEXT)
    blob = json.dumps({"config": stage_config(pack, "eval"), "files": files, "beta": pack.pref.beta},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(ctx) -> dict:
    pack = ctx.pack
    data = eval_data(pack)
    key = _eval_key(pack, ctx)
    cache = eval_cache(ctx.run_dir)
    cache.mkdir(parents=True, exist_ok=True)

    models, seen = {}, set()
    for stage in MODEL_STAGES:
        info = read_stage(ctx.run_dir, stage)
        if not info or not info.get("model") or info.get("disabled"):
            continue
        path = (ctx.run_dir / stage / info["model"]).resolve()
        if path in seen:
            continue
        seen.add(path)
        models[stage] = (path, info["fingerprint"])
    if "base" not in models:
        raise PackError(f"no base model in {ctx.run_dir}; run `make domain={pack.name} base` first")

    results, answers, ref_pairs = {}, {}, None
    final = list(models)[-1]
    for stage, (path, fp) in models.items():
        answer = pack.eval.answers == "all" or stage in ("base", final)
        cached = cache / f"{stage}-{fp}-{key}.json"
        entry = json.loads(cached.read_text()) if cached.is_file() else None
        if entry and (entry["answers"] or not answer or not data["prompts"]):
            ctx.log(f"{stage}: cached scores (model fingerprint {fp})")
        else:  # not scored yet, or scored without answers while it was not the final model
            ctx.log(f"{stage}: scoring {path}")
            metrics, pairs, gen = score_model(path, pack, data, None if stage == "base" else ref_pairs, ctx.log,
                                              answer)
            entry = {"metrics": metrics, "pairs": pairs, "answers": gen}
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, cached)
        if stage == "base":
            ref_pairs = entry["pairs"] or None
        results[stage] = entry["metrics"]
        answers[stage] = entry["answers"]
        ctx.log(f"{stage}: " + ", ".join(f"{k}={v:.4g}" for k, v in entry["metrics"].items()))

    (ctx.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    if data["prompts"]:
        with open(ctx.out / "answers.jsonl", "w", encoding="utf-8") as f:
            for i, row in enumerate(data["prompts"]):
                f.write(json.dumps({"prompt": row["prompt"], **{s: a[i] for s, a in answers.items() if a}},
                                   ensure_ascii=False) + "\n")
    summary: dict = {"models": results}
    if pack.eval.judge and data["prompts"]:
        from pipeline.judge import judge_run

        summary["judge"] = judge_run(pack.eval.judge, [r["prompt"] for r in data["prompts"]],
                                     answers[final], answers["base"], ctx.out / "judge.jsonl", ctx.log)
    return summary
