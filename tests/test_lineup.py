"""serve/lineup.py: which vLLM servers a serve starts for serve.contestants, on which ports, under which names,
and the arena's --contestant arguments; a contestant without a model is one clear error. No server starts."""
from __future__ import annotations

import json

import pytest

from core.errors import PackError
from core.pack import load_pack
from serve import lineup
from serve.launch import endpoints
from tests.conftest import make_pack


def stage(run, name: str, model: str = "model", config: bool = True):
    folder = run / name
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({"stage": name, "model": model}))
    if config and model == "model":
        (folder / "model").mkdir()
        (folder / "model" / "config.json").write_text("{}")
    return folder


@pytest.fixture
def run(workspace):
    run = workspace / "runs" / "fin"
    stage(run, "base")
    stage(run, "sft")
    stage(run, "pref", "../sft/model")  # a disabled stage: its input's folder
    stage(run, "merge")
    stage(workspace / "old" / "fin", "merge")  # an earlier round's run
    return run


def test_default_is_the_two_servers_of_before(workspace, run):
    make_pack(workspace, "fin", "name: fin\n")
    pack = load_pack("fin")
    servers = lineup.plan(pack, run, endpoints(pack))
    assert [(s.role, s.names, s.roles, s.port, s.model) for s in servers] == [
        ("tuned", ["fin"], ["tuned"], 8000, (run / "merge" / "model").resolve()),
        ("base", ["fin-base"], ["base"], 8001, (run / "base" / "model").resolve())]
    assert lineup.arena_args(servers, ["u0", "u1"]) == []


def test_further_contestants_share_a_server_per_model_folder(workspace, run, monkeypatch):
    make_pack(workspace, "fin", "name: fin\nserve:\n  contestants: [base, sft, final, pref, r1=../../old/fin/merge]\n")
    monkeypatch.setenv("BASE_PORT", "9001")
    pack = load_pack("fin")
    servers = lineup.plan(pack, run, endpoints(pack))
    assert [(s.role, s.names, s.port) for s in servers] == [
        ("tuned", ["fin"], 8000), ("base", ["fin-base"], 9001),
        ("sft", ["fin-sft", "fin-pref"], 9002),  # pref passed sft's model through: one server, two names
        ("r1", ["fin-r1"], 9003)]
    assert servers[3].model == (workspace / "old" / "fin" / "merge" / "model").resolve()  # the stage's model/
    assert lineup.arena_args(servers, ["u0", "u1", "u2", "u3"]) == [
        "--contestant", "sft", "fin-sft", "u2", "--contestant", "pref", "fin-pref", "u2",
        "--contestant", "r1", "fin-r1", "u3"]


def test_a_contestant_without_a_model_is_one_clear_error(workspace, run):
    make_pack(workspace, "fin", "name: fin\n")
    for contestants, message in [
        ("[final, base, cpt]", "serve.contestants: stage 'cpt' has no model in runs/fin/cpt; "
                               "run `make domain=fin cpt` first"),
        ("[final, base, r1=../../old/nope]", "serve.contestants: r1=../../old/nope is old/nope, which holds no model "
                                             "(no config.json); point it at an earlier round's stage folder")]:
        pack = load_pack("fin", [f"serve.contestants={contestants}"])
        with pytest.raises(PackError) as e:
            lineup.plan(pack, run, endpoints(pack))
        assert e.value.problems[0].startswith(message)
