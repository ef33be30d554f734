"""Serving: a real vLLM server (CPU build) on a tiny model, called with the official `openai` client; the
chat-template parity check; the launcher's port, key and missing-model errors.

    .venv/bin/python -m pytest -q tests/test_serve.py
"""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_openai_client_lists_chats_streams_and_needs_the_key(vllm_server):
    import openai

    client = openai.OpenAI(base_url=vllm_server.base_url, api_key=vllm_server.api_key)
    listed = {m.id for m in client.models.list()}
    assert {vllm_server.tuned_model, vllm_server.base_model} <= listed

    messages = [{"role": "user", "content": "What is a bond?"}]
    reply = client.chat.completions.create(model=vllm_server.base_model, messages=messages, max_tokens=8,
                                           temperature=0)
    assert reply.choices[0].message.content
    assert 0 < reply.usage.completion_tokens <= 8

    stream = client.chat.completions.create(model=vllm_server.tuned_model, messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # arrived as several chunks, not one body
    # Greedy decoding of the same model and prompt: streamed text equals the non-streamed one.
    assert "".join(pieces) == reply.choices[0].message.content

    anonymous = openai.OpenAI(base_url=vllm_server.base_url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        anonymous.models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model=vllm_server.tuned_model, messages=messages, max_tokens=4)


# ------------------------------------------------------------------------------ a run to serve


def make_run(root, tiny_model_dir, domain="finance"):
    """runs/<domain> with a base stage and a merge stage that passes the base through (as a disabled stage)."""
    import json
    import shutil

    run = root / "runs" / domain
    shutil.copytree(tiny_model_dir, run / "base" / "model")
    (run / "base" / "stage.json").write_text(json.dumps({"stage": "base", "model": "model"}))
    (run / "merge").mkdir(parents=True)
    (run / "merge" / "stage.json").write_text(json.dumps({"stage": "merge", "model": "../base/model"}))
    return run


PACK = """\
name: finance
system_prompt: You are a careful financial education assistant.
"""


# ---------------------------------------------------------------------------------------- parity


def test_parity_passes_when_the_served_folder_matches_training(tiny_model_dir):
    from serve.parity import check, sample_conversations

    summary = check(tiny_model_dir, tiny_model_dir, sample_conversations("Be careful."))
    assert summary["end_of_turn"] == "<|im_end|>" and 2 in summary["eos_ids"]


def test_parity_catches_a_changed_template_and_a_missing_stop_token(tmp_path, tiny_model_dir):
    import json
    import shutil

    from core.errors import PackError
    from serve.parity import check, sample_conversations

    served = tmp_path / "served"
    shutil.copytree(tiny_model_dir, served)
    # A template that looks alike but drops the newline after the role: different token ids.
    (served / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
    with pytest.raises(PackError) as e:
        check(served, tiny_model_dir, sample_conversations("Be careful."), "finance")
    text = e.value.render()
    assert "parity check failed" in text and "differs" in text and "make domain=finance merge" in text

    # The right template, but a generation config that does not stop at <|im_end|>.
    shutil.copy(tiny_model_dir / "chat_template.jinja", served / "chat_template.jinja")
    config = json.loads((served / "generation_config.json").read_text())
    (served / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [0]}))
    with pytest.raises(PackError) as e:
        check(served, tiny_model_dir, sample_conversations("Be careful."))
    assert "'<|im_end|>'" in e.value.render() and "eos_token_id is [0]" in e.value.render()


def test_serve_stops_on_a_parity_mismatch(workspace, tiny_model_dir):
    from conftest import make_pack

    from core.errors import PackError
    from core.pack import load_pack
    from serve.launch import serve

    make_pack(workspace, "finance", PACK)
    run = make_run(workspace, tiny_model_dir)
    (run / "base" / "model" / "generation_config.json").write_text('{"eos_token_id": 0}')
    with pytest.raises(PackError, match="parity"):
        serve(load_pack("finance"), run, say=lambda m: None)
    assert not (run / "serve" / "state.json").exists()


# -------------------------------------------------------------------------------------- launcher


