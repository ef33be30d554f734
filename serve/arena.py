"""The arena: blind side-by-side battles between the tuned and the base model (and any other contestants of
serve.contestants), rated by people.

Battle tab: a pair of contestants is drawn per battle (uniformly over the pairs), the same conversation goes
to both with identical sampling settings, sides are drawn at random per battle, both answers stream side by
side with the names hidden; the vote buttons (A, B, tie, both bad) open once both answers are complete; the
vote is committed to SQLite before the names are revealed. Chat tab: the tuned model alone. Leaderboard tab:
the statistics of core/stats.py (a Bradley-Terry ranking beside each pair's win rates with more than two).

    python -m serve.arena --domain finance --tuned-url http://127.0.0.1:8000/v1 \\
        --base-url http://127.0.0.1:8001/v1 --api-key-file runs/finance/serve/api_key
    python -m serve.arena --domain finance ... serve.max_tokens=128     # pack overrides, as in make
    python -m serve.arena --domain finance ... --contestant sft finance-sft http://127.0.0.1:8002/v1

Login: with users in ARENA_USERS="ada:pw,bob:pw2" or a users file (serve.arena_users_file, else
runs/<domain>/serve/arena_users, `name:password` lines) the arena asks for Gradio's login and the rater is the
logged-in user; without users it stays open, and then refuses to bind beyond loopback.

Votes land in runs/<domain>/arena.sqlite; `make domain=finance export-votes` turns them into preference
pairs for the next pref round. This module is the Gradio layout and the command line only: what a battle
does is serve/battle.py's, and the handlers here turn its results and BattleErrors into named updates.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from core import cli
from core.errors import PackError, show_path
from core.layout import run_dir, serve_dir
from core.pack import load_pack
from core.schema import Pack
from core.votes import Store, db_path
from serve.auth import arena_users, is_loopback
from serve.battle import VOTE_LABELS, Arena, Battle, BattleError, CrisisReply, Side, make_client

MAX_EXAMPLES = 30
VOTE_APIS = ("vote_a", "vote_b", "vote_tie", "vote_bothbad")  # api_name of each button, in VOTE_LABELS order


def chat_view(battle: Battle, tag: str) -> list[dict]:
    """One side of the battle as Chatbot messages; "…" holds the place of an answer not yet begun."""
    out = []
    for turn in battle.turns:
        out += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": turn.answers[tag] or "…"}]
    return out


def rubric(pack: Pack) -> str:
    path = pack.dir / "rubric.md"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def example_prompts(pack: Pack) -> list[str]:
    """Up to MAX_EXAMPLES of the pack's eval prompts, offered under the prompt box."""
    if not pack.eval.prompts:
        return []
    from core.rows import load_rows

    try:
        rows = load_rows(pack, pack.eval.prompts, "prompt", "eval.prompts")
    except PackError as e:  # the arena still works without examples; say why they are missing
        print(f"arena: no example prompts ({e.render()})", file=sys.stderr)
        return []
    return [r["prompt"] for r in rows][:MAX_EXAMPLES]


