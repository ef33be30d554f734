"""The arena: blind side-by-side battles between the tuned and the base model, rated by people.

Battle tab: the same conversation goes to both models with identical sampling settings, sides are drawn
at random per battle, both answers stream side by side with the names hidden; the vote buttons (A, B,
tie, both bad) open once both answers are complete; the vote is committed to SQLite before the names are
revealed. Chat tab: the tuned model alone. Leaderboard tab: the statistics of serve/stats.py.

    python -m serve.arena --domain finance --tuned-url http://127.0.0.1:8000/v1 \\
        --base-url http://127.0.0.1:8001/v1 --api-key-file runs/finance/serve/api_key
    python -m serve.arena --domain finance ... serve.max_tokens=128     # pack overrides, as in make

Votes land in runs/<domain>/arena.sqlite; `make domain=finance export-votes` turns them into preference
pairs for the next pref round.
"""
from __future__ import annotations

import argparse
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from core.errors import PackError, show_path
from core.pack import load_pack
from core.schema import Pack
from core.votes import Store, VoteError, db_path

VOTE_LABELS = {"model_a": "A is better", "model_b": "B is better", "tie": "Tie", "tie (bothbad)": "Both are bad"}
MAX_EXAMPLES = 30


@dataclass
class Side:
    """One served model as the arena talks to it."""

    role: str  # "tuned" or "base"
    model: str  # served model name
    url: str
    client: object = field(repr=False, default=None)


@dataclass
class Arena:
    pack: Pack
    tuned: Side
    base: Side
    store: Store
    sampling: dict
    rubric: str = ""
    examples: list[str] = field(default_factory=list)

    def side(self, role: str) -> Side:
        return self.tuned if role == "tuned" else self.base


# ------------------------------------------------------------------------------------------- models


def make_client(url: str, api_key: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=api_key, timeout=600, max_retries=0)


def stream_answer(side: Side, messages: list[dict], sampling: dict, q: queue.Queue, tag: str) -> None:
    """Stream one chat completion into q as (tag, kind, payload); run in its own thread."""
    t0 = time.perf_counter()
    info = {"text": "", "first_token_s": None, "prompt_tokens": None, "completion_tokens": None,
            "finish_reason": None, "error": None}
    try:
        stream = side.client.chat.completions.create(
            model=side.model, messages=messages, stream=True, stream_options={"include_usage": True}, **sampling)
        for chunk in stream:
            if chunk.usage:
                info["prompt_tokens"] = chunk.usage.prompt_tokens
                info["completion_tokens"] = chunk.usage.completion_tokens
            for choice in chunk.choices:
                delta = choice.delta.content or ""
                if delta:
                    if info["first_token_s"] is None:
                        info["first_token_s"] = time.perf_counter() - t0
                    info["text"] += delta
                    q.put((tag, "delta", delta))
                if choice.finish_reason:
                    info["finish_reason"] = choice.finish_reason
    except Exception as e:  # a server that is down or refuses: shown in that side's chat, no vote possible
        info["error"] = f"{type(e).__name__}: {e}"
    info["latency_s"] = time.perf_counter() - t0
    q.put((tag, "done", info))


