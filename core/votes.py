"""The arena's vote store (SQLite, WAL): battles, turns, every generation and one vote per battle.

Every write opens its own short connection and commits before returning, so a vote the UI confirms is
on disk, and concurrent raters (Gradio handler threads, or several arena processes) never lose one:
SQLite serialises the writers, WAL lets the leaderboard read meanwhile.

Its export to battles and preference pairs is core/pairs.py (`make export-votes`). The store lives in core because votes are shared: the arena (serve/) writes them, the report and the next
preference round (pipeline/) read them.
"""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import PackError, show_path
from core.layout import arena_db, run_dir
from core.stats import WINNERS, Battle, summarise

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model_a TEXT NOT NULL,          -- served model name shown on the left (A)
    model_b TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    sampling TEXT NOT NULL DEFAULT '{}',   -- JSON: identical settings sent to both sides
    rater TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS turns (
    battle_id TEXT NOT NULL REFERENCES battles(id),
    idx INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (battle_id, idx)
);
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    battle_id TEXT NOT NULL REFERENCES battles(id),
    turn_idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,   -- Regenerate adds attempt + 1; the latest one is the answer
    side TEXT NOT NULL CHECK (side IN ('a', 'b')),
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    latency_s REAL,
    first_token_s REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    error TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS generations_turn ON generations (battle_id, turn_idx, side, attempt);