def build_app(arena: Arena, login: bool = False):
    """The Blocks app. With login (Gradio's auth), the rater is the logged-in user, not a typed name."""
    import gradio as gr

    pack = arena.pack
    examples = example_prompts(pack)
    with gr.Blocks(title=f"{pack.name} arena") as demo:
        gr.Markdown(f"# {pack.name} arena\n{pack.description}")
        with gr.Tab("Battle"):
            rater = gr.State("")
            battle_state = gr.State(None)  # this tab's Battle; None until the first prompt and after New round
            with gr.Row(visible=not login):
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
                    if examples:
                        gr.Examples([[p] for p in examples], inputs=[prompt], label="Prompts from the pack")
                with gr.Column(scale=2):
                    with gr.Accordion("Rubric", open=True):
                        gr.Markdown(rubric(pack) or "_This pack has no rubric.md._", elem_id="rubric",
                                    max_height=640)
        with gr.Tab("Chat"):
            gr.Markdown(f"Chat with the tuned model `{arena.tuned.model}` alone.")
            gr.ChatInterface(arena.chat, api_name="chat")
        with gr.Tab("Leaderboard") as board_tab:
            board = gr.Markdown(arena.leaderboard(), elem_id="leaderboard")
            refresh = gr.Button("Refresh")
        votes = [btn_a, btn_b, btn_tie, btn_bad]

        # ------------------------------------------------------------------- handlers: named updates

        def buttons(vote: bool, regen: bool) -> dict:
            return {**{b: gr.update(interactive=vote) for b in votes}, regen_btn: gr.update(interactive=regen)}

        def chats(battle: Battle) -> dict:
            return {chat_a: chat_view(battle, "a"), chat_b: chat_view(battle, "b")}

        def set_rater(name: str):
            name = (name or "").strip()
            if not name:
                raise gr.Error("Type your name (or initials) first: each vote is stored with the rater's name.")
            return {rater: name, rater_box: gr.update(value=name, interactive=False),
                    rater_btn: gr.update(visible=False),
                    status: f"Rating as **{name}**. Type a prompt or pick an example below."}

        def takes_request(fn):
            # Gradio passes gr.Request to a parameter whose resolved type hint is gr.Request; the hints of this
            # module are strings (PEP 563) that cannot resolve to gradio, imported here and not at module level.
            fn.__annotations__["request"] = gr.Request
            return fn

        def rater_of(name: str, request) -> str:
            return request.username if login else name

        @takes_request
        def greet(request):
            return f"Rating as **{request.username}**. Type a prompt or pick an example below."

        @takes_request
        def send(text: str, name: str, battle: Battle | None, request):
            try:
                battle = arena.send(battle, text, rater_of(name, request))
            except CrisisReply as e:  # crisis lines in place of answers; the battle on screen stays as it is
                yield {prompt: "", status: f"⚠️ {e}"}
                return
            except BattleError as e:
                raise gr.Error(str(e)) from None
            # the labels go back to "Model A/B": after a vote they showed the previous battle's names
            yield {battle_state: battle, prompt: "", status: "", **buttons(False, False),
                   chat_a: gr.update(value=chat_view(battle, "a"), label="Model A"),
                   chat_b: gr.update(value=chat_view(battle, "b"), label="Model B")}
            for _ in arena.answer(battle):
                yield chats(battle)
            yield {battle_state: battle, **chats(battle), **buttons(battle.ready, True), status: (
                "Both answers are in: vote, or continue the conversation (one vote covers it all)."
                if battle.ready else
                "A model failed or gave an empty answer: press **Regenerate** or start a **New round**.")}

        def regenerate(battle: Battle | None):
            try:
                arena.regenerate(battle)
            except BattleError as e:
                raise gr.Error(str(e)) from None
            yield {status: "", **buttons(False, False)}
            for _ in arena.answer(battle):
                yield chats(battle)
            yield {battle_state: battle, **chats(battle), **buttons(battle.ready, True), status: (
                "Regenerated both answers." if battle.ready
                else "A model failed again (or answered nothing): press **Regenerate** or start a **New round**.")}

        def vote(kind: str, name: str, battle: Battle | None, request):
            try:
                arena.vote(battle, kind, rater_of(name, request))  # committed to SQLite before anything is revealed
            except BattleError as e:
                raise gr.Error(str(e)) from None
            labels = battle.labels()
            return {battle_state: battle, chat_a: gr.update(label=labels["a"]), chat_b: gr.update(label=labels["b"]),
                    **buttons(False, False), status: battle.reveal(), board: arena.leaderboard()}

        def new_round():
            return {battle_state: None, chat_a: gr.update(value=[], label="Model A"),
                    chat_b: gr.update(value=[], label="Model B"), **buttons(False, False),
                    status: "New round: type a prompt."}

        # Every handler returns {component: update}; `outputs` lists what it may touch (all of them for the
        # API, whose return value has one slot per output that is not State or Button).
        screen = [battle_state, chat_a, chat_b, *votes, regen_btn, status]
        rater_btn.click(set_rater, [rater_box], [rater, rater_box, rater_btn, status], api_name="set_rater")
        rater_box.submit(set_rater, [rater_box], [rater, rater_box, rater_btn, status], api_visibility="private")
        # the API returns send's visible outputs in this order: (chat A, chat B, prompt, status)
        gr.on([prompt.submit, send_btn.click], send, [prompt, rater, battle_state],
              [battle_state, chat_a, chat_b, prompt, *votes, regen_btn, status], api_name="send")
        regen_btn.click(regenerate, [battle_state], screen, api_name="regenerate")
        for btn, kind, api in zip(votes, VOTE_LABELS, VOTE_APIS):
            # not functools.partial: Gradio reads no type hints through it, and would not pass the request
            btn.click(takes_request(lambda name, battle, request, kind=kind: vote(kind, name, battle, request)),
                      [rater, battle_state], [*screen, board], api_name=api)
        new_btn.click(new_round, None, screen, api_name="new_round")
        refresh.click(arena.leaderboard, None, board, api_name="leaderboard")
        board_tab.select(arena.leaderboard, None, board, api_visibility="private")
        if login:
            demo.load(greet, None, status, api_visibility="private")
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
    tuned_client = make_client(args.tuned_url, api_key)
    base_client = tuned_client if args.base_url == args.tuned_url else make_client(args.base_url, api_key)
    clients = {args.tuned_url: tuned_client, args.base_url: base_client}
    for _, _, url in args.contestant:  # one client per server: contestants may share one under several names
        clients.setdefault(url, make_client(url, api_key))
    store = Store(db_path(pack.name), max_votes_per_rater=pack.serve.arena_max_votes_per_rater,
                  min_seconds_between_votes=pack.serve.arena_min_seconds_between_votes)
    others = [Side(role, model, url, clients[url]) for role, model, url in args.contestant]
    roles = ["tuned", "base", *(o.role for o in others)]
    if len(set(roles)) < len(roles):
        raise PackError(f"--contestant roles must differ from each other and from tuned and base, got {roles}")
    return Arena(pack=pack, store=store, others=others,
                 tuned=Side("tuned", args.tuned_model or pack.name, args.tuned_url, tuned_client),
                 base=Side("base", args.base_model or f"{pack.name}-base", args.base_url, base_client))