def conversation(system_prompt: str, turns: list[dict], side: str, upto: int | None = None) -> list[dict]:
    """OpenAI messages for one side: system prompt, earlier turns with that side's answers, next prompt."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i, t in enumerate(turns if upto is None else turns[:upto + 1]):
        msgs.append({"role": "user", "content": t["prompt"]})
        if (upto is None or i < upto) and t.get(side) is not None:
            msgs.append({"role": "assistant", "content": t[side]})
    return msgs


def chat_view(turns: list[dict], side: str) -> list[dict]:
    out = []
    for t in turns:
        out.append({"role": "user", "content": t["prompt"]})
        text = t.get(side) or ""
        out.append({"role": "assistant", "content": text or "…"})
    return out


# ------------------------------------------------------------------------------------------- battle


def new_battle(arena: Arena, rater: str) -> dict:
    roles = ["tuned", "base"]
    random.shuffle(roles)  # blind: which model sits on the left is drawn per battle
    sampling = dict(arena.sampling, seed=random.randrange(2 ** 31))  # the same seed for both sides
    models = {"a": arena.side(roles[0]).model, "b": arena.side(roles[1]).model}
    battle_id = arena.store.new_battle(models["a"], models["b"], arena.pack.system_prompt, sampling, rater)
    return {"id": battle_id, "roles": {"a": roles[0], "b": roles[1]}, "models": models, "sampling": sampling,
            "turns": [], "attempt": 0, "ready": False, "busy": False, "voted": None}


def run_turn(arena: Arena, battle: dict, attempt: int):
    """Stream both answers of the last turn; yield (chat_a, chat_b) as text arrives; store both at the end."""
    idx = len(battle["turns"]) - 1
    turn = battle["turns"][idx]
    turn["a"] = turn["b"] = ""
    q: queue.Queue = queue.Queue()
    for tag in ("a", "b"):
        msgs = conversation(arena.pack.system_prompt, battle["turns"], tag, upto=idx)
        threading.Thread(target=stream_answer, daemon=True,
                         args=(arena.side(battle["roles"][tag]), msgs, battle["sampling"], q, tag)).start()
    done: dict[str, dict] = {}
    last = 0.0
    while len(done) < 2:
        tag, kind, payload = q.get()
        if kind == "delta":
            turn[tag] += payload
        else:
            done[tag] = payload
            if payload["error"]:
                turn[tag] = (turn[tag] + f"\n\n⚠️ this model failed: {payload['error']}").strip()
        if time.perf_counter() - last > 0.1 or len(done) == 2:  # ~10 updates a second
            last = time.perf_counter()
            yield chat_view(battle["turns"], "a"), chat_view(battle["turns"], "b")
    for tag, info in done.items():
        arena.store.add_generation(
            battle["id"], idx, tag, battle["models"][tag], info["text"], attempt=attempt,
            latency_s=info["latency_s"], first_token_s=info["first_token_s"], prompt_tokens=info["prompt_tokens"],
            completion_tokens=info["completion_tokens"], finish_reason=info["finish_reason"], error=info["error"])
    battle["ready"] = not any(info["error"] for info in done.values())


def reveal_text(battle: dict, kind: str) -> str:
    names = {t: f"`{battle['models'][t]}` ({battle['roles'][t]})" for t in ("a", "b")}
    return (f"**Vote recorded: {VOTE_LABELS[kind]}.** Model A was {names['a']}, model B was {names['b']}. "
            "Press **New round** (or type a new prompt) for the next battle.")


# -------------------------------------------------------------------------------------- leaderboard


def pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f}%"


def interval(ci: tuple[float, float]) -> str:
    return "–" if ci[0] != ci[0] else f"[{pct(ci[0])}, {pct(ci[1])}]"


def leaderboard_markdown(arena: Arena) -> str:
    s = arena.store.summary(arena.tuned.model, arena.base.model)
    v = s["votes"]
    if s["votes_needed"] is None:
        need = "–" if s["wins"] + s["losses"] == 0 else "never at exactly 50%"
    elif s["votes_needed"] == 0:
        need = "already separated from 50% (p < 0.05)"
    else:
        need = f"about {s['votes_needed']} more decisive votes at the current rate"
    rows = [
        ("Battles (voted)", f"{s['battles']}"),
        ("Votes by kind", f"A better {v['model_a']} · B better {v['model_b']} · tie {v['tie']} · "
                          f"both bad {v['tie (bothbad)']}"),
        ("Tuned wins / losses / ties", f"{s['wins']} / {s['losses']} / {s['ties']}  (of {s['n']} tuned-vs-base)"),
        ("**Win rate of tuned** (ties as half)", f"**{pct(s['win_rate'])}**"),
        ("Wilson 95% interval", interval(s["wilson_95"])),
        ("Bootstrap 95% interval (battles resampled)", interval(s["bootstrap_95"])),
        ("Decisive win rate", pct(s["decisive_win_rate"])),
        ("Sign test, exact two-sided p", f"{s['sign_test_p']:.3g}"),
        ("Length-controlled win rate", f"{pct(s['lc_win_rate'])} (mean answer: tuned "
                                       f"{s['mean_len_tuned']:.0f} chars, base {s['mean_len_base']:.0f})"
         if s["n"] else "–"),
        ("Left-side (A) preference", f"A chosen in {pct(s['left_share'])} of decisive votes "
                                     f"(p = {s['left_p']:.3g}; a small p means raters favour the left side)"),
        ("To separate from 50%", need),
    ]
    out = [f"### Tuned `{s['tuned']}` vs base `{s['base']}`", "", "| statistic | value |", "|---|---|"]
    out += [f"| {k} | {val} |" for k, val in rows]
    if "bradley_terry" in s:
        out += ["", "#### Bradley-Terry ratings (Elo scale)", "", "| model | rating |", "|---|---|"]
        out += [f"| `{m}` | {r:.0f} |" for m, r in sorted(s["bradley_terry"].items(), key=lambda kv: -kv[1])]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- app


def build_app(arena: Arena):
    import gradio as gr

    no = gr.update(interactive=False)

    def vote_buttons(on: bool):
        return [gr.update(interactive=on)] * 4

    def set_rater(name: str):
        name = (name or "").strip()
        if not name:
            raise gr.Error("Type your name (or initials) first: each vote is stored with the rater's name.")
        return name, gr.update(value=name, interactive=False), gr.update(visible=False), \
            f"Rating as **{name}**. Type a prompt or pick an example below."

    def crisis_text(message: str) -> str | None:
        if not getattr(arena.pack.serve, "crisis_guard", False):
            return None
        from serve.crisis import crisis_reply

        return crisis_reply(message, getattr(arena.pack.serve, "crisis_locale", "US"))

    def send(prompt: str, rater: str, battle: dict | None):
        prompt = (prompt or "").strip()
        if not rater:
            raise gr.Error("Enter your name at the top first.")
        if not prompt:
            raise gr.Error("Type a prompt first.")
        crisis = crisis_text(prompt)
        if crisis:  # answered with crisis lines, never sent to the models, not part of any battle
            yield battle, gr.skip(), gr.skip(), "", *[gr.skip()] * 5, f"⚠️ {crisis}"
            return
        if battle is None or battle["voted"]:
            battle = new_battle(arena, rater)
        elif battle["busy"]:
            raise gr.Error("Wait for both answers first.")
        elif battle["turns"] and not battle["ready"]:
            raise gr.Error("A model failed on the last turn: press Regenerate, or start a New round.")
        battle["ready"], battle["busy"] = False, True
        battle["turns"].append({"prompt": prompt, "a": None, "b": None})
        arena.store.add_turn(battle["id"], len(battle["turns"]) - 1, prompt)
        # the labels go back to "Model A/B": after a vote they showed the previous battle's names
        yield (battle, gr.update(value=chat_view(battle["turns"], "a"), label="Model A"),
               gr.update(value=chat_view(battle["turns"], "b"), label="Model B"), "", *vote_buttons(False), no, "")
        for a, b in run_turn(arena, battle, attempt=0):
            yield battle, a, b, "", *vote_buttons(False), no, ""
        battle["busy"] = False
        status = "Both answers are in: vote, or continue the conversation (one vote covers it all)." \
            if battle["ready"] else "A model failed: press **Regenerate** or start a **New round**."
        yield (battle, chat_view(battle["turns"], "a"), chat_view(battle["turns"], "b"), "",
               *vote_buttons(battle["ready"]), gr.update(interactive=True), status)

    def regenerate(battle: dict | None):
        if battle is None or not battle["turns"] or battle["voted"]:
            raise gr.Error("Nothing to regenerate: send a prompt first (after a vote, start a new round).")
        if battle["busy"]:
            raise gr.Error("Wait for both answers first.")
        battle["attempt"] += 1
        battle["ready"], battle["busy"] = False, True
        yield battle, gr.skip(), gr.skip(), *vote_buttons(False), no, ""
        for a, b in run_turn(arena, battle, attempt=battle["attempt"]):
            yield battle, a, b, *vote_buttons(False), no, ""
        battle["busy"] = False
        yield (battle, chat_view(battle["turns"], "a"), chat_view(battle["turns"], "b"),
               *vote_buttons(battle["ready"]), gr.update(interactive=True), "Regenerated both answers.")

    def vote(kind: str, rater: str, battle: dict | None):
        if battle is None or not battle["turns"]:
            raise gr.Error("Send a prompt first.")
        if battle["voted"]:
            raise gr.Error("This conversation already has a vote; start a new round.")
        if battle["busy"] or not battle["ready"]:
            raise gr.Error("Wait until both answers are complete.")
        try:
            arena.store.vote(battle["id"], kind, rater)  # committed before anything is revealed
        except VoteError as e:
            raise gr.Error(str(e))
        battle["voted"] = kind
        names = {t: f"Model {t.upper()}: {battle['models'][t]} ({battle['roles'][t]})" for t in ("a", "b")}
        return (battle, gr.update(label=names["a"]), gr.update(label=names["b"]), *vote_buttons(False), no,
                reveal_text(battle, kind), leaderboard_markdown(arena))

    def new_round():
        return (None, gr.update(value=[], label="Model A"), gr.update(value=[], label="Model B"),
                *vote_buttons(False), no, "New round: type a prompt.")

    def chat(message: str, history: list[dict]):
        crisis = crisis_text(message)
        if crisis:
            yield crisis
            return
        msgs = [{"role": "system", "content": arena.pack.system_prompt}] if arena.pack.system_prompt else []
        for m in history:
            content = m["content"]
            if isinstance(content, list):  # gradio may hand back content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            msgs.append({"role": m["role"], "content": content})
        msgs.append({"role": "user", "content": message})
        q: queue.Queue = queue.Queue()
        threading.Thread(target=stream_answer, daemon=True,
                         args=(arena.tuned, msgs, dict(arena.sampling), q, "t")).start()
        text = ""
        while True:
            _, kind, payload = q.get()
            if kind == "delta":
                text += payload
                yield text
            else:
                yield (text + f"\n\n⚠️ the model failed: {payload['error']}").strip() if payload["error"] else text
                return

    with gr.Blocks(title=f"{arena.pack.name} arena") as demo:
        gr.Markdown(f"# {arena.pack.name} arena\n{arena.pack.description}")
        with gr.Tab("Battle"):
            rater = gr.State("")
            battle = gr.State(None)
            with gr.Row():
                rater_box = gr.Textbox(label="Your name (asked once)", placeholder="name or initials",
                                       elem_id="rater", scale=3)
                rater_btn = gr.Button("Start rating", elem_id="rater-btn", scale=1)
            with gr.Row():
                with gr.Column(scale=3):
                    gr.Markdown("Two anonymous models answer the same conversation. Judge them with the rubric, "
                                "then vote; the names are revealed after your vote.")
                    with gr.Row():
                        chat_a = gr.Chatbot(label="Model A", elem_id="chat-a", height=420)
                        chat_b = gr.Chatbot(label="Model B", elem_id="chat-b", height=420)
                    with gr.Row():
                        btn_a = gr.Button("A is better", interactive=False, elem_id="vote-a")
                        btn_b = gr.Button("B is better", interactive=False, elem_id="vote-b")
                        btn_tie = gr.Button("Tie", interactive=False, elem_id="vote-tie")
                        btn_bad = gr.Button("Both are bad", interactive=False, elem_id="vote-bothbad")
                    status = gr.Markdown("Enter your name to start.", elem_id="reveal")
                    with gr.Row():
                        prompt = gr.Textbox(show_label=False, placeholder="Type a prompt and press Enter",
                                            elem_id="prompt", scale=5)
                        send_btn = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                    with gr.Row():
                        regen_btn = gr.Button("Regenerate", interactive=False, elem_id="regenerate")
                        new_btn = gr.Button("New round", elem_id="new-round")
                    if arena.examples:
                        gr.Examples([[p] for p in arena.examples], inputs=[prompt], label="Prompts from the pack")
                with gr.Column(scale=2):
                    with gr.Accordion("Rubric", open=True):
                        gr.Markdown(arena.rubric or "_This pack has no rubric.md._", elem_id="rubric",
                                    max_height=640)
        with gr.Tab("Chat"):
            gr.Markdown(f"Chat with the tuned model `{arena.tuned.model}` alone.")
            gr.ChatInterface(chat, api_name="chat")
        with gr.Tab("Leaderboard") as board_tab:
            board = gr.Markdown(leaderboard_markdown(arena), elem_id="leaderboard")
            refresh = gr.Button("Refresh")

        votes = [btn_a, btn_b, btn_tie, btn_bad]
        rater_btn.click(set_rater, [rater_box], [rater, rater_box, rater_btn, status], api_name="set_rater")
        rater_box.submit(set_rater, [rater_box], [rater, rater_box, rater_btn, status], api_visibility="private")
        gr.on([prompt.submit, send_btn.click], send, [prompt, rater, battle],
              [battle, chat_a, chat_b, prompt, *votes, regen_btn, status], api_name="send")
        regen_btn.click(regenerate, [battle], [battle, chat_a, chat_b, *votes, regen_btn, status],
                        api_name="regenerate")
        for btn, kind, name in zip(votes, VOTE_LABELS, ("vote_a", "vote_b", "vote_tie", "vote_bothbad")):
            btn.click(partial(vote, kind), [rater, battle], [battle, chat_a, chat_b, *votes, regen_btn, status,
                                                             board], api_name=name)
        new_btn.click(new_round, None, [battle, chat_a, chat_b, *votes, regen_btn, status], api_name="new_round")
        refresh.click(lambda: leaderboard_markdown(arena), None, board, api_name="leaderboard")
        board_tab.select(lambda: leaderboard_markdown(arena), None, board, api_visibility="private")
    return demo


# ---------------------------------------------------------------------------------------------- cli


def load_arena(args) -> Arena:
    pack = load_pack(args.domain, args.overrides)
    if args.api_key_file:
        key_file = Path(args.api_key_file)
        if not key_file.is_file():
            raise PackError(f"--api-key-file {show_path(key_file)} does not exist; start the servers first "
                            f"(make domain={args.domain} serve) or pass the key in the API_KEY variable")
        api_key = key_file.read_text(encoding="utf-8").strip()
    else:
        api_key = os.environ.get("API_KEY", "EMPTY")
    tuned = Side("tuned", args.tuned_model or pack.name, args.tuned_url)
    base = Side("base", args.base_model or f"{pack.name}-base", args.base_url)
    tuned.client = make_client(tuned.url, api_key)
    base.client = tuned.client if base.url == tuned.url else make_client(base.url, api_key)
    rubric_file = pack.dir / "rubric.md"
    examples: list[str] = []
    if pack.eval.prompts:
        from core.rows import load_rows

        try:
            examples = [r["prompt"] for r in load_rows(pack, pack.eval.prompts, "prompt", "eval.prompts")]
        except PackError as e:  # the arena still works without examples; say why they are missing
            print(f"arena: no example prompts ({e.render()})", file=sys.stderr)
    sampling = {"temperature": pack.serve.temperature, "max_tokens": pack.serve.max_tokens, "top_p": 1.0}
    return Arena(pack=pack, tuned=tuned, base=base, store=Store(db_path(pack.name)), sampling=sampling,
                 rubric=rubric_file.read_text(encoding="utf-8") if rubric_file.is_file() else "",
                 examples=examples[:MAX_EXAMPLES])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.arena", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True, help="the domain pack (domains/<domain>/pack.yaml)")
    ap.add_argument("--tuned-url", required=True, help="OpenAI-compatible base URL of the tuned model, …/v1")
    ap.add_argument("--base-url", required=True, help="OpenAI-compatible base URL of the base model, …/v1")
    ap.add_argument("--tuned-model", help="served name of the tuned model (default: the domain)")
    ap.add_argument("--base-model", help="served name of the base model (default: <domain>-base)")
    ap.add_argument("--api-key-file", help="file holding the servers' API key (default: $API_KEY)")
    ap.add_argument("--host", default=None, help="address to bind (default: the pack's serve.host)")
    ap.add_argument("--port", type=int, default=None, help="port (default: the pack's serve.arena_port)")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value", help="pack overrides, e.g. serve.max_tokens=64")
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        arena = load_arena(args)
    except PackError as e:
        print(e.render(), file=sys.stderr)
        return 2
    host = args.host or arena.pack.serve.host
    port = args.port or arena.pack.serve.arena_port
    print(f"arena: tuned {arena.tuned.model} @ {arena.tuned.url}, base {arena.base.model} @ {arena.base.url}; "
          f"votes -> {show_path(arena.store.path)}", flush=True)
    demo = build_app(arena)
    demo.queue(default_concurrency_limit=64).launch(server_name=host, server_port=port, ssr_mode=False,
                                                     show_error=True, quiet=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
