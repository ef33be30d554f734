"""One API-key check in front of every route of vLLM's OpenAI server (ASGI middleware).

vLLM's own `--api-key` guards only paths under /v1, /v2, /inference and /cohere: `POST /invocations` (a full
chat completion), /tokenize, /detokenize, /pooling, /metrics ... answer without a key. This middleware, loaded
with `--middleware serve.auth.ApiKeyMiddleware` (serve/launch.py adds it always, as the LAST --middleware:
Starlette wraps the last one added outermost, so it runs before the crisis guard reads any body), asks for
`Authorization: Bearer <key>` on every route except GET/HEAD /health and /ping (liveness probes carry no key).

As vLLM does: the first Authorization header is the one read, the scheme is matched case-insensitively.
The key is compared in constant time. With the key right, a body longer than the limit gets 413 before
any of vLLM reads it. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Environment (set by serve/launch.py vllm_env): VLLM_API_KEY (the key; with none, every guarded route is
refused), API_MAX_REQUEST_BYTES (serve.max_request_bytes, default 8 MiB).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

OPEN_ROUTES = {"/health", "/ping"}
DEFAULT_MAX_BYTES = 8 * 1024 * 1024


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of the first Authorization header when its scheme is Bearer (any case), else None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def key_matches(token: str | None, key: str) -> bool:
    # compare_digest on equal-length digests: its time depends neither on where the first differing byte is
    # nor on the key's length
    return bool(key) and token is not None and hmac.compare_digest(hashlib.sha256(token.encode()).digest(),
                                                                   hashlib.sha256(key.encode()).digest())


class BodyTooLarge(Exception):
    """A request body longer than the limit (by its Content-Length, or counted while reading)."""


async def read_body(scope, receive, limit: int) -> bytes | None:
    """The whole request body (a chunked request has no Content-Length, so it is counted while read), or None
    when the client went away; BodyTooLarge as soon as it passes `limit`, before anything parses it."""
    length = next((v for k, v in scope.get("headers") or [] if k.lower() == b"content-length"), None)
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise BodyTooLarge
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            raise BodyTooLarge
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive channel for the app behind: the body once, then the real channel. That one blocks until the
    client disconnects, as vLLM's disconnect listener expects; giving the body again would spin the listener
    and hang every request passed on."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive_again


async def _error(send, status: int, message: str, kind: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="api"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app):
        self.app = app
        self.key = os.environ.get("VLLM_API_KEY") or os.environ.get("API_KEY", "")
        self.max_bytes = int(os.environ.get("API_MAX_REQUEST_BYTES") or DEFAULT_MAX_BYTES)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and path in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        if not key_matches(bearer_token(scope["headers"]), self.key):
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                return await send({"type": "websocket.close", "code": 1008, "reason": "invalid API key"})
            return await _error(send, 401, "Missing or invalid API key: send the header "
                                "'Authorization: Bearer <key>'.", "invalid_request_error", "invalid_api_key")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)

        too_big = ("Request body larger than this server's limit of "
                   f"{self.max_bytes} bytes (serve.max_request_bytes).")
        try:
            body = await read_body(scope, receive, self.max_bytes)
        except BodyTooLarge:
            return await _error(send, 413, too_big, "invalid_request_error", "request_too_large")
        if body is not None:
            return await self.app(scope, replay(body, receive), send)


# ------------------------------------------------------------------ beyond loopback: who may connect


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost reach this machine only; anything else (0.0.0.0, a LAN address) does not."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def parse_users(text: str, where: str) -> dict[str, str]:
    """`name:password` entries, one a line in a file or comma-separated in ARENA_USERS; # starts a comment."""
    from core.errors import PackError

    users, problems = {}, []
    lines = text.split(",") if where == "ARENA_USERS" else text.splitlines()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, password = line.partition(":")
        if not sep or not name.strip() or not password:
            problems.append(f"{where} entry {n}: expected name:password, got {line.split(':')[0]!r}"
                            f"{':…' if sep else ''}")
        elif name.strip() in users:
            problems.append(f"{where} entry {n}: user {name.strip()!r} given twice")
        else:
            users[name.strip()] = password
    if problems:
        raise PackError(problems, f"arena users in {where} have problems")
    return users


def arena_users(serve_cfg, serve_dir: Path, pack_dir: Path) -> tuple[dict[str, str], str]:
    """The arena's logins and where they came from: ARENA_USERS="ada:pw,bob:pw2" if set, else the file
    serve.arena_users_file (relative to the pack folder), else runs/<domain>/serve/arena_users if it exists;
    ({}, "") when none is given."""
    from core.errors import PackError, show_path

    env = os.environ.get("ARENA_USERS", "").strip()
    if env:
        return parse_users(env, "ARENA_USERS"), "ARENA_USERS"
    if serve_cfg.arena_users_file:
        path = Path(pack_dir) / serve_cfg.arena_users_file
        if not path.is_file():
            raise PackError(f"serve.arena_users_file: {show_path(path)} does not exist; write `name:password` "
                            "lines there, or set ARENA_USERS='name:password,...'")
    else:
        path = Path(serve_dir) / "arena_users"
        if not path.is_file():
            return {}, ""
    users = parse_users(path.read_text(encoding="utf-8"), show_path(path))
    if not users:
        raise PackError(f"{show_path(path)} lists no user; write `name:password` lines")
    return users, show_path(path)
