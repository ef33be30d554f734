"""The vote store (SQLite, WAL) and its export: one vote per conversation, no vote lost under concurrency,
exported pairs that a pack's pref stage loads as a local source."""
from __future__ import annotations

import json
import sqlite3
import threading

import pytest
import yaml

from core import pairs as pairs_cli
from core import votes
from core.errors import PackError
from core.pack import load_pack
from core.rows import load_rows
from core.votes import Store, VoteError
from tests.conftest import make_pack

SYSTEM = "You are a finance tutor."


def battle(store: Store, prompts: list[str], answers_a: list[str], answers_b: list[str],
           models=("fin", "fin-base")) -> str:
    bid = store.new_battle(*models, system_prompt=SYSTEM, sampling={"temperature": 0.7, "seed": 1})
    for i, p in enumerate(prompts):
        store.add_turn(bid, i, p)
        store.add_generation(bid, i, "a", models[0], answers_a[i], latency_s=0.5, prompt_tokens=9,
                             completion_tokens=4, finish_reason="stop")
        store.add_generation(bid, i, "b", models[1], answers_b[i], latency_s=0.4, prompt_tokens=9,
                             completion_tokens=3, finish_reason="stop")
    return bid


def test_store_schema_and_one_vote_per_conversation(tmp_path):
    store = Store(tmp_path / "arena.sqlite")
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(votes.SCHEMA_VERSION)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"battles", "turns", "generations", "votes", "meta"} <= tables
    con.close()

    bid = battle(store, ["What is a bond?"], ["A loan to an issuer."], ["A stock."])
    store.vote(bid, "model_a", "ada")
    assert store.vote_of(bid)["kind"] == "model_a"
    with pytest.raises(VoteError, match="already has a vote"):
        store.vote(bid, "model_b", "ada")
    with pytest.raises(VoteError, match="unknown vote"):
        store.vote(bid, "left", "ada")
    with pytest.raises(VoteError, match="no battle"):
        store.vote("nope", "tie", "ada")
    assert store.count_votes() == 1
    # reopening keeps everything; a store from newer code is refused with a clear message
    assert Store(store.path).vote_of(bid)["rater"] == "ada"
    con = sqlite3.connect(store.path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(PackError, match="schema version 99"):
        Store(store.path)


def test_concurrent_writers_lose_no_vote(tmp_path):
    path = tmp_path / "arena.sqlite"
    Store(path)
    errors = []

    def rater(i):
        store = Store(path)  # each rater with its own store object, as separate sessions would
        try:
            for j in range(10):
                bid = battle(store, [f"q{i}-{j}"], ["x"], ["y"])
                store.vote(bid, votes.WINNERS[(i + j) % 4], f"r{i}")
        except Exception as e:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=rater, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert Store(path).count_votes() == 200
    assert len(Store(path).voted_battles()) == 200


def test_voted_battles_use_the_latest_regeneration(tmp_path):
    store = Store(tmp_path / "arena.sqlite")
    bid = battle(store, ["q1", "q2"], ["a1", "a2"], ["b1", "b2"])
    store.add_generation(bid, 1, "a", "fin", "a2 regenerated", attempt=1, finish_reason="stop")
    store.add_generation(bid, 1, "b", "fin-base", "b2 regenerated", attempt=1, finish_reason="stop")
    unvoted = battle(store, ["q"], ["a"], ["b"])
    store.vote(bid, "tie", "bo")
    [b] = store.voted_battles()
    assert b["battle_id"] == bid and unvoted != bid
    assert b["conversation_a"] == [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                   {"role": "user", "content": "q2"},
                                   {"role": "assistant", "content": "a2 regenerated"}]
    assert b["conversation_b"][-1]["content"] == "b2 regenerated"
    [s] = store.stats_battles()
    assert (s.len_a, s.len_b) == (len("a1a2 regenerated"), len("b1b2 regenerated"))


def test_export_battles_and_pairs_load_as_a_pref_source(workspace, capsys):
    make_pack(workspace, "fin", "name: fin\nsystem_prompt: You are a finance tutor.\n")
    store = Store(votes.db_path("fin"))
    b1 = battle(store, ["What is a bond?"], ["A loan you make to an issuer."], ["A share of a company."])
    b2 = battle(store, ["Define APR."], ["Annual rate."], ["Annual percentage rate, without compounding."])
    b3 = battle(store, ["Hi"], ["Hello"], ["Hey"])
    b4 = battle(store, ["What is a yield?", "And duration?"], ["Income / price.", "Rate sensitivity."],
                ["A harvest.", "Time."])
    b5 = battle(store, ["Unvoted"], ["x"], ["y"])
    store.vote(b1, "model_a", "ada")
    store.vote(b2, "model_b", "bo")
    store.vote(b3, "tie (bothbad)", "ada")
    store.vote(b4, "model_a", "cy")
    same = battle(store, ["Same?"], ["Identical."], ["Identical."])
    store.vote(same, "model_b", "cy")  # a decisive vote on identical answers: no preference to learn

    assert pairs_cli.main(["export", "--domain", "fin"]) == 0
    printed = capsys.readouterr().out
    battles_file = workspace / "runs" / "fin" / "votes" / "battles.jsonl"
    pairs_file = workspace / "runs" / "fin" / "votes" / "pairs.jsonl"
    assert "5 voted battles" in printed and "3 preference pairs (decisive votes) (1 skipped" in printed
    assert "runs/fin/votes/pairs.jsonl" in printed

    rows = [json.loads(line) for line in battles_file.read_text().splitlines()]
    assert [r["battle_id"] for r in rows] == [b1, b2, b3, b4, same] and b5 not in battles_file.read_text()
    assert [r["winner"] for r in rows] == ["model_a", "model_b", "tie (bothbad)", "model_a", "model_b"]
    first = rows[0]
    assert first["prompt"] == "What is a bond?" and first["rater"] == "ada" and first["tstamp"] > 0
    assert (first["model_a"], first["model_b"]) == ("fin", "fin-base")
    assert first["conversation_b"][-1] == {"role": "assistant", "content": "A share of a company."}

    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs[:2]] == [
        ("What is a bond?", "A loan you make to an issuer.", "A share of a company."),
        ("Define APR.", "Annual percentage rate, without compounding.", "Annual rate.")]
    multi = pairs[2]  # multi-turn: the shared start as the prompt, each side's continuation as messages
    assert multi["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a yield?"}]
    assert [m["content"] for m in multi["chosen"]] == ["Income / price.", "And duration?", "Rate sensitivity."]
    assert [m["content"] for m in multi["rejected"]] == ["A harvest.", "And duration?", "Time."]

    # The printed snippet, pasted into the pack, makes the pairs a pref source that loads.
    snippet = printed[printed.index("pref:"):]
    pack_file = workspace / "domains" / "fin" / "pack.yaml"
    pack_file.write_text(pack_file.read_text() + snippet)
    pack = load_pack("fin")
    assert yaml.safe_load(snippet)["pref"]["datasets"][0]["path"].endswith("pairs.jsonl")
    loaded = load_rows(pack, pack.sources("pref"), "pref", "pref.datasets")
    assert len(loaded) == 3
    assert loaded[0]["chosen"] == "A loan you make to an issuer."


