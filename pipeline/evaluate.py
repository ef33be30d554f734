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
- accuracy (± its standard error) on the pack's multiple-choice benchmark (eval.benchmarks, default
  data/eval/mc.jsonl) and on any lm-evaluation-harness task the pack names (eval.lm_eval_tasks), run by
  lm-evaluation-harness itself over a task YAML written here (local json files, so it runs offline);
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
from core.rows import EVAL_KIND, file_digest, load_rows, load_source
from core.scoring import Scorer, implicit_reward_accuracy, perplexity_from_nll, ranking_metrics
from core.stages import MODEL_STAGES
from pipeline.fingerprint import stage_config

GENERAL_TEXT = Path(__file__).parent / "assets" / "general_en.txt"
BENCH_TASK = "domain_mc"  # the lm-eval task name of the pack's own benchmark
# Zero-shot, the usual MMLU-style prompt; each choice is scored by its log-likelihood after "Answer:".
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {files}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


def benchmark_files(pack) -> list[Path]:
    """The pack's multiple-choice files: eval.benchmarks, or by default data/eval/mc.jsonl where it ships one."""
    sources = pack.benchmark_sources()
    problems = []  # every row checked, file:line, before lm-eval sees it
    for src in sources:
        if not src.path or not src.path.endswith(".jsonl"):
            problems.append(f"eval.benchmarks: {src.path or src.hub!r} must be a local .jsonl file "
                            "(lm-evaluation-harness reads it offline)")
            continue
        problems += load_source(src, pack.dir, "mc")[1]
    if problems:
        raise PackError(problems, "eval.benchmarks has problems")
    return [pack.dir / s.path for s in sources]


def write_tasks(pack, task_dir: Path, cache_dir: Path) -> tuple[list[str], object]:
    """The lm-eval task names to run, the pack's benchmark (a YAML written into task_dir) and eval.lm_eval_tasks,
    each checked to exist before any model loads (PackError naming the unknown ones); and the lm-eval
    TaskManager that finds them (None when there are none)."""
    tasks = []
    files = benchmark_files(pack)
    if files:
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / f"{BENCH_TASK}.yaml").write_text(TASK_YAML.format(
            task=BENCH_TASK, files=json.dumps([str(f.resolve()) for f in files]), cache=json.dumps(str(cache_dir))))
        tasks.append(BENCH_TASK)
    if not files and not pack.eval.lm_eval_tasks:
        return [], None
    from lm_eval.tasks import TaskManager

    # lm-eval's own tasks are indexed (~30 s, thousands of YAMLs) only when the pack names some
    manager = TaskManager(include_path=str(task_dir) if files else None,
                          include_defaults=bool(pack.eval.lm_eval_tasks))
    if pack.eval.lm_eval_tasks:
        known = set(manager.all_tasks)
        unknown = [t for t in pack.eval.lm_eval_tasks if t not in known]
        if unknown:
            import difflib

            hints = [f"{t!r}" + (f" (did you mean {', '.join(difflib.get_close_matches(t, known, 2))}?)"
                                 if difflib.get_close_matches(t, known, 2) else "") for t in unknown]
            raise PackError(f"eval.lm_eval_tasks: no lm-evaluation-harness task named {', '.join(hints)}; "
                            "`lm_eval ls tasks` lists them")
        tasks += pack.eval.lm_eval_tasks
    return tasks, manager


def run_benchmarks(scorer: Scorer, tasks: list[str], manager) -> dict:
    """benchmark_acc/_stderr/_norm for the pack's benchmark, lm_eval/<task>_acc/_stderr for the others.
    lm-eval's HF model wraps the model the scorer has loaded (float32), rather than loading it again."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=scorer.model, tokenizer=scorer.tok, batch_size=32)
    metrics = {}
    for task in tasks:  # one at a time, so the task that cannot load is the one named
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager)
        except Exception as e:  # a dataset not in the offline cache, a broken task YAML
            raise PackError(f"lm-evaluation-harness task {task!r} could not run: {type(e).__name__}: {e}") from e
        r = out["results"][task]
        prefix = "benchmark" if task == BENCH_TASK else f"lm_eval/{task}"
        metrics[f"{prefix}_acc"] = r["acc,none"]
        metrics[f"{prefix}_acc_stderr"] = r["acc_stderr,none"]
        if "acc_norm,none" in r:
            metrics[f"{prefix}_acc_norm"] = r["acc_norm,none"]
    return metrics


def eval_data(pack) -> dict:
    data = {}
    for key, kind in EVAL_KIND.items():
        sources = getattr(pack.eval, key)
        data[key] = load_rows(pack, sources, kind, f"eval.{key}") if sources else []
    return data


def score_model(scorer: Scorer, pack, data: dict, ref_pairs: list | None, log,
                answer: bool = True) -> tuple[dict, list, list]:
    """Metrics, per-pair (chosen, rejected) log-prob sums, and greedy answers of one model (when `answer`)."""
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
    files.update({str(p): file_digest(p) for p in benchmark_files(pack)})
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
    task_dir = cache / "lm_eval_tasks"
    tasks, manager = write_tasks(pack, task_dir, cache / "datasets")

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
        # greedy answers and benchmarks (minutes a model on a CPU) for the base and the final model, as the
        # report, judge and arena compare them; eval.answers: all asks for every stage's
        answer = pack.eval.answers == "all" or stage in ("base", final)
        cached = cache / f"{stage}-{fp}-{key}.json"
        entry = json.loads(cached.read_text()) if cached.is_file() else None
        benched = not (tasks and answer) or (entry and any(k.startswith(("benchmark", "lm_eval/"))
                                                           for k in entry["metrics"]))
        if entry and (entry["answers"] or not answer or not data["prompts"]) and benched:
            ctx.log(f"{stage}: cached scores (model fingerprint {fp})")
        else:  # not scored yet, or scored without answers while it was not the final model
            ctx.log(f"{stage}: scoring {path}")
            scorer = Scorer(path)
            metrics, pairs, gen = score_model(scorer, pack, data, None if stage == "base" else ref_pairs, ctx.log,
                                              answer)
            if tasks and answer:
                ctx.log(f"  lm-evaluation-harness: {', '.join(tasks)}")
                metrics.update(run_benchmarks(scorer, tasks, manager))
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
