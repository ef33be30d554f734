"""Blind battles between the arena's contestants (tuned, base and any others of serve.contestants), without any
UI: the arena's logic on its own.

A battle is one conversation that gets one vote. Which pair of contestants battles is drawn per battle,
uniformly over the pairs (with two contestants, always tuned vs base); which of them sits on side A is drawn and hidden
until the vote; both sides get the same conversation and the same sampling settings with one seed; both
answers stream at once. The vote is committed to SQLite (core.votes.Store) before the names are revealed.
A request the battle cannot take now raises BattleError, whose message is meant for the rater; a prompt that
shows risk of self-harm (with serve.crisis_guard) raises CrisisReply and reaches no model.

serve/arena.py lays this out in Gradio; tests/test_battle.py drives it directly against a small
OpenAI-compatible server. The usual sequence, as the Battle tab runs it:

    battle = arena.send(None, "What is a bond?", rater="ada")    # a new battle with its first turn
    for text_a, text_b in arena.answer(battle): ...               # both answers so far, ~10 times a second
    arena.vote(battle, "model_a", "ada"); battle.reveal()
"""
from __future__ import annotations

import itertools
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from core.chat import content_text, with_system
from core.schema import Pack
from core.stats import ranking, summarise
from core.votes import Store, VoteError
from serve.crisis import crisis_reply
from serve.leaderboard import render

VOTE_LABELS = {"model_a": "A is better", "model_b": "B is better", "tie": "Tie", "tie (bothbad)": "Both are bad"}
TAGS = ("a", "b")


class BattleError(Exception):
    """A request the battle cannot take in its present state; the message is shown to the rater as it is."""


class CrisisReply(Exception):
    """The prompt shows risk of self-harm: the message (crisis lines) is the answer, and no model is asked."""


@dataclass
class Side:
    """One served model as the arena talks to it."""

    role: str  # "tuned", "base", or another contestant's role (core/contestants.py): sft, round1, ...
    model: str  # served model name
    url: str
    client: object = field(repr=False)  # openai.OpenAI


def make_client(url: str, api_key: str):
    from openai import OpenAI

    # no retries: a retried stream would show the rater an answer that starts over
    return OpenAI(base_url=url, api_key=api_key, timeout=600, max_retries=0)


def stream_answer(side: Side, messages: list[dict], sampling: dict, q: queue.Queue, tag: str) -> None:
    """Stream one chat completion into q as (tag, "delta", text) and a final (tag, "done", record); run in its
    own thread so that both sides stream at once."""
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
    except Exception as e:  # a server that is down, refuses or drops the stream: shown on that side, stored
        info["error"] = f"{type(e).__name__}: {e}"
    info["latency_s"] = time.perf_counter() - t0
    q.put((tag, "done", info))


@dataclass
class Turn:
    prompt: str
    answers: dict[str, str] = field(default_factory=lambda: {"a": "", "b": ""})  # side tag -> answer so far
    attempt: int = 0  # Regenerate adds one; stored with each generation, the latest is the answer


@dataclass
class Battle:
    """One blind conversation as its rater sees it (kept in the rater's session, one per browser tab)."""

    id: str
    roles: dict[str, str]  # side tag ("a"/"b") -> the contestant's role ("tuned", "base", "sft", ...)
    models: dict[str, str]  # side tag -> served model name
    sampling: dict  # sent as is to both sides, seed included
    turns: list[Turn] = field(default_factory=list)
    ready: bool = False  # both answers of the last turn complete, none failed: voting and continuing allowed
    busy: bool = False  # answers streaming
    voted: str | None = None  # the vote's kind, once it is stored

    def messages(self, tag: str, system_prompt: str) -> list[dict]:
        """What side `tag` is asked for the last turn: each earlier prompt with that side's own answer, then the
        last prompt, after the system prompt. A side never sees the other side's answers."""
        msgs = []
        for turn in self.turns[:-1]:
            msgs += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": turn.answers[tag]}]
        msgs.append({"role": "user", "content": self.turns[-1].prompt})
        return with_system(msgs, system_prompt)

    def labels(self) -> dict[str, str]:
        """The two sides' headings: anonymous until the vote is stored, then with model name and role."""
        if not self.voted:
            return {t: f"Model {t.upper()}" for t in TAGS}
        return {t: f"Model {t.upper()}: {self.models[t]} ({self.roles[t]})" for t in TAGS}

    def reveal(self) -> str:
        if not self.voted:
            raise BattleError("The names are shown once your vote is stored.")
        names = {t: f"`{self.models[t]}` ({self.roles[t]})" for t in TAGS}
        return (f"**Vote recorded: {VOTE_LABELS[self.voted]}.** Model A was {names['a']}, model B was "
                f"{names['b']}. Press **New round** (or type a new prompt) for the next battle.")


