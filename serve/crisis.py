"""Crisis guard: messages showing risk of self-harm get a fixed response with crisis lines, not the model's.

Safety is not left to a 135M-parameter model. The guard is a transparent pattern check on the latest
user message, used in two places:
- the arena (serve/battle.py) calls `crisis_reply(text, locale)` before sending a prompt to the models;
- the OpenAI-compatible API: vLLM loads `CrisisMiddleware` with `--middleware serve.crisis.CrisisMiddleware`
  (the launcher adds it when the pack sets `serve.crisis_guard: true`), and a chat completion whose last
  user message shows risk is answered with the fixed text, streamed or not, without reaching the model.

The patterns favour recall: a false alarm costs one unneeded list of helplines, a miss costs more.
Idioms such as "this deadline is killing me" or "kill the process" are excluded.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid

# Crisis lines by locale. US: 988 Suicide & Crisis Lifeline; EU: 112 is the emergency number everywhere
# in the EU; UK: Samaritans; IT: Telefono Amico Italia.
CRISIS_LINES = {
    "US": ["call or text 988 (Suicide & Crisis Lifeline)", "in an emergency call 911"],
    "EU": ["call 112 (emergency number in every EU country)"],
    "UK": ["call Samaritans on 116 123 (free, 24 hours)", "in an emergency call 999"],
    "IT": ["chiama il 112 (numero unico di emergenza)", "Telefono Amico Italia: 02 2327 2327"],
}

_RISK = [
    # direct statements (typos such as "kil myself" included)
    r"\b(kill|kil|kll|killing|hurt|hurting|harm|harming)\s*(my\s*self|myself|meself)\b(?!\s+laughing)",
    r"\b(cut|cutting)\s+(my\s*self|myself)\b(?!\s+(shaving|while|on|by|accidentally|cooking|with\s+a\s+kitchen))",
    r"\bsuicid(e|al)\b",
    r"\bself[-\s]?harm",
    r"\b(end|ending|take|taking)\s+(my|my\s+own)\s+life\b",
    r"\bend\s+it\b.{0,20}\b(all|tonight|today|now|soon|for\s+good)\b",
    r"\b(want|wanna|plan|planning|ready)\s+to\s+(die|end\s+it)\b",
    r"\bwanna\s+die\b",
    r"\bwish\s+i\s+(was|were)\s+dead\b",
    r"\b(better\s+off|be\s+better)\s+(dead|without\s+me)\b",
    r"\b(don'?t|do\s+not|no\s+longer)\s+want\s+to\s+(be\s+here|live|be\s+alive|exist|wake\s+up)\b",
    r"\b(and|to)\s+(never|not)\s+wake\s+up\b",
    # hopelessness about living
    r"\b(no|what'?s\s+the)\s+(reason|point)\s+(to|in|of)\s+(live|living|life|go(ing)?\s+on|being\s+alive)\b",
    r"\b(can'?t|cannot)\s+go\s+on\s+(anymore|any\s+more|living)\b",
    r"\bno\s+way\s+out\b.{0,40}\b(dying|death|die|end)\b",
    r"\bexcept\s+(dying|death|to\s+die)\b",
    r"\b(no\s*one|nobody)\s+(will|would)\s+(miss|notice)\s+me\b",
    r"\b(disappear|dissapear|disapear|vanish)\b.{0,15}\b(for\s+good|forever)\b",
    r"\b(pain|it|everything)\s+to\s+stop\b.{0,15}\b(forever|for\s+good|permanently)\b",
    # plans, means and preparations
    r"\b(know|decided|figured\s+out)\s+how\s+i'?m?\s*(going\s+to|gonna|will)\s+do\s+it\b",
    r"\b(jump|jumping)\s+(off|from|in\s+front\s+of)\b",
    r"\b(drive|driving|crash|crashing)\b.{0,40}\bon\s+purpose\b",
    r"\b(bought|buying|got|have)\s+(a\s+)?(rope|noose|gun)\b",
    r"\b(overdose|od)\b",
    r"\b(saving|stockpiling|hoarding|collecting)\s+(up\s+)?(my\s+)?(pills|tablets|meds|medication)\b",
    r"\b(pills|tablets)\b.{0,40}\b(not\s+wake|never\s+wake|to\s+die|enough)\b",
    r"\b(this|today|tonight)\s+(is|will\s+be|is\s+going\s+to\s+be)\s+my\s+last\s+(day|night|week)\b(?!\s+(at|of|in|on|with)\b)",
    r"\bwon'?t\s+need\s+(anything|it|them)\s+(after|anymore|any\s+more)\b",
    r"\b(won'?t|will\s+not|not\s+going\s+to)\s+be\s+around\b",
    r"\bgiv(e|ing)\s+away\s+(all\s+)?my\s+(stuff|things|belongings)\b",
    r"\bgiv(e|ing)\s+(all\s+)?my\s+(stuff|things|belongings)\s+away\b",
    r"\bremember\s+me\s+by\b",
    r"\b(said|saying|say)\s+goodbye\s+to\s+everyone\b",
    r"\b(letters?|notes?)\b.{0,40}\bgoodbye\b|\bgoodbye\s+(letters?|notes?)\b",
    # Italian
    r"\b(uccidermi|suicidarmi|ammazzarmi|farla\s+finita|togliermi\s+la\s+vita|non\s+voglio\s+più\s+vivere)\b",
]
_PATTERNS = [re.compile(p, re.IGNORECASE) for p in _RISK]


def shows_risk(text: str) -> bool:
    return any(p.search(text or "") for p in _PATTERNS)


def crisis_text(locale: str = "US") -> str:
    lines = CRISIS_LINES.get(locale.upper(), CRISIS_LINES["US"])
    other = [f"{k}: {v[0]}" for k, v in CRISIS_LINES.items() if k != locale.upper()]
    return (
        "I'm really sorry you're feeling this way, and I'm glad you said it. You deserve support from a person "
        "right now, and I'm not able to give the help you need. Please reach out to a crisis line: "
        + "; ".join(lines) + ". If you are in immediate danger, call your local emergency number or go to the "
        "nearest emergency department. If you can, tell someone you trust and stay with them. "
        "Elsewhere: " + "; ".join(other) + "."
    )


def crisis_reply(messages_or_text, locale: str = "US") -> str | None:
    """The fixed reply when the latest user message shows risk, else None."""
    if isinstance(messages_or_text, str):
        text = messages_or_text
    else:
        users = [m.get("content") for m in messages_or_text if m.get("role") == "user"]
        text = users[-1] if users else ""
        if isinstance(text, list):  # OpenAI content parts
            text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
    return crisis_text(locale) if shows_risk(text) else None


class CrisisMiddleware:
    """ASGI middleware for vLLM's OpenAI server: answers risky chat completions with the fixed text.

    Locale from CRISIS_LOCALE; requests without the server's API key (API_KEY) pass through untouched,
    so vLLM still answers them with 401.
    """

    def __init__(self, app):
        self.app = app
        self.locale = os.environ.get("CRISIS_LOCALE", "US")
        self.key = os.environ.get("API_KEY", "")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            # the body once; then the real channel, which blocks until the client disconnects. Returning the
            # body again would spin vLLM's disconnect listener forever and hang every request we pass on.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = dict(scope.get("headers") or [])
        authorised = not self.key or headers.get(b"authorization", b"").decode() == f"Bearer {self.key}"
        try:
            request = json.loads(body)
            reply = crisis_reply(request.get("messages") or [], self.locale) if authorised else None
        except (ValueError, AttributeError):
            reply = None
        if reply is None:
            return await self.app(scope, replay, send)
        await _send_fixed(send, request, reply)


async def _send_fixed(send, request: dict, reply: str) -> None:
    ident, created, model = f"chatcmpl-crisis-{uuid.uuid4().hex[:12]}", int(time.time()), request.get("model", "")
    if request.get("stream"):
        events = [
            {"role": "assistant", "content": ""}, {"content": reply},
        ]
        parts = [json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in events]
        parts.append(json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        payload = "".join(f"data: {p}\n\n" for p in parts).encode() + b"data: [DONE]\n\n"
        content_type = b"text/event-stream"
    else:
        payload = json.dumps({
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }).encode()
        content_type = b"application/json"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()),
                            (b"x-crisis-guard", b"1")]})
    await send({"type": "http.response.body", "body": payload})
