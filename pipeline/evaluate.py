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
not re-score the unchanged training stages.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from pipeline.data import EVAL_KIND, file_digest, load_rows
from pipeline.pack import PackError
from pipeline.runner import read_stage, stage_config

MODEL_STAGES = ("base", "cpt", "sft", "pref", "merge")
GENERAL_TEXT = Path(__file__).parent / "assets" / "general_en.txt"
MAX_TOKENS = 1024  # longest sequence scored; longer texts are cut into windows of this size


# ----------------------------------------------------------------------------------- pure metrics


def perplexity_from_nll(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / max(n_tokens, 1))


def ranking_metrics(chosen: list[tuple[float, int]], rejected: list[tuple[float, int]]) -> dict:
    """Accuracy and mean margin of length-normalised log-likelihoods, from (sum logp, n tokens) pairs."""
    margins = [c / max(cn, 1) - r / max(rn, 1) for (c, cn), (r, rn) in zip(chosen, rejected)]
    return {
        "pref_accuracy": sum(m > 0 for m in margins) / len(margins),
        "pref_margin": sum(margins) / len(margins),
    }


def implicit_reward_accuracy(policy: list[tuple[float, float]], reference: list[tuple[float, float]],
                             beta: float = 0.1) -> dict:
    """DPO's implicit reward r = beta * (log pi(y|x) - log ref(y|x)); (chosen, rejected) sums per pair."""
    diffs = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, reference)]
    return {"reward_accuracy": sum(d > 0 for d in diffs) / len(diffs), "reward_margin": sum(diffs) / len(diffs)}


# ------------------------------------------------------------------------------------ model scoring


class Scorer:
    """Log-likelihoods from one causal LM, batched, with the chat template of its own folder."""

    def __init__(self, model_dir: Path, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.batch_size = batch_size

    def _nll(self, sequences: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """(sum of -log p, count) over the target positions of each (ids, mask) sequence."""
        torch = self.torch
        out = []
        for i in range(0, len(sequences), self.batch_size):
            batch = sequences[i:i + self.batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), self.tok.pad_token_id)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            target = torch.zeros((len(batch), width), dtype=torch.bool)
            for j, (seq, mask) in enumerate(batch):
                ids[j, :len(seq)] = torch.tensor(seq)
                attn[j, :len(seq)] = 1
                target[j, :len(seq)] = torch.tensor(mask, dtype=torch.bool)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            keep = target[:, 1:]
            for j in range(len(batch)):
                out.append((float(-(logp[j] * keep[j]).sum()), int(keep[j].sum())))
        return out

    def text_nll(self, texts: list[str]) -> tuple[float, int]:
        seqs = []
        for text in texts:
            ids = self.tok(text, add_special_tokens=True)["input_ids"]
            for s in range(0, len(ids), MAX_TOKENS):
                window = ids[s:s + MAX_TOKENS]
                if len(window) > 1:
                    seqs.append((window, [0] + [1] * (len(window) - 1)))
        scores = self._nll(seqs)
        return sum(s for s, _ in scores), sum(n for _, n in scores)

    def render(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        return self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=True)["input_ids"]

    def assistant_sequence(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a mask that is 1 on the assistant turns only."""
        ids = self.render(messages)
        mask = [0] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.render(messages[:k], generation_prompt=True))
            end = len(self.render(messages[:k + 1]))
            mask[start:end] = [1] * (end - start)
        return ids[:MAX_TOKENS], mask[:MAX_TOKENS]

    def conversation_nll(self, conversations: list[list[dict]]) -> tuple[float, int]:
        scores = self._nll([self.assistant_sequence(c) for c in conversations])
        return sum(s for s, _ in scores), sum(n for _, n in scores)

    def completion_logps(self, prompts: list[list[dict]], completions: list[list[dict]]) -> list[tuple[float, int]]:
        """(sum log p, n tokens) of each completion (assistant messages) after its prompt messages."""
        seqs = []
        for prompt, completion in zip(prompts, completions):
            ids = self.render(prompt + completion)
            start = len(self.render(prompt, generation_prompt=True))
            seqs.append((ids[:MAX_TOKENS], ([0] * start + [1] * (len(ids) - start))[:MAX_TOKENS]))
        return [(-s, n) for s, n in self._nll(seqs)]

    def generate(self, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        torch = self.torch
        self.tok.padding_side = "left"
        answers = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [self.tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + self.batch_size]]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                answers.append(self.tok.decode(row, skip_special_tokens=True).strip())
        self.tok.padding_side = "right"
        return answers


def as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


# ---------------------------------------------------------------------------------------- the stage


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
    cache = ctx.run_dir / ".cache" / "eval"
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
