"""The crisis guard fires on risk messages and stays quiet on ordinary ones, in text and over HTTP."""
from __future__ import annotations

import json

import pytest
from conftest import REPO

from serve.crisis import CrisisMiddleware, crisis_reply, crisis_text, shows_risk

EXAMPLES = REPO / "domains" / "counseling" / "data" / "crisis_examples.jsonl"


def examples():
    return [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]


def test_guard_on_the_counseling_examples():
    rows = examples()
    assert sum(r["risk"] for r in rows) >= 20 and sum(not r["risk"] for r in rows) >= 20
    missed = [r["text"] for r in rows if r["risk"] and not shows_risk(r["text"])]
    false_alarms = [r["text"] for r in rows if not r["risk"] and shows_risk(r["text"])]
    assert missed == [] and false_alarms == []


@pytest.mark.parametrize("text", ["I am going to die of boredom in this meeting", "today is my last day at work",
                                  "I never wake up before 8", "I cut myself on a piece of paper",
                                  "nobody will notice the typo", "kill the process and restart it"])
def test_guard_stays_quiet_on_idioms(text):
    assert not shows_risk(text)


def test_reply_uses_the_locale_and_the_latest_user_message():
    assert "988" in crisis_text("US") and "112" in crisis_text("EU")
    assert "116 123" in crisis_text("UK")
    convo = [{"role": "user", "content": "I want to end my life"}, {"role": "assistant", "content": "..."},
             {"role": "user", "content": "thanks, I feel safer now and will call my sister"}]
    assert crisis_reply(convo) is None
    assert "988" in crisis_reply(convo[:1], "US")


@pytest.mark.parametrize("stream", [False, True])
def test_middleware_answers_risky_chat_without_the_model_and_keeps_auth(monkeypatch, stream):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    calls = []

    async def chat(request):  # stands in for vLLM's route: the guard must not reach it on risk
        calls.append(await request.json())
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": "model reply"}}]})

    monkeypatch.setenv("API_KEY", "secret")
    monkeypatch.setenv("CRISIS_LOCALE", "EU")
    app = CrisisMiddleware(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]))
    client = TestClient(app)
    auth = {"Authorization": "Bearer secret"}
    risky = {"model": "counseling", "stream": stream,
             "messages": [{"role": "user", "content": "i dont want to be here anymore"}]}
    r = client.post("/v1/chat/completions", json=risky, headers=auth)
    assert r.status_code == 200 and r.headers["x-crisis-guard"] == "1" and calls == []
    assert "112" in r.text
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]")
    ordinary = {"model": "counseling", "messages": [{"role": "user", "content": "This deadline is killing me"}]}
    r = client.post("/v1/chat/completions", json=ordinary, headers=auth)
    assert r.json()["choices"][0]["message"]["content"] == "model reply" and len(calls) == 1
    r = client.post("/v1/chat/completions", json=risky)  # no key: passes through to the server's own auth
    assert len(calls) == 2


def test_middleware_hands_the_body_over_once_then_the_real_channel(monkeypatch):
    """vLLM listens on receive() for the client's disconnect while it generates; a guard that kept returning
    the body made that listener spin and hung every ordinary request (seen with the real server)."""
    import asyncio

    from starlette.testclient import TestClient

    seen = []

    async def app(scope, receive, send):  # reads the body, answers, then waits for the disconnect like vLLM
        first = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": first["body"]})
        seen.append((await asyncio.wait_for(receive(), timeout=5))["type"])

    monkeypatch.setenv("API_KEY", "")
    client = TestClient(CrisisMiddleware(app))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "I feel stressed at work"}]})
    assert r.status_code == 200 and b"stressed" in r.content
    assert seen == ["http.disconnect"]
