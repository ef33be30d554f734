"""An arena of three contestants end to end: `python -m serve serve --detach` (what `make serve DETACH=1` runs)
with serve.contestants [final, base, sft] starts real vLLM servers (the sft model shares the final model's folder,
so its server serves it under a second name) and the arena; headless Chromium records battles, which land in
SQLite with the two contestants of each, and the Leaderboard tab shows their Bradley-Terry ranking.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, build_tiny_model, free_port, make_pack
from tests.test_arena import chromium_driver, query

PACK = """\
name: fin
system_prompt: You are a careful financial education assistant.
serve:
  contestants: [final, base, sft]
"""


@pytest.mark.slow
def test_three_contestants_battle_in_the_browser_and_the_leaderboard_ranks_them(workspace, tokenizer_dir):
    import openai
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    make_pack(workspace, "fin", PACK)
    run = workspace / "runs" / "fin"
    build_tiny_model(run / "base" / "model", tokenizer_dir, hidden=256)
    for stage, model in (("base", "model"), ("sft", "../base/model"), ("merge", "../base/model")):
        (run / stage).mkdir(exist_ok=True)
        (run / stage / "stage.json").write_text(json.dumps({"stage": stage, "model": model}))
    ports = {v: free_port() for v in ("PORT", "BASE_PORT", "ARENA_PORT")}
    env = dict(os.environ, PYTHONPATH=str(REPO), ARENA_USERS="", **{k: str(v) for k, v in ports.items()})
    env.pop("API_KEY", None)
    cli = [sys.executable, "-m", "serve"]
    started = subprocess.run([*cli, "serve", "--domain", "fin", "--detach", "serve.max_model_len=512",
                              "serve.ready_timeout_s=400", "serve.max_tokens=8"],
                             env=env, capture_output=True, text=True, timeout=900)
    driver = None
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        children = json.loads((run / "serve" / "state.json").read_text())["children"]
        assert [(c["role"], c["models"]) for c in children] == [
            ("tuned", ["fin", "fin-sft"]), ("base", ["fin-base"]), ("arena", [])]
        key = (run / "serve" / "api_key").read_text().strip()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['PORT']}/v1", api_key=key)
        assert reply_tokens(client, "fin-sft") > 0  # the third contestant answers as itself

        driver = chromium_driver(workspace / "chromium-profile")
        wait = WebDriverWait(driver, 120)
        driver.get(f"http://127.0.0.1:{ports['ARENA_PORT']}/")
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#rater textarea"))).send_keys("ada")
        driver.find_element(By.ID, "rater-btn").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "reveal"), "Rating as ada"))
        db = run / "arena.sqlite"
        roles = {"fin": "tuned", "fin-base": "base", "fin-sft": "sft"}
        for i in range(20):  # until every contestant has battled (each battle's pair is drawn at random)
            prompt = f"Question {i}: what is a bond?"
            driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(prompt)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: prompt in d.find_element(By.ID, "chat-b").text
                       and d.find_element(By.ID, "vote-a").is_enabled())
            driver.find_element(By.ID, "vote-a" if i % 3 else "vote-b").click()
            wait.until(EC.text_to_be_present_in_element((By.ID, "reveal"), "Vote recorded"))
            reveal = " ".join(driver.find_element(By.ID, "reveal").text.split())  # code spans break lines
            (a, b), = query(db, "SELECT b.model_a, b.model_b FROM battles b JOIN votes v ON v.battle_id = b.id "
                                "ORDER BY v.created DESC LIMIT 1")
            assert a != b and f"Model A was {a} ({roles[a]})" in reveal and f"model B was {b} ({roles[b]})" in reveal
            seen = {m for pair in query(db, "SELECT model_a, model_b FROM battles b JOIN votes v "
                                            "ON v.battle_id = b.id") for m in pair}
            if seen == set(roles) and i >= 4:
                break
        assert seen == set(roles)

        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Leaderboard')]").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "leaderboard"), "Ranking of 3 models (Bradley-Terry)"))
        board = " ".join(driver.find_element(By.ID, "leaderboard").text.split())
        driver.save_screenshot(str(Path("/tmp/arena_three_contestants_leaderboard.png")))
        for model, role in roles.items():
            assert f"{model} ({role})" in board
        assert "no votes yet" not in board and "95% interval" in board and "Each pair" in board
        assert "Tuned fin vs base fin-base" in board
        assert query(db, "SELECT COUNT(*) FROM votes WHERE rater = 'ada'")[0][0] == i + 1
    except Exception:
        if driver is not None:
            driver.save_screenshot("/tmp/arena_three_contestants_failure.png")
        raise
    finally:
        if driver is not None:
            driver.quit()
        stopped = subprocess.run([*cli, "stop", "--domain", "fin"], env=env, capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0 and not (run / "serve" / "state.json").exists()


def reply_tokens(client, model: str) -> int:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return reply.usage.completion_tokens