CREATE TABLE IF NOT EXISTS votes (
    battle_id TEXT PRIMARY KEY REFERENCES battles(id),   -- one vote per conversation
    kind TEXT NOT NULL CHECK (kind IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')),
    rater TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class VoteError(Exception):
    """A vote that cannot be stored (already voted, unknown battle, bad kind, an incomplete or empty answer,
    the rater's cap or rate limit); shown to the rater."""


def db_path(domain: str) -> Path:
    return arena_db(run_dir(domain))


class Store:
    """Thin access to one arena database. Safe to share across threads: no connection is kept."""

    def __init__(self, path: Path | str, max_votes_per_rater: int = 0, min_seconds_between_votes: float = 0.0):
        """The limits (serve.arena_max_votes_per_rater, serve.arena_min_seconds_between_votes; 0: none) are
        enforced here, in vote(), so that every front end (arena, API clients of the store) obeys them."""
        self.path = Path(path)
        self.max_votes_per_rater = max_votes_per_rater
        self.min_seconds_between_votes = min_seconds_between_votes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if int(row[0]) > SCHEMA_VERSION:
                raise PackError(f"{show_path(self.path)} has schema version {row[0]}, newer than this code "
                                f"({SCHEMA_VERSION}); update the appliance (git pull) before using it")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh autocommit connection, closed on exit (the stdlib context manager does not close)."""
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=60000")
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # a confirmed vote survives a power cut
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        finally:
            con.close()

    # ------------------------------------------------------------------------------------ writes

    def new_battle(self, model_a: str, model_b: str, system_prompt: str = "", sampling: dict | None = None,
                   rater: str = "") -> str:
        battle_id = uuid.uuid4().hex
        with self._connect() as con:
            con.execute("INSERT INTO battles VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (battle_id, time.time(), model_a, model_b, system_prompt,
                         json.dumps(sampling or {}, sort_keys=True), rater))
        return battle_id

    def add_turn(self, battle_id: str, idx: int, prompt: str) -> None:
        with self._connect() as con:
            con.execute("INSERT INTO turns VALUES (?, ?, ?, ?)", (battle_id, idx, prompt, time.time()))

    def add_generation(self, battle_id: str, turn_idx: int, side: str, model: str, text: str, *, attempt: int = 0,
                       latency_s: float | None = None, first_token_s: float | None = None,
                       prompt_tokens: int | None = None, completion_tokens: int | None = None,
                       finish_reason: str | None = None, error: str | None = None) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT INTO generations (battle_id, turn_idx, attempt, side, model, text, latency_s, first_token_s,"
                " prompt_tokens, completion_tokens, finish_reason, error, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (battle_id, turn_idx, attempt, side, model, text, latency_s, first_token_s, prompt_tokens,
                 completion_tokens, finish_reason, error, time.time()))

    def vote(self, battle_id: str, kind: str, rater: str) -> None:
        """Store the vote (committed, fsynced) or raise VoteError; returns only once it is on disk.

        A vote counts only on a battle whose every turn has, on both sides, a latest answer that finished
        (a finish_reason, no error) and is not blank; and only within the rater's cap and rate limit, both
        checked inside the write lock so that concurrent sessions of one rater cannot slip past them."""
        if kind not in WINNERS:
            raise VoteError(f"unknown vote {kind!r}; one of {', '.join(WINNERS)}")
        if not rater.strip():
            raise VoteError("a vote needs the rater's name")
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                if con.execute("SELECT 1 FROM battles WHERE id = ?", (battle_id,)).fetchone() is None:
                    raise VoteError(f"no battle {battle_id}")
                self._check_answers(con, battle_id)
                self._check_limits(con, rater)
                con.execute("INSERT INTO votes VALUES (?, ?, ?, ?)", (battle_id, kind, rater, time.time()))
                con.execute("UPDATE battles SET rater = ? WHERE id = ? AND rater = ''", (rater, battle_id))
                con.execute("COMMIT")
            except sqlite3.IntegrityError:
                con.execute("ROLLBACK")
                raise VoteError("this conversation already has a vote; start a new round")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    @staticmethod
    def _check_answers(con: sqlite3.Connection, battle_id: str) -> None:
        turns = [r[0] for r in con.execute("SELECT idx FROM turns WHERE battle_id = ?", (battle_id,))]
        if not turns:
            raise VoteError("this conversation has no prompt yet; send one first")
        latest = {(t, side): (text, finish, error) for t, side, text, finish, error in con.execute(
            "SELECT turn_idx, side, text, finish_reason, error FROM generations g WHERE battle_id = ? AND"
            " attempt = (SELECT MAX(attempt) FROM generations WHERE battle_id = g.battle_id"
            "            AND turn_idx = g.turn_idx AND side = g.side)", (battle_id,))}
        for t in turns:
            for side in ("a", "b"):
                text, finish, error = latest.get((t, side), ("", None, "no answer"))
                if error or finish is None:
                    raise VoteError(f"model {side.upper()}'s answer to turn {t + 1} did not complete; "
                                    "regenerate it before voting")
                if not text.strip():
                    raise VoteError(f"model {side.upper()}'s answer to turn {t + 1} is empty; "
                                    "regenerate it before voting")

    def _check_limits(self, con: sqlite3.Connection, rater: str) -> None:
        count, last = con.execute("SELECT COUNT(*), MAX(created) FROM votes WHERE rater = ?", (rater,)).fetchone()
        if self.max_votes_per_rater and count >= self.max_votes_per_rater:
            raise VoteError(f"{rater} has cast {count} votes, this arena's cap per rater "
                            "(serve.arena_max_votes_per_rater); thank you!")
        wait = (last or 0) + self.min_seconds_between_votes - time.time()
        if last is not None and wait > 0:
            raise VoteError(f"votes are at most one per {self.min_seconds_between_votes:g} s "
                            f"(serve.arena_min_seconds_between_votes): try again in {wait:.1f} s")

    # ------------------------------------------------------------------------------------- reads

    def vote_of(self, battle_id: str) -> dict | None:
        with self._connect() as con:
            row = con.execute("SELECT kind, rater, created FROM votes WHERE battle_id = ?", (battle_id,)).fetchone()
        return dict(zip(("kind", "rater", "created"), row)) if row else None

    def count_votes(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT COUNT(*) FROM votes").fetchone()[0]

    def voted_battles(self) -> list[dict]:
        """Every voted battle with both conversations (latest attempt of each turn), oldest first."""
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            battles = con.execute(
                "SELECT b.*, v.kind AS winner, v.rater AS vote_rater, v.created AS vote_time"
                " FROM battles b JOIN votes v ON v.battle_id = b.id ORDER BY v.created").fetchall()
            turns = con.execute("SELECT battle_id, idx, prompt FROM turns ORDER BY battle_id, idx").fetchall()
            gens = con.execute(
                "SELECT g.* FROM generations g JOIN ("
                "  SELECT battle_id, turn_idx, side, MAX(attempt) AS attempt FROM generations"
                "  GROUP BY battle_id, turn_idx, side) last"
                " USING (battle_id, turn_idx, side, attempt)").fetchall()
        prompts: dict[str, list[str]] = {}
        for t in turns:
            prompts.setdefault(t["battle_id"], []).append(t["prompt"])
        answers = {(g["battle_id"], g["turn_idx"], g["side"]): g for g in gens}
        out = []
        for b in battles:
            turns_b = prompts.get(b["id"], [])
            conv, errored = {}, False
            for side in ("a", "b"):
                msgs = [{"role": "system", "content": b["system_prompt"]}] if b["system_prompt"] else []
                for i, p in enumerate(turns_b):
                    g = answers.get((b["id"], i, side))
                    errored |= g is None or bool(g["error"])
                    msgs += [{"role": "user", "content": p},
                             {"role": "assistant", "content": g["text"] if g else ""}]
                conv[side] = msgs
            out.append({
                "battle_id": b["id"], "model_a": b["model_a"], "model_b": b["model_b"],
                "winner": b["winner"], "rater": b["vote_rater"], "tstamp": b["vote_time"],
                "turns": len(turns_b), "prompt": turns_b[0] if turns_b else "",
                "conversation_a": conv["a"], "conversation_b": conv["b"],
                "sampling": json.loads(b["sampling"]),
                "errored": errored,  # a side's latest answer to some turn is missing or failed
            })
        return out

    def stats_battles(self):
        """The voted battles as core.stats.Battle; answer length = characters of that side's assistant turns
        (latest attempt of each). Computed in SQL: this runs on every vote."""
        with self._connect() as con:
            rows = con.execute(
                "WITH last AS (SELECT battle_id, turn_idx, side, MAX(attempt) AS attempt FROM generations"
                "              GROUP BY battle_id, turn_idx, side),"
                " lens AS (SELECT battle_id, side, SUM(LENGTH(text)) AS n FROM generations"
                "          JOIN last USING (battle_id, turn_idx, side, attempt) GROUP BY battle_id, side)"
                " SELECT b.model_a, b.model_b, v.kind, COALESCE(la.n, 0), COALESCE(lb.n, 0)"
                " FROM votes v JOIN battles b ON b.id = v.battle_id"
                " LEFT JOIN lens la ON la.battle_id = b.id AND la.side = 'a'"
                " LEFT JOIN lens lb ON lb.battle_id = b.id AND lb.side = 'b' ORDER BY v.created").fetchall()
        return [Battle(*row) for row in rows]

    def summary(self, tuned: str, base: str) -> dict:
        return summarise(self.stats_battles(), tuned, base)
