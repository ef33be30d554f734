"""The battle logic of serve/battle.py alone, without Gradio: blind sides, one seed for both, the vote in SQLite
before the reveal, failures, multi-turn history, the crisis guard, the chat tab and the leaderboard.

The models are conftest's fake_openai_server, a real streaming OpenAI-compatible server on 127.0.0.1 whose
answers name the model and the turn, so each test can see which side was asked what. Seconds in all.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from itertools import pairwise

import pytest

from tests.conftest import REPO, fake_openai_server, free_port, make_pack

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def server():
    srv = fake_openai_server(API_KEY)
    yield srv
    srv.stop()


def make_arena(workspace, server, extra_yaml: str = "", base_url: str | None = None):
    from core.pack import load_pack
    from core.votes import Store
    from serve.battle import Arena, Side, make_client

    make_pack(workspace, "t", "name: t\nsystem_prompt: Be brief.\nserve:\n  max_tokens: 50\n  temperature: 0.7\n"
              + extra_yaml)
    base_url = base_url or server.url
    return Arena(pack=load_pack("t"), store=Store(workspace / "arena.sqlite"),
                 tuned=Side("tuned", "t", server.url, make_client(server.url, API_KEY)),
                 base=Side("base", "t-base", base_url, make_client(base_url, API_KEY)))


@pytest.fixture
def arena(workspace, server):
    server.requests.clear()
    server.break_next.clear()
    return make_arena(workspace, server)


def play(arena, battle, prompt: str, rater: str = "ada"):
    """Send a prompt and stream both answers to the end, as the Battle tab does."""
    battle = arena.send(battle, prompt, rater)
    frames = list(arena.answer(battle))
    assert frames and frames[-1] == (battle.turns[-1].answers["a"], battle.turns[-1].answers["b"])
    return battle


def query(arena, sql: str, *args):
    con = sqlite3.connect(arena.store.path)  # a connection of its own: sees only what was committed
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def test_battle_module_does_not_import_gradio():
    code = "import sys, serve.battle; print(sorted(m for m in sys.modules if m.split('.')[0] == 'gradio'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_sides_are_random_and_hidden_until_the_vote(arena):
    from serve.battle import BattleError

    orders = {tuple(arena.start("ada").roles.values()) for _ in range(40)}
    assert orders == {("tuned", "base"), ("base", "tuned")}  # both orders drawn (a miss: 2 in 2^40)

    battle = play(arena, None, "What is a bond?")
    assert battle.ready and battle.labels() == {"a": "Model A", "b": "Model B"}
    with pytest.raises(BattleError, match="once your vote is stored"):
        battle.reveal()
    arena.vote(battle, "model_b", "ada")
    labels, reveal = battle.labels(), battle.reveal()
    for tag in ("a", "b"):
        assert labels[tag] == f"Model {tag.upper()}: {battle.models[tag]} ({battle.roles[tag]})"
        # the side really was that model: the test server's answer names it
        assert battle.turns[0].answers[tag].startswith(f"[{battle.models[tag]}] turn 1")
    assert reveal.startswith("**Vote recorded: B is better.**")
    assert f"Model A was `{battle.models['a']}` ({battle.roles['a']})" in reveal


def test_both_sides_get_the_same_sampling_and_one_seed(arena, server):
    battle = play(arena, None, "What is a bond?")
    asked = {r["model"]: r for r in server.requests}
    assert set(asked) == {"t", "t-base"}
    keys = ("temperature", "max_tokens", "top_p", "seed")
    same = [{k: r[k] for k in keys} for r in asked.values()]
    assert same[0] == same[1] == battle.sampling == {"temperature": 0.7, "max_tokens": 50, "top_p": 1.0,
                                                      "seed": battle.sampling["seed"]}
    assert all(r["stream"] for r in asked.values())
    # the seed is stored with the battle, and the next battle draws another
    stored = json.loads(query(arena, "SELECT sampling FROM battles WHERE id = ?", battle.id)[0][0])
    assert stored == battle.sampling
    assert arena.start("ada").sampling["seed"] != battle.sampling["seed"]


def test_the_vote_is_in_sqlite_before_the_reveal_and_a_second_vote_is_refused(arena):
    from serve.battle import BattleError

    with pytest.raises(BattleError, match="Send a prompt first"):
        arena.vote(None, "tie", "ada")
    battle = arena.send(None, "What is a bond?", "ada")
    with pytest.raises(BattleError, match="Wait until both answers are complete"):
        arena.vote(battle, "tie", "ada")  # still streaming
    list(arena.answer(battle))
    arena.vote(battle, "tie", "ada")
    assert query(arena, "SELECT kind, rater FROM votes WHERE battle_id = ?", battle.id) == [("tie", "ada")]
    with pytest.raises(BattleError, match="already has a vote"):
        arena.vote(battle, "model_a", "ada")

    # The same battle voted elsewhere first (another tab, another arena process on the same database): the
    # store refuses, the rater reads why, and nothing is revealed because nothing was stored.
    other = play(arena, None, "And a stock?", rater="bob")
    arena.store.vote(other.id, "model_a", "someone else")
    with pytest.raises(BattleError, match="this conversation already has a vote; start a new round"):
        arena.vote(other, "model_b", "bob")
    assert other.voted is None and other.labels() == {"a": "Model A", "b": "Model B"}
    with pytest.raises(BattleError):
        other.reveal()
    assert query(arena, "SELECT kind, rater FROM votes WHERE battle_id = ?", other.id) == [("model_a", "someone else")]


def test_a_model_failing_mid_answer_blocks_the_vote_until_regenerate(arena, server):
    from serve.battle import BattleError

    server.break_next["t-base"] = 1
    battle = play(arena, None, "What is a bond?")
    base = "a" if battle.roles["a"] == "base" else "b"
    tuned = "b" if base == "a" else "a"
    assert not battle.ready and not battle.busy
    # what came before the break (three words), then why it stopped
    assert battle.turns[0].answers[base].startswith("[t-base] turn 1\n\n⚠️ this model failed: ")
    assert "failed" not in battle.turns[0].answers[tuned]
    with pytest.raises(BattleError, match="Wait until both answers are complete"):
        arena.vote(battle, "model_a", "ada")
    with pytest.raises(BattleError, match="A model failed on the last turn: press Regenerate"):
        arena.send(battle, "And a stock?", "ada")

    arena.regenerate(battle)
    list(arena.answer(battle))
    assert battle.ready and "failed" not in battle.turns[0].answers[base]
    arena.vote(battle, "model_a", "ada")
    gens = query(arena, "SELECT attempt, model, text, error FROM generations WHERE battle_id = ? "
                        "ORDER BY attempt, model", battle.id)
    assert [(g[0], g[1]) for g in gens] == [(0, "t"), (0, "t-base"), (1, "t"), (1, "t-base")]
    assert gens[1][2] == "[t-base] turn 1" and gens[1][3]  # the partial answer and its error, stored
    assert gens[0][3] is gens[2][3] is gens[3][3] is None
    with pytest.raises(BattleError, match="Nothing to regenerate"):
        arena.regenerate(battle)  # after the vote


def test_a_model_that_is_down_is_stored_as_an_error(workspace, server):
    """One side's server is down: the other answer still streams, the error is stored, no vote opens."""
    arena = make_arena(workspace, server, base_url=f"http://127.0.0.1:{free_port()}/v1")
    battle = play(arena, None, "What is a bond?")
    assert not battle.ready
    tuned = "a" if battle.roles["a"] == "tuned" else "b"
    answer = battle.turns[0].answers[tuned]
    assert answer.startswith("[t] turn 1 answer to: What is a bond?")
    assert f"system prompt {len('Be brief.')} chars" in answer  # the pack's system prompt was sent
    assert "failed" in battle.turns[0].answers["b" if tuned == "a" else "a"]
    rows = query(arena, "SELECT model, text, error, completion_tokens FROM generations")
    stored = {model: (text, err, tokens) for model, text, err, tokens in rows}
    assert stored["t"] == (answer, None, 13)  # 13 streamed chunks, the usage the server reported
    assert "Connection" in stored["t-base"][1]


