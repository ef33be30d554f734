"""Held-out scoring in one copy: log-likelihoods of text, conversations and preference pairs under one model.

The eval stage scores every stage's model with it, `merge.search: t` scores its candidates with it, and the
int8 serving copy measures its perplexity before and after with it, so the three agree. Conventions:
- text is scored on every token after the first, in windows of MAX_TOKENS;
- a conversation is scored on its assistant tokens only (with their end-of-turn token), as SFT trains;
- a completion is scored on every token after its prompt's generation prompt;
- everything in float32 (on the GPU when there is one), batched with right padding.
"""
from __future__ import annotations

import math
from pathlib import Path

from core.chat import completion_mask, tokenize_conversation

MAX_TOKENS = 1024  # longest sequence scored; longer texts are cut into windows of this size


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


class Scorer:
    """Log-likelihoods from one causal LM, batched, with the chat template of its own folder."""

    def __init__(self, model_dir: Path, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()
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
                logits = self.model(input_ids=ids.to(self.device),
                                    attention_mask=attn.to(self.device)).logits[:, :-1].float().cpu()
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

    def conversation_nll(self, conversations: list[list[dict]]) -> tuple[float, int]:
        """(sum of -log p, count) over the assistant tokens of each conversation (as SFT trains them)."""
        seqs = []
        for messages in conversations:
            enc = tokenize_conversation(self.tok, messages)
            seqs.append((enc["input_ids"][:MAX_TOKENS], enc["assistant_masks"][:MAX_TOKENS]))
        scores = self._nll(seqs)
        return sum(s for s, _ in scores), sum(n for _, n in scores)

    def completion_logps(self, prompts: list[list[dict]], completions: list[list[dict]]) -> list[tuple[float, int]]:
        """(sum log p, n tokens) of each completion (assistant messages) after its prompt messages."""
        seqs = []
        for prompt, completion in zip(prompts, completions):
            ids, mask = completion_mask(self.tok, prompt, completion)
            seqs.append((ids[:MAX_TOKENS], mask[:MAX_TOKENS]))
        return [(-s, n) for s, n in self._nll(seqs)]

    def generate(self, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
        torch = self.torch
        self.tok.padding_side = "left"
        answers = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [self.tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + self.batch_size]]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                answers.append(self.tok.decode(row, skip_special_tokens=True).strip())
        self.tok.padding_side = "right"
        return answers