def serve(args) -> None:
    arena = load_arena(args)
    host = args.host or arena.pack.serve.host
    port = args.port or arena.pack.serve.arena_port
    users, source = arena_users(arena.pack.serve, serve_dir(run_dir(arena.pack.name)), arena.pack.dir)
    if not users and not is_loopback(host):
        raise PackError(f"--host {host} serves the arena beyond this machine, so it needs logins: set "
                        "ARENA_USERS='name:password,...' or write `name:password` lines in "
                        f"{show_path(serve_dir(run_dir(arena.pack.name)) / 'arena_users')}")
    others = "".join(f", {o.role} {o.model} @ {o.url}" for o in arena.others)
    print(f"arena: tuned {arena.tuned.model} @ {arena.tuned.url}, base {arena.base.model} @ {arena.base.url}"
          f"{others}; votes -> {show_path(arena.store.path)}; "
          + (f"login for {len(users)} users from {source}" if users else "no login (loopback only)"), flush=True)
    demo = build_app(arena, login=bool(users))
    demo.queue(default_concurrency_limit=64).launch(
        server_name=host, server_port=port, ssr_mode=False, show_error=True, quiet=True,
        auth=list(users.items()) or None, auth_message=f"{arena.pack.name} arena: log in to rate")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.arena", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True, help="the domain pack (domains/<domain>/pack.yaml)")
    ap.add_argument("--tuned-url", required=True, help="OpenAI-compatible base URL of the tuned model, …/v1")
    ap.add_argument("--base-url", required=True, help="OpenAI-compatible base URL of the base model, …/v1")
    ap.add_argument("--tuned-model", help="served name of the tuned model (default: the domain)")
    ap.add_argument("--base-model", help="served name of the base model (default: <domain>-base)")
    ap.add_argument("--contestant", nargs=3, action="append", default=[], metavar=("ROLE", "MODEL", "URL"),
                    help="a further contestant: its role (sft, round1, ...), served model name and …/v1 URL; "
                         "repeat for each (serve.contestants beyond final and base)")
    ap.add_argument("--api-key-file", help="file holding the servers' API key (default: $API_KEY)")
    ap.add_argument("--host", default=None, help="address to bind (default: the pack's serve.host)")
    ap.add_argument("--port", type=int, default=None, help="port (default: the pack's serve.arena_port)")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value", help="pack overrides, e.g. serve.max_tokens=64")
    args = ap.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return cli.run(lambda: serve(args), interrupted="arena stopped; every vote it confirmed is in SQLite")


if __name__ == "__main__":
    sys.exit(main())