def test_multi_turn_keeps_each_sides_own_history(arena, server):
    from serve.battle import BattleError

    battle = arena.send(None, "What is a bond?", "ada")
    with pytest.raises(BattleError, match="Wait for both answers first"):
        arena.send(battle, "And a stock?", "ada")
    list(arena.answer(battle))
    first = dict(battle.turns[0].answers)
    server.requests.clear()
    assert play(arena, battle, "And a stock?") is battle  # no vote yet: the same battle continues
    asked = {r["model"]: r["messages"] for r in server.requests}
    for tag in ("a", "b"):
        assert asked[battle.models[tag]] == [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a bond?"},
            {"role": "assistant", "content": first[tag]}, {"role": "user", "content": "And a stock?"}]
        assert battle.turns[1].answers[tag].startswith(f"[{battle.models[tag]}] turn 2 answer to: And a stock?")
    assert query(arena, "SELECT idx, prompt FROM turns WHERE battle_id = ? ORDER BY idx", battle.id) == [
        (0, "What is a bond?"), (1, "And a stock?")]
    arena.vote(battle, "model_a", "ada")
    assert play(arena, battle, "Next question").id != battle.id  # after the vote a new battle starts


def test_crisis_guard_answers_without_calling_the_models(workspace, server):
    from serve.battle import CrisisReply

    server.requests.clear()
    arena = make_arena(workspace, server, "  crisis_guard: true\n")
    with pytest.raises(CrisisReply, match="988"):
        arena.send(None, "I want to end my life", "ada")
    chat = list(arena.chat("I want to end my life", []))
    assert len(chat) == 1 and "988" in chat[0]
    assert server.requests == []
    assert query(arena, "SELECT COUNT(*) FROM battles")[0][0] == query(arena, "SELECT COUNT(*) FROM turns")[0][0] == 0
    play(arena, None, "What is a bond?")  # an ordinary prompt still goes to both models
    assert len(server.requests) == 2


