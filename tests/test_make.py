"""The Makefile as users call it: command-line values reach the pack literally and never run in a shell,
and `clean` refuses a domain that is not a plain name and keeps the arena's votes unless VOTES=1.

Runs the real `make` with `-o setup`, so the environment is taken as it is (setup would reinstall it).
"""
from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from conftest import REPO, make_pack

PACK = "name: toy\nsystem_prompt: You are a toy.\n"


@pytest.fixture
def make(workspace):
    make_pack(workspace, "toy", PACK)
    make_pack(workspace, "other", PACK.replace("toy", "other"))
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env |= {"DOMAINS_DIR": str(workspace / "domains"), "RUNS_DIR": str(workspace / "runs")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", "-o", "setup", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
    return run


def test_override_values_reach_the_pack_literally_and_nothing_runs(make, workspace):
    trap = workspace / "ran"
    evil = (f"say $(touch {trap}1); `touch {trap}2` $(shell touch {trap}3) ${{HOME}} $$ \"dq\" 'sq' it's "
            f"a,b) (c # not a comment \\ back; touch {trap}4 && id")
    proc = make("show", "domain=toy", f"system_prompt={evil}", "sft.lora.target_modules=[q_proj, v_proj]",
                "description=")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["system_prompt"] == evil
    assert shown["sft"]["lora"]["target_modules"] == ["q_proj", "v_proj"] and shown["description"] == ""
    assert not list(workspace.glob("ran*")), "a command in an override was executed"
    assert "uid=" not in proc.stdout + proc.stderr


def test_a_line_break_in_a_value_is_one_clear_error(make, workspace):
    proc = make("show", "domain=toy", f"system_prompt=line one\n$(shell touch {workspace}/ran)")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "system_prompt=... holds a line break" in proc.stderr
    assert not (workspace / "ran").exists()


@pytest.mark.parametrize("domain", ["", "../domains", "..", "toy/../other", "a b", "*", "$(shell id)"])
@pytest.mark.parametrize("target", ["clean", "validate"])
def test_a_domain_that_is_not_a_plain_name_is_refused_before_anything_runs(make, workspace, domain, target):
    for d in ("toy", "other"):
        (workspace / "runs" / d / "sft").mkdir(parents=True)
    proc = make(target, f"domain={domain}")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert f"domain='{domain}' is not a plain name (letters, digits, - and _)" in proc.stderr
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == ["other", "toy"]
    assert (workspace / "runs/toy/sft").is_dir() and (workspace / "domains/other/pack.yaml").is_file()


def test_clean_keeps_the_votes_unless_asked(make, workspace):
    run = workspace / "runs" / "toy"
    for folder in ("base", "sft", ".work/pref", "serve", "votes"):
        (run / folder).mkdir(parents=True)
    for name in ("arena.sqlite", "arena.sqlite-wal", "votes/pairs.jsonl", ".lock", "sft/stage.json"):
        (run / name).write_text("x")
    (workspace / "runs/other/base").mkdir(parents=True)

    proc = make("clean", "domain=toy")
    assert proc.returncode == 0, proc.stderr
    assert "except its votes" in proc.stdout and "VOTES=1" in proc.stdout
    assert sorted(p.name for p in run.iterdir()) == ["arena.sqlite", "arena.sqlite-wal", "votes"]
    assert (run / "votes/pairs.jsonl").read_text() == "x"

    proc = make("clean", "domain=toy", "VOTES=1")
    assert proc.returncode == 0 and not run.exists()
    assert (workspace / "runs/other/base").is_dir()
    assert make("clean", "domain=toy").returncode == 0  # nothing left: still fine


def test_help_says_what_clean_keeps():
    proc = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True)
    assert "clean" in proc.stdout and "VOTES=1" in proc.stdout


def test_tracking_is_a_pack_key_on_the_command_line(make):
    proc = make("show", "domain=toy", "tracking=none")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["tracking"] == "none"
    assert yaml.safe_load(make("show", "domain=toy").stdout)["tracking"] == "tensorboard"
    proc = make("show", "domain=toy", "tracking=neptune")
    assert proc.returncode == 2 and "tracking" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert ".venv/bin/tensorboard --logdir" in make("-n", "domain=toy", "tensorboard").stdout


def test_serve_on_every_address_without_credentials_is_refused(make, workspace):
    """`make domain=toy serve HOST=0.0.0.0`: one error, exit 2 from the program (make says Error 2)."""
    proc = make("serve", "domain=toy", "HOST=0.0.0.0", "API_KEY=", "ARENA_USERS=")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: HOST=0.0.0.0 serves beyond this machine, so it needs an API key")
    assert "arena logins" in proc.stderr and "Traceback" not in proc.stderr
    proc = make("serve", "domain=toy", "HOST=0.0.0.0", "API_KEY=sk-given", "ARENA_USERS=ada:pw")
    assert proc.returncode == 2 and "make domain=toy merge" in proc.stderr  # past the check, to the missing run
