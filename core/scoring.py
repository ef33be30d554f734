"""Held-out scoring in one copy: log-likelihoods of text, conversations and preference pairs under one model.

The eval stage scores every stage's model with it, `merge.search: t` scores its candidates with it, and the
int8 serving copy measures its perplexity before and after with it, so the three agree. Conventions:
- text is scored on every token after the first, in windows of MAX_TOKENS;
- a conversation is scored on its assistant tokens only (with their end-of-turn token), as SFT trains;
- a completion is scored on every token after its prompt's generation prompt;
- everything in float32 (on the GPU when there is one), batched shortest first with right padding.
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


def plain_head_ok(config) -> bool:
    """Whether a model's logits are its LM head applied to the last hidden state and nothing else (no soft-capping
    or scaling), so that the head may be applied to chosen positions only (here and in pipeline/fastpath.py)."""
    text = config.get_text_config()
    scaled = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return not any(getattr(text, name, None) is not None for name in scaled)


class Scorer:
    """Log-likelihoods from one causal LM, batched, with the chat template of its own folder.

    Sequences are scored shortest first in batches of at most `batch_tokens` padded tokens (sorting keeps the
    padding small), and the LM head runs on the target positions only, scored with torch's fused cross-entropy
    (the full [batch, tokens, vocabulary] log-softmax was most of the memory traffic). Results come back in the
    order given; a sequence scores the same alone or in any batch (right padding, causal attention)."""

    def __init__(self, model_dir: Path, batch_tokens: int = 8192):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.batch_tokens = batch_tokens
        self.plain_head = plain_head_ok(self.model.config)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped shortest first, each group's rows x longest row <= batch_tokens (one row at least)."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        batches, current = [], []
        for i in order:
            if current and (len(current) + 1) * lengths[i] > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        return batches + [current] if current else batches

    def _target_logp(self, ids, attn, keep):
        """log p of each target token (keep[:, t] marks token t + 1 as a target), flattened in row order."""
        torch = self.torch
        labels = ids[:, 1:][keep]
        if self.plain_head:
            hidden = self.model.base_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        else:
            logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1][keep].float()
        return -torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    def _nll(self, sequences: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        """(sum of -log p, count) over the target positions of each (ids, mask) sequence."""
        torch = self.torch
        out: list = [None] * len(sequences)
        for batch in self._batches([len(ids) for ids, _ in sequences]):
            width = max(len(sequences[i][0]) for i in batch)
            ids = torch.full((len(batch), width), self.tok.pad_token_id)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            target = torch.zeros((len(batch), width), dtype=torch.bool)
            for j, i in enumerate(batch):
                seq, mask = sequences[i]
                ids[j, :len(seq)] = torch.tensor(seq)
                attn[j, :len(seq)] = 1
                target[j, :len(seq)] = torch.tensor(mask, dtype=torch.bool)
            keep = target[:, 1:]
            with torch.no_grad():
                logp = self._target_logp(ids.to(self.device), attn.to(self.device), keep.to(self.device)).cpu()
            rows = keep.nonzero()[:, 0]
            sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, logp.double())
            counts = keep.sum(1)
            for j, i in enumerate(batch):
                out[i] = (float(-sums[j]), int(counts[j]))
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
        """Greedy answers, in the order given; prompts of similar length are generated together, as many per
        batch as batch_tokens allows for prompt + answer (decoding a small model is bound by reading the weights,
        so one step for 32 rows costs little more than for 8)."""
        torch = self.torch
        texts = [self.tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        lengths = [len(self.tok(t, add_special_tokens=False)["input_ids"]) + max_new_tokens for t in texts]
        answers: list = [None] * len(prompts)
        self.tok.padding_side = "left"
        try:
            for batch in self._batches(lengths):
                enc = self.tok([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                with torch.no_grad():
                    gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                              pad_token_id=self.tok.pad_token_id)
                for i, row in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
                    answers[i] = self.tok.decode(row, skip_special_tokens=True).strip()
        finally:
            self.tok.padding_side = "right"
        return answers
