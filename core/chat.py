"""Chat rendering in one copy: the system prompt, message shapes, and which tokens are the assistant's.

Training (sft, pref), held-out scoring, the merge checks, the int8 calibration, the serving parity check and
the arena all build conversations through these functions, so what a model is trained on, scored on and
served with is rendered the same way. Tokenizer-taking functions expect a transformers tokenizer (imported by
the caller; nothing here imports torch or transformers).
"""
from __future__ import annotations

from typing import Any

from core.errors import PackError


def with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    """The pack's system prompt first, unless the conversation brings its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def as_messages(value: str | list[dict], role: str) -> list[dict]:
    """A preference row's prompt or answer (a string or a message list) as messages."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def content_text(content: Any) -> str:
    """A message's content as text: OpenAI content parts ([{type: text, text}, ...]) joined, None as ''."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation through the tokenizer's own chat template."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                              return_dict=True)["input_ids"])


def tokenize_conversation(tokenizer, messages: list[dict]) -> dict:
    """input_ids of the whole conversation and assistant_masks: 1 on assistant answers (+ their end of turn).

    Each assistant turn is located by rendering the conversation up to it (with the generation prompt) and up
    to its end: the span between is the answer and its end-of-turn token. Templates without `{% generation %}`
    markers (SmolLM2's ChatML) give TRL no assistant spans, hence this."""
    ids = render(tokenizer, messages)
    mask = [0] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:k], generation_prompt=True))
        end_ids = render(tokenizer, messages[:k + 1])
        if ids[:len(end_ids)] != end_ids:
            raise PackError("the model's chat template renders a conversation differently from its own prefix, so "
                            "the assistant's tokens cannot be located; set sft.assistant_only_loss=false or use "
                            "base.chat_template: chatml")
        mask[start:len(end_ids)] = [1] * (len(end_ids) - start)
    return {"input_ids": ids, "assistant_masks": mask}


def completion_mask(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + completion with the mask 1 on every token after the generation prompt."""
    ids = render(tokenizer, prompt + completion)
    start = len(render(tokenizer, prompt, generation_prompt=True))
    return ids, [0] * start + [1] * (len(ids) - start)