def test_missing_merge_error_text(workspace, tiny_model_dir, capsys):
    from conftest import make_pack

    from serve.__main__ import main

    make_pack(workspace, "finance", PACK)
    import shutil

    make_run(workspace, tiny_model_dir)
    shutil.rmtree(workspace / "runs" / "finance" / "merge")
    assert main(["serve", "--domain", "finance"]) == 2
    err = capsys.readouterr().err
    assert "make domain=finance merge" in err and "Traceback" not in err


def test_taken_port_names_the_port_and_the_variable(workspace, tiny_model_dir, monkeypatch, capsys):
    import socket

    from conftest import free_port, make_pack

    from serve.__main__ import main

    make_pack(workspace, "finance", PACK)
    make_run(workspace, tiny_model_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("PORT", str(free_port()))
        monkeypatch.setenv("BASE_PORT", str(port))
        monkeypatch.setenv("ARENA_PORT", str(free_port()))
        assert main(["serve", "--domain", "finance"]) == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "BASE_PORT=" in err and "serve.base_port=" in err
    assert not (workspace / "runs" / "finance" / "serve" / "state.json").exists()


def test_serve_beyond_loopback_needs_a_key_and_arena_logins(workspace, monkeypatch, capsys):
    from conftest import make_pack

    from serve.__main__ import main

    make_pack(workspace, "finance", PACK)
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.delenv("API_KEY", raising=False)
    monkeypatch.delenv("ARENA_USERS", raising=False)
    assert main(["serve", "--domain", "finance", "--detach"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.startswith("error: HOST=0.0.0.0 serves beyond this machine, so it "
                                                       "needs an API key (API_KEY=<key>") and "Traceback" not in err
    assert "arena logins (ARENA_USERS='name:password,...'" in err and "runs/finance/serve/arena_users" in err
    assert not (workspace / "runs" / "finance" / "serve" / "api_key").exists()  # no key made up on the way

    monkeypatch.setenv("API_KEY", "sk-chosen")
    assert main(["serve", "--domain", "finance", "--detach"]) == 2
    err = capsys.readouterr().err
    assert "needs arena logins" in err and "API key" not in err
    serve_dir = workspace / "runs" / "finance" / "serve"
    (serve_dir / "arena_users").write_text("ada:pw\n")
    assert main(["serve", "--domain", "finance", "--detach"]) == 2  # past the check: the run has no merge yet
    assert "make domain=finance merge" in capsys.readouterr().err
    monkeypatch.delenv("API_KEY")
    (serve_dir / "api_key").write_text("sk-kept\n")  # a key kept from an earlier run counts as given
    assert main(["serve", "--domain", "finance", "--detach"]) == 2
    assert "make domain=finance merge" in capsys.readouterr().err
    monkeypatch.setenv("HOST", "127.0.0.1")
    (serve_dir / "arena_users").unlink()
    (serve_dir / "api_key").unlink()
    assert main(["serve", "--domain", "finance", "--detach"]) == 2  # loopback: open as before
    assert "make domain=finance merge" in capsys.readouterr().err


def test_api_key_is_generated_once_kept_private_and_api_key_wins(tmp_path, monkeypatch):
    from serve.launch import api_key

    monkeypatch.delenv("API_KEY", raising=False)
    first = api_key(tmp_path / "serve")
    path = tmp_path / "serve" / "api_key"
    assert len(first) > 20 and path.read_text().strip() == first
    assert path.stat().st_mode & 0o777 == 0o600
    assert api_key(tmp_path / "serve") == first  # the same key across restarts of the same run
    monkeypatch.setenv("API_KEY", "sk-mine")
    assert api_key(tmp_path / "serve") == "sk-mine" and path.read_text().strip() == "sk-mine"


def test_vllm_command_per_machine():
    from pathlib import Path

    from core.schema import ServeStage
    from serve.engine import vllm_command, vllm_env

    cfg = ServeStage(max_model_len=1024, kv_cache_gib=3, gpu_memory_utilization=0.45, tensor_parallel_size=2,
                     pipeline_parallel_size=3)
    cpu = vllm_command("py", Path("/m"), ["finance"], "127.0.0.1", 8000, cfg, cuda=False)
    assert cpu[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"] and "--enforce-eager" in cpu
    assert cpu[cpu.index("--served-model-name") + 1] == "finance" and "--api-key" not in cpu
    assert vllm_env("k", cfg, cuda=False)["VLLM_CPU_KVCACHE_SPACE"] == "3"
    gpu = vllm_command("py", Path("/m"), ["finance"], "127.0.0.1", 8000, cfg, cuda=True)
    assert "--enforce-eager" not in gpu and gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.45"
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "2"
    assert gpu[gpu.index("--pipeline-parallel-size") + 1] == "3" and "--pipeline-parallel-size" not in cpu
    assert vllm_env("k", cfg, cuda=True)["VLLM_API_KEY"] == "k"
    assert gpu[gpu.index("--dtype") + 1] == "auto"  # vLLM takes the model's own dtype on CUDA
    flags = set(Path("/proc/cpuinfo").read_text().split())  # vLLM emulates bfloat16 on CPUs without these
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert cpu[cpu.index("--dtype") + 1] == ("bfloat16" if native else "float32")
    compiled = vllm_command("py", Path("/m"), ["finance"], "127.0.0.1", 8000, ServeStage(compile=True), cuda=False)
    assert "--enforce-eager" not in compiled
    explicit = vllm_command("py", Path("/m"), ["x"], "h", 1, ServeStage(dtype="float16"), cuda=False)
    assert explicit[explicit.index("--dtype") + 1] == "float16"  # a dtype the pack names is used as it is


@pytest.mark.slow
def test_detached_serve_answers_as_domain_and_base_and_stop_leaves_nothing(workspace, tokenizer_dir,
                                                                           monkeypatch):
    """`python -m serve serve --detach` (what `make serve DETACH=1` runs) and `python -m serve stop`."""
    import json
    import os
    import subprocess
    import sys

    import openai
    from conftest import REPO, build_tiny_model, free_port, make_pack

    make_pack(workspace, "finance", PACK)
    run = workspace / "runs" / "finance"
    build_tiny_model(run / "base" / "model", tokenizer_dir, hidden=256)
    (run / "base" / "stage.json").write_text(json.dumps({"stage": "base", "model": "model"}))
    (run / "merge").mkdir()
    (run / "merge" / "stage.json").write_text(json.dumps({"stage": "merge", "model": "../base/model"}))
    env = dict(os.environ, PORT=str(free_port()), BASE_PORT=str(free_port()), ARENA_PORT=str(free_port()),
               PYTHONPATH=str(REPO))
    env.pop("API_KEY", None)
    cli = [sys.executable, "-m", "serve"]
    overrides = ["serve.max_model_len=512", "serve.ready_timeout_s=400"]
    pids = []
    started = subprocess.run([*cli, "serve", "--domain", "finance", "--detach", *overrides], env=env,
                             capture_output=True, text=True, timeout=900)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        key = (run / "serve" / "api_key").read_text().strip()
        assert (run / "serve" / "api_key").stat().st_mode & 0o777 == 0o600 and key in started.stdout
        for port, model in ((env["PORT"], "finance"), (env["BASE_PORT"], "finance-base")):
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
            assert [m.id for m in client.models.list()] == [model]
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4)
            assert reply.usage.completion_tokens > 0
        pids = [c["pid"] for c in json.loads((run / "serve" / "state.json").read_text())["children"]]
        assert len(pids) == 3  # tuned, base and the arena

        # a rerun with nothing changed (the second `make all`) finds everything answering and returns at once
        again = subprocess.run([*cli, "serve", "--domain", "finance", "--detach", *overrides], env=env,
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "already serving this build" in again.stdout, again.stdout + again.stderr
        assert key in again.stdout and [c["pid"] for c in json.loads(
            (run / "serve" / "state.json").read_text())["children"]] == pids
        # other settings: the detached servers are replaced
        changed = subprocess.run([*cli, "serve", "--domain", "finance", "--detach", *overrides,
                                  "serve.max_model_len=256"], env=env, capture_output=True, text=True, timeout=900)
        assert changed.returncode == 0 and "restarting them" in changed.stdout, changed.stdout + changed.stderr
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
        pids = [c["pid"] for c in json.loads((run / "serve" / "state.json").read_text())["children"]]
    finally:
        stopped = subprocess.run([*cli, "stop", "--domain", "finance"], env=env, capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0 and "stopping tuned" in stopped.stdout
    for pid in pids:  # every process group (vLLM's engine cores included) is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert not (run / "serve" / "state.json").exists()
