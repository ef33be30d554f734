"""The API key in front of every vLLM route (serve/auth.py): the real vLLM server of conftest, plain HTTP to
127.0.0.1; and the middleware driven directly as an ASGI app for the chunked-body and websocket cases.

    .venv/bin/python -m pytest -q tests/test_auth.py
"""
from __future__ import annotations

import asyncio
import http.client
import json
from urllib.parse import urlsplit

import pytest


def call(url: str, method: str, path: str, body=None, headers: list[tuple[str, str]] = ()) -> tuple[int, dict]:
    """One request; headers as a list so that a name may come twice."""
    parts = urlsplit(url)
    con = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        con.putrequest(method, path)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        for name, value in headers:
            con.putheader(name, value)
        if data is not None:
            con.putheader("Content-Type", "application/json")
            con.putheader("Content-Length", str(len(data)))
        con.endheaders(data)
        r = con.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, {"raw": raw[:200]}
    finally:
        con.close()


@pytest.mark.slow
def test_every_vllm_route_needs_the_key(vllm_server):
    root = vllm_server.base_url.removesuffix("/v1")
    model = vllm_server.tuned_model
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    routes = [
        ("POST", "/invocations", chat),
        ("POST", "/tokenize", {"model": model, "prompt": "hello"}),
        ("POST", "/detokenize", {"model": model, "tokens": [1, 2, 3]}),
        ("POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/responses", {"model": model, "input": "hi", "max_output_tokens": 2}),
        ("POST", "/pooling", {"model": model, "input": "hi"}),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
    ]
    good = [("Authorization", f"Bearer {vllm_server.api_key}")]
    for method, path, body in routes:
        status, reply = call(root, method, path, body)
        assert status == 401, (path, status, reply)
        assert reply["error"]["code"] == "invalid_api_key"
        status, reply = call(root, method, path, body, [("Authorization", "Bearer wrong")])
        assert status == 401, (path, status)
        status, reply = call(root, method, path, body, good)
        # /pooling: a generative model has no pooling task, so vLLM itself refuses it, past the key
        assert status != 401 and (status == 200 or path == "/pooling"), (path, status, reply)

    status, _ = call(root, "POST", "/tokenize", routes[1][2], [("Authorization", f"bearer {vllm_server.api_key}")])
    assert status == 200  # the scheme in any case, as RFC 7235 says
    twice = [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {vllm_server.api_key}")]
    assert call(root, "POST", "/tokenize", routes[1][2], twice)[0] == 401  # the first header is the one read
    assert call(root, "GET", "/health")[0] == 200 and call(root, "GET", "/ping")[0] == 200

    big = json.dumps({**chat, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}).encode()
    status, reply = call(root, "POST", "/v1/chat/completions", big, good)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    assert call(root, "POST", "/v1/chat/completions", big)[0] == 401  # no key: refused before the size


def run_asgi(middleware, scope: dict, messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drive the middleware once; returns (what it sent, what the inner app received)."""
    sent, inner = [], []

    async def app(scope, receive, send):
        inner.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(app)(scope, receive, send))
    return sent, inner


def test_chunked_oversized_body_gets_413_and_a_small_one_passes_whole(monkeypatch):
    from serve.auth import ApiKeyMiddleware

    monkeypatch.setenv("VLLM_API_KEY", "sk-k")
    monkeypatch.setenv("API_MAX_REQUEST_BYTES", "10")
    scope = {"type": "http", "method": "POST", "path": "/tokenize", "root_path": "",
             "headers": [(b"authorization", b"Bearer sk-k")]}  # no content-length: a chunked upload
    sent, inner = run_asgi(ApiKeyMiddleware, scope, [{"type": "http.request", "body": b"123456", "more_body": True},
                                                     {"type": "http.request", "body": b"789012", "more_body": False}])
    assert sent[0]["status"] == 413 and inner == []
    sent, inner = run_asgi(ApiKeyMiddleware, scope, [{"type": "http.request", "body": b"1234", "more_body": True},
                                                     {"type": "http.request", "body": b"5678", "more_body": False}])
    assert sent[0]["status"] == 200 and inner[0]["body"] == b"12345678"


def test_no_configured_key_refuses_everything_but_health(monkeypatch):
    from serve.auth import ApiKeyMiddleware

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv("API_KEY", raising=False)
    scope = {"type": "http", "method": "GET", "path": "/v1/models", "root_path": "",
             "headers": [(b"authorization", b"Bearer ")]}
    assert run_asgi(ApiKeyMiddleware, scope, [])[0][0]["status"] == 401
    assert run_asgi(ApiKeyMiddleware, {**scope, "path": "/health"}, [])[0][0]["status"] == 200
    ws = {**scope, "type": "websocket", "path": "/v1/realtime"}
    sent, _ = run_asgi(ApiKeyMiddleware, ws, [{"type": "websocket.connect"}])
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "invalid API key"}]


def test_launcher_always_adds_the_key_middleware_outermost():
    from pathlib import Path

    from core.schema import ServeStage
    from serve.engine import vllm_command, vllm_env

    for cfg in (ServeStage(), ServeStage(crisis_guard=True)):
        cmd = vllm_command("py", Path("/m"), ["x"], "127.0.0.1", 8000, cfg, cuda=False)
        flags = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--middleware"]
        assert flags[-1] == "serve.auth.ApiKeyMiddleware"  # Starlette: the last one added runs first
    assert vllm_env("k", ServeStage(max_request_bytes=123), cuda=False)["API_MAX_REQUEST_BYTES"] == "123"