def test_the_guard_is_off_unless_the_pack_turns_it_on(arena):
    assert arena.crisis("I want to end my life") is None


def test_send_needs_a_rater_and_a_prompt(arena):
    from serve.battle import BattleError

    with pytest.raises(BattleError, match="Enter your name at the top first"):
        arena.send(None, "What is a bond?", "")
    with pytest.raises(BattleError, match="Type a prompt first"):
        arena.send(None, "   ", "ada")
    assert query(arena, "SELECT COUNT(*) FROM battles")[0][0] == 0


def test_chat_streams_the_tuned_model_alone(arena, server):
    # gradio hands the history back with content parts; the model gets plain strings after the system prompt
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]
    texts = list(arena.chat("What is a bond?", history))
    assert len(texts) > 1 and all(b.startswith(a) for a, b in pairwise(texts))  # growing text
    assert texts[-1].startswith("[t] turn 2 answer to: What is a bond? with more detail")
    (request,) = server.requests
    assert request["model"] == "t" and request["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is a bond?"}]


def test_leaderboard_counts_every_vote(arena):
    assert "| Battles (voted) | 0 |" in arena.leaderboard()
    for kind in ("model_a", "tie (bothbad)"):
        arena.vote(play(arena, None, "What is a bond?"), kind, "ada")
    board = arena.leaderboard()
    assert "### Tuned `t` vs base `t-base`" in board and "| Battles (voted) | 2 |" in board
    assert "both bad 1" in board


def test_three_contestants_battle_in_every_pair_and_the_leaderboard_ranks_them(workspace, server):
    from collections import Counter

    from serve.battle import Side, make_client

    arena = make_arena(workspace, server)
    arena.others.append(Side("sft", "t-sft", server.url, make_client(server.url, API_KEY)))
    before = arena.leaderboard()
    assert "### Ranking of 3 models (Bradley-Terry)" in before
    assert "| – | `t-sft` (sft) | no votes yet | – | 0 |" in before and "| Battles (voted) | 0 |" in before

    drawn = [arena.start("ada") for _ in range(300)]
    pairs = Counter(frozenset(b.roles.values()) for b in drawn)
    assert set(pairs) == {frozenset(p) for p in (("tuned", "base"), ("tuned", "sft"), ("sft", "base"))}
    assert all(60 < n < 140 for n in pairs.values())  # uniform over pairs: 100 each, sd 8
    assert 60 < sum(b.roles["a"] == "sft" for b in drawn) < 140  # on side A in half of its 200 battles
    stored = query(arena, "SELECT model_a, model_b FROM battles")
    assert stored == [(b.models["a"], b.models["b"]) for b in drawn]

    better = {"tuned": 3, "sft": 2, "base": 1}  # the raters' taste: tuned over sft over base, always
    seen = set()
    while len(seen) < 3 or len(query(arena, "SELECT 1 FROM votes")) < 12:
        battle = play(arena, None, "What is a bond?")
        a, b = battle.roles["a"], battle.roles["b"]
        seen.add(frozenset((a, b)))
        arena.vote(battle, "model_a" if better[a] > better[b] else "model_b", "ada")
        assert f"({a})" in battle.reveal() and f"({b})" in battle.reveal()
    board = arena.leaderboard()
    rows = [line for line in board.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
            or line.startswith("| 3 |")]
    assert [r.split(" | ")[1] for r in rows] == ["`t` (tuned)", "`t-sft` (sft)", "`t-base` (base)"]
    assert "| `t` vs `t-sft` |" in board and "| `t-sft` vs `t-base` |" in board and "| `t` vs `t-base` |" in board
    assert "### Tuned `t` vs base `t-base`" in board  # the headline pair's detail, below the ranking