def test_export_without_votes_is_a_clear_error(workspace, capsys):
    make_pack(workspace, "fin", "name: fin\n")
    assert pairs_cli.main(["export", "--domain", "fin"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no votes yet for domain 'fin'") and "Traceback" not in err


@pytest.mark.slow
def test_exported_pairs_train_through_the_pref_stage(workspace, tiny_model_dir, capsys):
    """Votes -> export -> the printed snippet in pack.yaml -> `make pref` trains DPO on them."""
    from pipeline import runner

    make_pack(workspace, "fin", f"""
        name: fin
        system_prompt: {SYSTEM}
        base: {{model: {tiny_model_dir}}}
        cpt: {{enabled: false}}
        sft: {{enabled: false}}
        pref:
          learning_rate: 1.0e-3
          max_length: 128
          max_steps: 2
          logging_steps: 1
          per_device_train_batch_size: 2
          eval_fraction: 0.25
        """)
    store = Store(votes.db_path("fin"))
    for i in range(8):
        careful, careless = f"Bond {i} carries credit risk; check its rating.", "yes totally safe"
        left, right = (careful, careless) if i % 2 else (careless, careful)
        bid = battle(store, [f"Is bond {i} safe?"], [left], [right])
        store.vote(bid, "model_a" if i % 2 else "model_b", "ada")  # the careful answer wins on either side
    assert pairs_cli.main(["export", "--domain", "fin"]) == 0
    printed = capsys.readouterr().out
    pack_file = workspace / "domains" / "fin" / "pack.yaml"
    text = pack_file.read_text()
    entry = printed[printed.index("    - {path:"):].strip()
    pack_file.write_text(text.replace("pref:\n", f"pref:\n  datasets:\n    {entry}\n"))
    pack = load_pack("fin")
    runner.run(pack, "pref")
    info = json.loads((workspace / "runs" / "fin" / "pref" / "stage.json").read_text())
    m = info["metrics"]
    assert m["method"] == "dpo" and m["steps"] == 2
    assert m["train_rows"] + m["eval_rows"] == 8
    assert (workspace / "runs" / "fin" / "pref" / "model" / "model.safetensors").is_file()
    pairs = [json.loads(line) for line in (workspace / "runs" / "fin" / "votes" / "pairs.jsonl").open()]
    assert all(p["chosen"].startswith("Bond") and p["rejected"] == "yes totally safe" for p in pairs)


@pytest.mark.slow
def test_exported_votes_train_kto_with_the_both_bad_answers(workspace, tiny_model_dir, capsys):
    """Votes -> export -> the snippet with its kto line -> `make pref pref.method=kto` trains on pairs and rows."""
    from pipeline import runner

    make_pack(workspace, "fin", f"""
        name: fin
        system_prompt: {SYSTEM}
        base: {{model: {tiny_model_dir}}}
        cpt: {{enabled: false}}
        sft: {{enabled: false}}
        pref:
          method: kto
          learning_rate: 1.0e-3
          max_length: 128
          max_steps: 2
          logging_steps: 1
          per_device_train_batch_size: 2
          eval_fraction: 0.25
        """)
    store = Store(votes.db_path("fin"))
    for i in range(6):
        careful, careless = f"Bond {i} carries credit risk; check its rating.", "yes totally safe"
        store.vote(battle(store, [f"Is bond {i} safe?"], [careful], [careless]), "model_a", "ada")
    for i in range(4):
        store.vote(battle(store, [f"Is stock {i} safe?"], ["always"], ["never"]), "tie (bothbad)", "ada")
    assert pairs_cli.main(["export", "--domain", "fin"]) == 0
    printed = capsys.readouterr().out
    entries = printed[printed.index("    - {path:"):].replace("    # - {path:", "    - {path:")
    pack_file = workspace / "domains" / "fin" / "pack.yaml"
    pack_file.write_text(pack_file.read_text().replace("pref:\n", f"pref:\n  datasets:\n{entries}\n"))
    runner.run(load_pack("fin"), "pref")
    m = json.loads((workspace / "runs" / "fin" / "pref" / "stage.json").read_text())["metrics"]
    assert m["method"] == "kto" and m["steps"] == 2
    assert m["train_rows"] + m["eval_rows"] == 6 * 2 + 4 * 2  # a pair is two rows, a both-bad vote two false ones


def test_a_vote_needs_complete_non_empty_answers_on_both_sides(tmp_path):
    store = Store(tmp_path / "arena.sqlite")
    with pytest.raises(VoteError, match="no prompt yet"):
        store.vote(store.new_battle("fin", "fin-base"), "tie", "ada")
    for a, b, why in [("   \n", "fine", "A's answer to turn 1 is empty"),
                      ("fine", "", "B's answer to turn 1 is empty")]:
        with pytest.raises(VoteError, match=why):
            store.vote(battle(store, ["q"], [a], [b]), "model_a", "ada")
    failed = battle(store, ["q"], ["ok"], ["ok too"])
    store.add_generation(failed, 0, "b", "fin-base", "half an ans", attempt=1, error="connection dropped")
    with pytest.raises(VoteError, match="B's answer to turn 1 did not complete"):
        store.vote(failed, "model_a", "ada")
    cut = battle(store, ["q"], ["ok"], ["ok too"])
    store.add_generation(cut, 0, "a", "fin", "no finish reason", attempt=1)
    with pytest.raises(VoteError, match="A's answer to turn 1 did not complete"):
        store.vote(cut, "model_a", "ada")
    missing = store.new_battle("fin", "fin-base")
    store.add_turn(missing, 0, "q")
    store.add_generation(missing, 0, "a", "fin", "only one side", finish_reason="stop")
    with pytest.raises(VoteError, match="B's answer to turn 1 did not complete"):
        store.vote(missing, "tie", "ada")
    store.add_generation(failed, 0, "b", "fin-base", "regenerated", attempt=2, finish_reason="length")
    store.vote(failed, "model_a", "ada")  # the latest attempt is the one that counts
    assert store.count_votes() == 1


def test_vote_cap_and_rate_limit_per_rater(tmp_path, monkeypatch):
    path = tmp_path / "arena.sqlite"
    store = Store(path, max_votes_per_rater=2, min_seconds_between_votes=30)
    now = [1000.0]
    monkeypatch.setattr(votes.time, "time", lambda: now[0])
    store.vote(battle(store, ["q1"], ["a"], ["b"]), "model_a", "ada")
    with pytest.raises(VoteError, match="at most one per 30 s.*try again in 30.0 s"):
        store.vote(battle(store, ["q2"], ["a"], ["b"]), "model_a", "ada")
    store.vote(battle(store, ["q3"], ["a"], ["b"]), "model_b", "bo")  # another rater is not held up
    now[0] += 31
    store.vote(battle(store, ["q4"], ["a"], ["b"]), "tie", "ada")
    now[0] += 31
    with pytest.raises(VoteError, match="ada has cast 2 votes, this arena's cap per rater"):
        Store(path, max_votes_per_rater=2).vote(battle(store, ["q5"], ["a"], ["b"]), "tie", "ada")
    assert store.count_votes() == 3
    assert Store(path).vote(battle(store, ["q6"], ["a"], ["b"]), "tie", "ada") is None  # no limits: no cap


def test_export_skips_and_counts_unusable_pairs(workspace, capsys):
    make_pack(workspace, "fin", "name: fin\n")
    store = Store(votes.db_path("fin"))
    good = battle(store, ["q"], ["careful answer"], ["sloppy"])
    store.vote(good, "model_a", "ada")
    same = battle(store, ["q"], ["same"], ["same"])
    store.vote(same, "model_b", "ada")
    # votes from before the store checked answers: write them as an older arena did
    blank, errored = battle(store, ["q"], ["  "], ["text"]), battle(store, ["q"], ["x"], ["y"])
    store.add_generation(errored, 0, "a", "fin", "x", attempt=1, error="timeout")
    con = sqlite3.connect(store.path)
    con.executemany("INSERT INTO votes VALUES (?, 'model_b', 'old', 1.0)", [(blank,), (errored,)])
    con.commit()
    con.close()

    assert pairs_cli.main(["export", "--domain", "fin"]) == 0
    out = capsys.readouterr().out
    assert ("1 preference pairs (decisive votes) (3 skipped: 1 errored generation, 1 empty answer, "
            "1 identical answers)") in out
    pairs = (workspace / "runs" / "fin" / "votes" / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(p)["battle_id"] for p in pairs] == [good]


def test_both_bad_votes_export_as_kto_rows_that_a_kto_pack_loads(workspace, capsys):
    make_pack(workspace, "fin", "name: fin\nsystem_prompt: You are a finance tutor.\npref:\n  method: kto\n")
    store = Store(votes.db_path("fin"))
    good = battle(store, ["What is a bond?"], ["A loan you make to an issuer."], ["A share of a company."])
    bad = battle(store, ["Define APR."], ["Apples per row."], ["A planet."])
    multi = battle(store, ["What is a yield?", "And duration?"], ["Fruit.", "A while."], ["Bread.", "Ages."],
                   models=("fin", "fin-sft"))
    same = battle(store, ["Hi"], ["Go away."], ["Go away."])
    tie = battle(store, ["Tie?"], ["x"], ["y"])
    store.vote(good, "model_a", "ada")
    for bid in (bad, multi, same):
        store.vote(bid, "tie (bothbad)", "bo")
    store.vote(tie, "tie", "bo")  # a tie is no signal either way
    errored = battle(store, ["q"], ["x"], ["y"])  # as an older arena stored it: a failed answer, then a vote
    store.add_generation(errored, 0, "a", "fin", "x", attempt=1, error="timeout")
    con = sqlite3.connect(store.path)
    con.execute("INSERT INTO votes VALUES (?, 'tie (bothbad)', 'old', 1.0)", (errored,))
    con.commit()
    con.close()

    assert pairs_cli.main(["export", "--domain", "fin"]) == 0
    printed = capsys.readouterr().out
    assert ("5 rated answers (both-bad votes, label false; for pref.method=kto) (1 votes skipped: an errored or "
            "empty answer) -> runs/fin/votes/kto.jsonl") in printed
    rows = [json.loads(line) for line in (workspace / "runs" / "fin" / "votes" / "kto.jsonl").open()]
    assert [(r["prompt"], r["completion"], r["label"], r["model"]) for r in rows[:2]] == [
        ("Define APR.", "Apples per row.", False, "fin"), ("Define APR.", "A planet.", False, "fin-base")]
    # multi-turn: the shared start as the prompt, the side's whole continuation as the completion
    assert rows[2]["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a yield?"}]
    assert [m["content"] for m in rows[3]["completion"]] == ["Bread.", "And duration?", "Ages."]
    assert rows[3]["model"] == "fin-sft" and rows[4]["completion"] == "Go away."  # identical answers: one row
    assert {r["battle_id"] for r in rows} == {bad, multi, same}

    # The printed snippet with its kto line uncommented: with pref.method kto both files load, pairs and rows.
    snippet = printed[printed.index("pref:"):].replace("    # - {path:", "    - {path:")
    pack_file = workspace / "domains" / "fin" / "pack.yaml"
    pack_file.write_text(pack_file.read_text().replace("pref:\n  method: kto\n", snippet + "\n  method: kto\n"))
    pack = load_pack("fin")
    assert [s.path.rsplit("/", 1)[1] for s in pack.sources("pref")] == ["pairs.jsonl", "kto.jsonl"]
    loaded = load_rows(pack, pack.sources("pref"), "kto", "pref.datasets")
    assert len(loaded) == 1 + 5 and loaded[0]["chosen"] == "A loan you make to an issuer."
    assert [r["label"] for r in loaded[1:]] == [False] * 5


def test_report_ranks_all_contestants_when_more_than_two_battled(workspace):
    from core.layout import run_dir
    from pipeline.report import arena_section

    make_pack(workspace, "fin", "name: fin\n")
    store = Store(votes.db_path("fin"))
    for models, kind in [(("fin", "fin-base"), "model_a"), (("fin-sft", "fin-base"), "model_a"),
                         (("fin", "fin-sft"), "model_a"), (("fin", "fin-base"), "tie")]:
        store.vote(battle(store, ["q"], ["a"], ["b"], models=models), kind, "ada")
    rows = dict(arena_section(run_dir("fin"), "fin"))
    assert rows["battles voted (tuned vs base)"] == "2"
    ranking = rows["Bradley-Terry ranking (Elo scale, bootstrap 95%)"].split("; ")
    assert [r.split()[0] for r in ranking] == ["fin", "fin-sft", "fin-base"]
