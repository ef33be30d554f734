"""The arena end to end: a real arena process (the CLI serve/launch.py runs), driven through
gradio_client and through headless Chromium, votes found in SQLite and on the leaderboard.

The models are served by the real vLLM server of conftest's `vllm_server` fixture (a tiny random model under
a tuned and a base name). The battle logic alone (serve/battle.py, no Gradio) is tested in test_battle.py.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from core.chat import content_text
from tests.conftest import REPO, free_port, make_pack, wait_http

RUBRIC = "# Test rubric\n\nPrefer the answer that is correct and short."
PROMPTS = [{"prompt": "What is a bond?"}, {"prompt": "Explain compound interest."}]


# ---------------------------------------------------------------------------------- the arena process


@pytest.fixture(scope="module")
def arena(tmp_path_factory, vllm_server):
    """One arena process (the CLI serve/launch.py runs) on a test pack, against the vLLM server."""
    root = tmp_path_factory.mktemp("arena")
    make_pack(root, "t", """
        name: t
        description: arena test pack
        system_prompt: You are a careful test assistant.
        eval:
          prompts:
            - {path: data/eval/prompts.jsonl, licence: permissive}
        serve:
          max_tokens: 8
          temperature: 0.7
          crisis_guard: true
        """, {"data/eval/prompts.jsonl": PROMPTS})
    (root / "domains" / "t" / "rubric.md").write_text(RUBRIC)
    port = free_port()
    env = dict(os.environ, DOMAINS_DIR=str(root / "domains"), RUNS_DIR=str(root / "runs"),
               GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO))
    log = open(root / "arena.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.arena", "--domain", "t", "--tuned-url", vllm_server.base_url,
         "--base-url", vllm_server.base_url, "--tuned-model", vllm_server.tuned_model,
         "--base-model", vllm_server.base_model, "--api-key-file", str(vllm_server.api_key_file),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 120, proc)
        yield {"url": f"http://127.0.0.1:{port}/", "db": root / "runs" / "t" / "arena.sqlite",
               "tuned": vllm_server.tuned_model, "base": vllm_server.base_model, "log": root / "arena.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(db: Path, sql: str, *args):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_battle_through_gradio_client(arena):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(arena["url"], verbose=False)
    with pytest.raises(AppError, match="name"):
        client.predict("What is a bond?", api_name="/send")  # no rater name yet
    client.predict("ada", api_name="/set_rater")

    # A risky message gets the crisis lines and never reaches the models.
    *_, status = client.predict("I want to end my life", api_name="/send")
    assert "988" in status
    assert query(arena["db"], "SELECT COUNT(*) FROM turns")[0][0] == 0

    chat_a, chat_b, _, status = client.predict("What is a bond?", api_name="/send")
    assert [m["role"] for m in chat_a] == ["user", "assistant"] == [m["role"] for m in chat_b]
    assert content_text(chat_a[0]["content"]) == "What is a bond?"
    assert "vote" in status
    # multi-turn: a second prompt continues both conversations; regenerate redoes both answers of it
    chat_a, chat_b, _, _ = client.predict("And a stock?", api_name="/send")
    assert len(chat_a) == len(chat_b) == 4
    client.predict(api_name="/regenerate")

    label_a, label_b, reveal, board = client.predict(api_name="/vote_a")
    assert arena["tuned"] in reveal and arena["base"] in reveal
    # the leaderboard comes back with the vote, already counting it
    assert f"| Battles (voted) | {query(arena['db'], 'SELECT COUNT(*) FROM votes')[0][0]} |" in board
    assert label_a["label"].startswith("Model A: ") and label_b["label"].startswith("Model B: ")
    with pytest.raises(AppError, match="already has a vote"):
        client.predict(api_name="/vote_b")

    # The vote is in SQLite: one battle, its two turns, both sides' generations with timings and tokens.
    battles = query(arena["db"], "SELECT b.id, b.model_a, b.model_b, v.kind, v.rater FROM battles b "
                                 "JOIN votes v ON v.battle_id = b.id WHERE v.rater = 'ada'")
    assert len(battles) == 1
    battle_id, model_a, model_b, kind, rater = battles[0]
    assert kind == "model_a" and {model_a, model_b} == {arena["tuned"], arena["base"]}
    assert f"Model A was `{model_a}`" in reveal
    assert query(arena["db"], "SELECT idx, prompt FROM turns WHERE battle_id = ? ORDER BY idx", battle_id) == [
        (0, "What is a bond?"), (1, "And a stock?")]
    gens = query(arena["db"], "SELECT turn_idx, attempt, side, model, latency_s, completion_tokens, error "
                              "FROM generations WHERE battle_id = ?", battle_id)
    assert len(gens) == 6  # two turns, plus the regenerated second turn, on both sides
    assert all(g[4] > 0 and g[5] and g[5] <= 8 and g[6] is None for g in gens)
    assert {(g[2], g[3]) for g in gens} == {("a", model_a), ("b", model_b)}
    assert max(g[1] for g in gens if g[0] == 1) == 1
    assert query(arena["db"], "PRAGMA journal_mode")[0][0] == "wal"

    # ... and on the leaderboard, which counts every vote in the store.
    total = query(arena["db"], "SELECT COUNT(*) FROM votes")[0][0]
    board = client.predict(api_name="/leaderboard")
    assert f"| Battles (voted) | {total} |" in board
    assert f"Tuned `{arena['tuned']}` vs base `{arena['base']}`" in board

    # After the vote the next prompt starts a new, unvoted battle.
    chat_a, _, _, _ = client.predict("Next question", api_name="/send")
    assert len(chat_a) == 2
    client.predict(api_name="/vote_bothbad")
    assert query(arena["db"], "SELECT COUNT(*) FROM votes WHERE rater = 'ada'")[0][0] == 2
    # The chat tab talks to the tuned model alone: an answer, not the failure notice.
    answer = client.predict("hello", api_name="/chat")
    assert answer.strip() and "the model failed" not in answer


@pytest.mark.slow
def test_twenty_concurrent_raters_lose_no_vote(arena):
    """20 scripted raters, each in their own session, cast 10 votes each at the same time."""
    from gradio_client import Client

    kinds = ["/vote_a", "/vote_b", "/vote_tie", "/vote_bothbad"]

    def rater(i: int) -> list[str]:
        client = Client(arena["url"], verbose=False)
        client.predict(f"rater-{i:02d}", api_name="/set_rater")
        cast = []
        for j in range(10):
            client.predict(PROMPTS[j % 2]["prompt"], api_name="/send")
            kind = kinds[(i + j) % 4]
            *_, reveal, _ = client.predict(api_name=kind)
            assert "Vote recorded" in reveal
            cast.append(kind)
        return cast

    start = time.time()
    with ThreadPoolExecutor(20) as pool:
        cast = list(pool.map(rater, range(20)))
    print(f"200 battles by 20 concurrent raters in {time.time() - start:.1f}s")
    expected = {"/vote_a": "model_a", "/vote_b": "model_b", "/vote_tie": "tie", "/vote_bothbad": "tie (bothbad)"}
    for i, kinds_cast in enumerate(cast):
        stored = query(arena["db"], "SELECT v.kind FROM votes v JOIN battles b ON b.id = v.battle_id "
                                    "WHERE v.rater = ? ORDER BY v.created", f"rater-{i:02d}")
        assert [k for (k,) in stored] == [expected[k] for k in kinds_cast]
    assert query(arena["db"], "SELECT COUNT(*) FROM votes WHERE rater LIKE 'rater-%'")[0][0] == 200
    # every voted battle has both answers stored
    assert query(arena["db"], "SELECT COUNT(*) FROM votes v WHERE (SELECT COUNT(*) FROM generations g "
                              "WHERE g.battle_id = v.battle_id) < 2")[0][0] == 0


def chromium_driver(user_data_dir: Path):
    """Headless Debian chromium through chromedriver; skip with the install command when missing."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("needs Debian chromium + chromedriver: apt-get install -y chromium chromium-driver "
                    "(.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={user_data_dir}", "--window-size=1400,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_browser_battle_vote_reveals_identities(arena, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver(tmp_path / "chromium-profile")
    shot = Path("/tmp/arena_browser_test.png")
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(arena["url"])
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rater textarea"))).send_keys("grace")
        driver.find_element(By.ID, "rater-btn").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "reveal"), "Rating as grace"))
        assert "Test rubric" in driver.find_element(By.ID, "rubric").text  # the pack's rubric, beside the battle
        assert "What is a bond?" in driver.page_source  # the pack's eval prompts as examples

        driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("Define duration of a bond.")
        driver.find_element(By.ID, "send").click()
        # the vote buttons open only once both answers have finished
        wait.until(lambda d: d.find_element(By.ID, "vote-b").is_enabled())
        for side in ("chat-a", "chat-b"):
            assert "Define duration of a bond." in driver.find_element(By.ID, side).text
        assert arena["tuned"] not in driver.find_element(By.ID, "chat-a").text  # still blind
        driver.find_element(By.ID, "vote-b").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "reveal"), "Vote recorded"))
        reveal = driver.find_element(By.ID, "reveal").text
        assert arena["tuned"] in reveal and arena["base"] in reveal
        wait.until(lambda d: "Model A: " in d.find_element(By.ID, "chat-a").text)
        assert not driver.find_element(By.ID, "vote-a").is_enabled()
        driver.save_screenshot(str(shot))

        # The next prompt starts a new blind battle: the revealed names are gone.
        driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("What is a coupon?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "What is a coupon?" in d.find_element(By.ID, "chat-b").text
                   and d.find_element(By.ID, "vote-a").is_enabled())
        for side in ("chat-a", "chat-b"):
            text = driver.find_element(By.ID, side).text
            assert arena["tuned"] not in text and arena["base"] not in text
            assert "Define duration" not in text
        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Leaderboard')]").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "leaderboard"), "Battles (voted)"))
        driver.save_screenshot(str(shot.with_name("arena_browser_leaderboard.png")))
    except Exception:
        driver.save_screenshot(str(shot))
        raise
    finally:
        driver.quit()
    assert query(arena["db"], "SELECT kind FROM votes WHERE rater = 'grace'") == [("model_b",)]