@dataclass
class Arena:
    """The pack, the served models and the vote store, shared by every rater's battles. The contestants are
    tuned, base and the `others` of serve.contestants; each battle is one pair of them."""

    pack: Pack
    tuned: Side
    base: Side
    store: Store
    others: list[Side] = field(default_factory=list)

    def __post_init__(self):
        roles = [c.role for c in self.contestants]
        assert len(set(roles)) == len(roles), f"contestants' roles must differ: {roles}"

    @property
    def contestants(self) -> list[Side]:
        return [self.tuned, self.base, *self.others]

    def side(self, role: str) -> Side:
        return next(c for c in self.contestants if c.role == role)

    @property
    def sampling(self) -> dict:
        return {"temperature": self.pack.serve.temperature, "max_tokens": self.pack.serve.max_tokens, "top_p": 1.0}

    def crisis(self, text: str) -> str | None:
        """The crisis lines when the pack's guard is on and `text` shows risk, else None."""
        if not self.pack.serve.crisis_guard:
            return None
        return crisis_reply(text, self.pack.serve.crisis_locale)

    # ------------------------------------------------------------------------------------- battle

    def start(self, rater: str) -> Battle:
        # Every pair of contestants equally often (uniform over pairs, as Chatbot Arena's default sampling), so
        # that each pair's win rate gathers votes as fast as any other's; then the sides, drawn per battle.
        roles = [c.role for c in random.choice(list(itertools.combinations(self.contestants, 2)))]
        random.shuffle(roles)  # blind: which model sits on side A is drawn per battle
        sampling = dict(self.sampling, seed=random.randrange(2 ** 31))  # one seed, sent to both sides
        models = {"a": self.side(roles[0]).model, "b": self.side(roles[1]).model}
        battle_id = self.store.new_battle(models["a"], models["b"], self.pack.system_prompt, sampling, rater)
        return Battle(id=battle_id, roles={"a": roles[0], "b": roles[1]}, models=models, sampling=sampling)

    def send(self, battle: Battle | None, prompt: str, rater: str) -> Battle:
        """Add `prompt` as the next turn of `battle`, or of a new battle when there is none or it has a vote;
        then iterate answer(battle). Raises CrisisReply for a risky prompt, BattleError when it cannot be taken."""
        prompt = (prompt or "").strip()
        if not rater:
            raise BattleError("Enter your name at the top first.")
        if not prompt:
            raise BattleError("Type a prompt first.")
        crisis = self.crisis(prompt)
        if crisis:  # answered with crisis lines, never sent to the models, not part of any battle
            raise CrisisReply(crisis)
        if battle is None or battle.voted:
            battle = self.start(rater)
        elif battle.busy:
            raise BattleError("Wait for both answers first.")
        elif battle.turns and not battle.ready:
            raise BattleError("A model failed on the last turn: press Regenerate, or start a New round.")
        battle.turns.append(Turn(prompt))
        self.store.add_turn(battle.id, len(battle.turns) - 1, prompt)
        battle.ready, battle.busy = False, True
        return battle

    def regenerate(self, battle: Battle | None) -> None:
        """Ask both sides for the last turn again; then iterate answer(battle)."""
        if battle is None or not battle.turns or battle.voted:
            raise BattleError("Nothing to regenerate: send a prompt first (after a vote, start a new round).")
        if battle.busy:
            raise BattleError("Wait for both answers first.")
        battle.turns[-1].attempt += 1
        battle.ready, battle.busy = False, True

    def answer(self, battle: Battle) -> Iterator[tuple[str, str]]:
        """Stream both answers to the last turn at once, yielding (answer A, answer B) so far about ten times a
        second and once at the end; then store both generations. A side that fails gets the error appended to
        its answer and keeps the battle from being voted on or continued until Regenerate."""
        turn = battle.turns[-1]
        idx = len(battle.turns) - 1
        turn.answers = {"a": "", "b": ""}
        q: queue.Queue = queue.Queue()
        for tag in TAGS:
            threading.Thread(target=stream_answer, daemon=True,
                             args=(self.side(battle.roles[tag]), battle.messages(tag, self.pack.system_prompt),
                                   battle.sampling, q, tag)).start()
        done: dict[str, dict] = {}
        last = 0.0
        try:
            while len(done) < 2:
                tag, kind, payload = q.get()
                if kind == "delta":
                    turn.answers[tag] += payload
                else:
                    done[tag] = payload
                    if payload["error"]:
                        failed = f"\n\n⚠️ this model failed: {payload['error']}"
                        turn.answers[tag] = (turn.answers[tag] + failed).strip()
                if time.perf_counter() - last > 0.1 or len(done) == 2:  # ~10 updates a second
                    last = time.perf_counter()
                    yield turn.answers["a"], turn.answers["b"]
            for tag, info in done.items():
                self.store.add_generation(
                    battle.id, idx, tag, battle.models[tag], info["text"], attempt=turn.attempt,
                    latency_s=info["latency_s"], first_token_s=info["first_token_s"],
                    prompt_tokens=info["prompt_tokens"], completion_tokens=info["completion_tokens"],
                    finish_reason=info["finish_reason"], error=info["error"])
            # as the store counts a vote: both answers finished (no error, a finish reason) and not blank
            battle.ready = all(not i["error"] and i["finish_reason"] and i["text"].strip() for i in done.values())
        finally:  # also when the rater leaves mid-stream: the battle is then not ready, and Regenerate works
            battle.busy = False

    def vote(self, battle: Battle | None, kind: str, rater: str) -> None:
        """Store the vote (committed to SQLite when this returns); only then does the battle reveal the names."""
        if battle is None or not battle.turns:
            raise BattleError("Send a prompt first.")
        if battle.voted:
            raise BattleError("This conversation already has a vote; start a new round.")
        if battle.busy or not battle.ready:
            raise BattleError("Wait until both answers are complete.")
        try:
            self.store.vote(battle.id, kind, rater)
        except VoteError as e:
            raise BattleError(str(e)) from None
        battle.voted = kind

    # --------------------------------------------------------------------------------------- chat

    def chat(self, message: str, history: list[dict]) -> Iterator[str]:
        """The tuned model alone: yield its answer so far. `history` is OpenAI-style messages, whose content
        may come back from the UI as content parts."""
        crisis = self.crisis(message)
        if crisis:
            yield crisis
            return
        msgs = [{"role": m["role"], "content": content_text(m["content"])} for m in history]
        msgs = with_system(msgs + [{"role": "user", "content": message}], self.pack.system_prompt)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=stream_answer, daemon=True, args=(self.tuned, msgs, self.sampling, q, "t")).start()
        text = ""
        while True:
            _, kind, payload = q.get()
            if kind == "delta":
                text += payload
                yield text
            else:
                yield (text + f"\n\n⚠️ the model failed: {payload['error']}").strip() if payload["error"] else text
                return

    # -------------------------------------------------------------------------------- leaderboard

    def leaderboard(self) -> str:
        """The statistics of core.stats over every vote in the store, as markdown (serve/leaderboard.py)."""
        battles = self.store.stats_battles()
        s = summarise(battles, self.tuned.model, self.base.model)
        rank = s if "order" in s else ranking(battles) if len(self.contestants) > 2 and battles else None
        return render(s, rank, [(c.model, c.role) for c in self.contestants])
