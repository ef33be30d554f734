"""The crisis guard in front of vLLM: an ASGI middleware (`--middleware serve.crisis_middleware.CrisisMiddleware`,
added by the launcher when the pack sets `serve.crisis_guard: true`).

Every route that runs the model (ROUTES) is inspected; a risky request is answered in that route's own shape,
streamed or not, without reaching the model. The decision is serve/crisis.py's Guard.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid

from serve.auth import BodyTooLarge, bearer_token, key_matches, read_body, replay
from serve.crisis import Guard, _content_text, crisis_text, last_user_text
from serve.crisis_model import learned_model

# ------------------------------------------------------------------------------------ ASGI middleware

# vLLM's routes that run the model, by normalised path (lower case, no trailing slash) -> request shape.
ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/chat/completions/batch": "chat_batch",
    "/v1/completions": "completion",
    "/v1/responses": "responses",
    "/v1/messages": "messages",          # Anthropic Messages API
    "/invocations": "invocations",       # SageMaker: a chat or a completion request, told apart by its fields
}
# vLLM's AuthenticationMiddleware asks for the key on these prefixes only (so not on /invocations)
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")
MAX_BODY = 10 * 1024 * 1024


def request_texts(shape: str, request: dict) -> tuple[str, list[str]]:
    """(the reply shape, the user texts to check) of a parsed request body."""
    if shape == "invocations":
        shape = "chat" if "messages" in request else "completion"
    if shape in ("chat", "messages"):
        return shape, [last_user_text(request.get("messages"))]
    if shape == "chat_batch":
        return shape, [last_user_text(c) for c in request.get("messages") or [] if isinstance(c, list)]
    if shape == "completion":
        prompt = request.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
        return shape, [p for p in prompts if isinstance(p, str)]  # token-id prompts carry no text to read
    if shape == "responses":
        given = request.get("input")
        if isinstance(given, str):
            return shape, [given]
        users = [i.get("content") for i in given or [] if isinstance(i, dict) and i.get("role") == "user"]
        return shape, [_content_text(users[-1])] if users else []
    return shape, []


class CrisisMiddleware:
    """ASGI middleware for vLLM's OpenAI server: a risky request to any route in ROUTES gets the fixed reply.

    Settings from the environment (guard_env): CRISIS_DETECTOR, CRISIS_GUARD_*, CRISIS_LOCALE, CRISIS_AUDIT_LOG.
    A request vLLM would refuse with 401 (API_KEY set, path under GUARDED_PREFIX, no valid bearer key) passes
    through unread, so vLLM still answers it; the key is compared as vLLM does, in constant time.
    """

    def __init__(self, app):
        self.app = app
        self.guard = Guard.from_env()
        self.locale = os.environ.get("CRISIS_LOCALE", "US")
        self.key = os.environ.get("API_KEY") or os.environ.get("VLLM_API_KEY") or ""
        learned_model()  # fail at start-up, not on the first request, when the weights are missing

    def authorised(self, scope) -> bool:
        # the key as vLLM checks it (the first Authorization header, any case of "Bearer"), in constant time
        return not self.key or key_matches(bearer_token(scope.get("headers") or []), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        shape = ROUTES.get(re.sub("/+", "/", path).rstrip("/").lower())
        if shape is None or (path.startswith(GUARDED_PREFIX) and not self.authorised(scope)):
            return await self.app(scope, receive, send)

        try:
            body = await read_body(scope, receive, MAX_BODY)
        except BodyTooLarge:
            return await _too_large(send)
        if body is None:  # the client went away
            return
        passed_on = replay(body, receive)

        try:
            request = json.loads(body)
            reply_shape, texts = request_texts(shape, request)
        except (ValueError, AttributeError, TypeError):
            return await self.app(scope, passed_on, send)  # not a JSON object: vLLM answers with its 400
        given = next((v for k, v in scope.get("headers") or [] if k.lower() == b"x-request-id"), b"")  # the first
        request_id = given.decode("latin-1")[:128] or uuid.uuid4().hex
        route = "/" + path.strip("/")
        if self.guard.detector != "learned":  # an HTTP call or a SmolLM2 pass: off the event loop (it serves streams)
            decision = await asyncio.to_thread(self.guard.check, texts, route, request_id)
        else:
            decision = self.guard.check(texts, route, request_id)
        if not decision.risk:
            return await self.app(scope, passed_on, send)
        payload, content_type = fixed_response(reply_shape, request, crisis_text(self.locale), max(1, len(texts)))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()),
                                (b"x-crisis-guard", b"1"), (b"x-request-id", request_id.encode("latin-1"))]})
        await send({"type": "http.response.body", "body": payload})


async def _too_large(send) -> None:
    payload = json.dumps({"error": {"message": f"request body over {MAX_BODY // 2**20} MiB",
                                    "type": "RequestEntityTooLarge", "param": None, "code": 413}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _sse(events: list, named: bool = False) -> bytes:
    """Server-sent events: OpenAI chat and completions end with [DONE]; Responses and Anthropic name each event."""
    if named:
        return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


def fixed_response(shape: str, request: dict, reply: str, n: int) -> tuple[bytes, bytes]:
    """The fixed reply as the route itself would answer: (body, content type). `n`: choices (one per prompt
    or conversation of a batch, each answered with the crisis text)."""
    created, model, stream = int(time.time()), request.get("model") or "", bool(request.get("stream"))
    ident = uuid.uuid4().hex[:24]
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if shape in ("chat", "chat_batch"):
        count = n if shape == "chat_batch" else 1
        if stream and shape == "chat":
            head = {"id": f"chatcmpl-{ident}", "object": "chat.completion.chunk", "created": created, "model": model}
            deltas = [({"role": "assistant", "content": ""}, None), ({"content": reply}, None), ({}, "stop")]
            return _sse([{**head, "choices": [{"index": 0, "delta": d, "finish_reason": f}]}
                         for d, f in deltas]), b"text/event-stream"
        choices = [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}
                   for i in range(count)]
        return json.dumps({"id": f"chatcmpl-{ident}", "object": "chat.completion", "created": created,
                           "model": model, "choices": choices, "usage": zero}).encode(), b"application/json"
    if shape == "completion":
        head = {"id": f"cmpl-{ident}", "object": "text_completion", "created": created, "model": model}
        if stream:
            events = [{**head, "choices": [{"index": i, "text": reply, "logprobs": None, "finish_reason": None}]}
                      for i in range(n)]
            events += [{**head, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}]}
                       for i in range(n)]
            return _sse(events), b"text/event-stream"
        choices = [{"index": i, "text": reply, "logprobs": None, "finish_reason": "stop"} for i in range(n)]
        return json.dumps({**head, "choices": choices, "usage": zero}).encode(), b"application/json"
    if shape == "responses":
        part = {"type": "output_text", "text": reply, "annotations": []}
        item = {"id": f"msg_{ident}", "type": "message", "status": "completed", "role": "assistant",
                "content": [part]}
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        done = {"id": f"resp_{ident}", "object": "response", "created_at": created, "model": model,
                "status": "completed", "output": [item], "parallel_tool_calls": False, "tool_choice": "none",
                "tools": [], "usage": usage}
        if not stream:
            return json.dumps(done).encode(), b"application/json"
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        empty_item = {**item, "status": "in_progress", "content": []}
        events = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {"type": "response.output_item.added", "output_index": 0, "item": empty_item},
            {"type": "response.content_part.added", "item_id": item["id"], "output_index": 0, "content_index": 0,
             "part": {**part, "text": ""}},
            {"type": "response.output_text.delta", "item_id": item["id"], "output_index": 0, "content_index": 0,
             "delta": reply, "logprobs": []},
            {"type": "response.output_text.done", "item_id": item["id"], "output_index": 0, "content_index": 0,
             "text": reply, "logprobs": []},
            {"type": "response.content_part.done", "item_id": item["id"], "output_index": 0, "content_index": 0,
             "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": "response.completed", "response": done},
        ]
        return _sse([{**e, "sequence_number": i} for i, e in enumerate(events)], named=True), b"text/event-stream"
    # Anthropic Messages API
    message = {"id": f"msg_{ident}", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 0, "output_tokens": 0}}
    if not stream:
        return json.dumps(message).encode(), b"application/json"
    events = [
        {"type": "message_start", "message": {**message, "content": [], "stop_reason": None}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": reply}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 0}},
        {"type": "message_stop"},
    ]
    return _sse(events, named=True), b"text/event-stream"