def test_missing_api_key_file_is_one_clear_error(workspace):
    make_pack(workspace, "t", "name: t\n")
    r = subprocess.run([sys.executable, "-m", "serve.arena", "--domain", "t", "--tuned-url", "http://x/v1",
                        "--base-url", "http://x/v1", "--api-key-file", "nope/api_key"],
                       cwd=workspace, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: --api-key-file nope/api_key does not exist") and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ login beyond loopback


def test_arena_users_from_the_environment_or_a_file(workspace, monkeypatch):
    from core.errors import PackError
    from core.schema import ServeStage
    from serve.auth import arena_users, is_loopback, parse_users

    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.5") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("::")
    serve_dir = workspace / "runs" / "t" / "serve"
    assert arena_users(ServeStage(), serve_dir, workspace) == ({}, "")
    serve_dir.mkdir(parents=True)
    (serve_dir / "arena_users").write_text("# raters\nada:pw:with:colons\n\nbob: pw2\n")
    users, source = arena_users(ServeStage(), serve_dir, workspace)
    assert users == {"ada": "pw:with:colons", "bob": " pw2"} and source.endswith("serve/arena_users")
    monkeypatch.setenv("ARENA_USERS", "cy:pw3, dee:pw4")
    assert arena_users(ServeStage(), serve_dir, workspace)[0] == {"cy": "pw3", "dee": "pw4"}
    with pytest.raises(PackError) as e:
        parse_users("ada:pw,bob,ada:x,:nopw", "ARENA_USERS")
    assert e.value.problems == ["ARENA_USERS entry 2: expected name:password, got 'bob'",
                                "ARENA_USERS entry 3: user 'ada' given twice",
                                "ARENA_USERS entry 4: expected name:password, got '':…"]
    monkeypatch.delenv("ARENA_USERS")
    with pytest.raises(PackError, match="serve.arena_users_file: .*nope does not exist"):
        arena_users(ServeStage(arena_users_file="nope"), serve_dir, workspace)


def test_arena_beyond_loopback_without_logins_is_refused(workspace):
    make_pack(workspace, "t", "name: t\n")
    r = subprocess.run([sys.executable, "-m", "serve.arena", "--domain", "t", "--tuned-url", "http://x/v1",
                        "--base-url", "http://x/v1", "--host", "0.0.0.0"],
                       cwd=workspace, env=dict(os.environ, PYTHONPATH=str(REPO), ARENA_USERS=""),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --host 0.0.0.0 serves the arena beyond this machine, so it needs logins")


@pytest.mark.slow
def test_arena_on_every_address_needs_a_login_and_votes_as_the_user(tmp_path):
    from gradio_client import Client

    from tests.conftest import fake_openai_server

    server = fake_openai_server("sk-x", ("t", "t-base"))
    make_pack(tmp_path, "t", "name: t\nserve:\n  max_tokens: 20\n")
    (tmp_path / "key").write_text("sk-x\n")
    port = free_port()
    env = dict(os.environ, DOMAINS_DIR=str(tmp_path / "domains"), RUNS_DIR=str(tmp_path / "runs"),
               GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(REPO), ARENA_USERS="ada:s3cret-1,bob:s3cret-2")
    log = open(tmp_path / "arena.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.arena", "--domain", "t", "--tuned-url", server.url, "--base-url",
         server.url, "--api-key-file", str(tmp_path / "key"), "--host", "0.0.0.0", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url, 120, proc)
        with pytest.raises(Exception):
            Client(url, verbose=False)  # no login: the app's config and API are refused
        with pytest.raises(Exception):
            Client(url, auth=("ada", "wrong"), verbose=False)
        client = Client(url, auth=("ada", "s3cret-1"), verbose=False)
        *_, status = client.predict("What is a bond?", api_name="/send")  # no name typed: the login is the rater
        assert "vote" in status
        client.predict(api_name="/vote_a")
        assert query(tmp_path / "runs" / "t" / "arena.sqlite", "SELECT rater FROM votes") == [("ada",)]
        assert "login for 2 users from ARENA_USERS" in (tmp_path / "arena.log").read_text()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
        log.close()
        server.stop()
