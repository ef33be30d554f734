"""Serving: a real vLLM server (CPU build) on a tiny model, called with the official `openai` client; the
chat-template parity check; the launcher's port, key and missing-model errors.

    .venv/bin/python -m pytest -q tests/test_serve.py
"""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_openai_client_lists_chats_streams_and_needs_the_key(vllm_server):
    import openai

    client = openai.OpenAI(base_url=vllm_server.base_url, api_key=vllm_server.api_key)
    listed = {m.id for m in client.models.list()}
    assert {vllm_server.tuned_model, vllm_server.base_model} <= listed

    messages = [{"role": "user", "content": "What is a bond?"}]
    reply = client.chat.completions.create(model=vllm_server.base_model, messages=messages, max_tokens=8,
                                           temperature=0)
    assert reply.choices[0].message.content
    assert 0 < reply.usage.completion_tokens <= 8

    stream = client.chat.completions.create(model=vllm_server.tuned_model, messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # arrived as several chunks, not one body
    # Greedy decoding of the same model and prompt: streamed text equals the non-streamed one.
    assert "".join(pieces) == reply.choices[0].message.content

    anonymous = openai.OpenAI(base_url=vllm_server.base_url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        anonymous.models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model=vllm_server.tuned_model, messages=messages, max_tokens=4)
