"""The processes a serve starts: each in its own process group, tracked in runs/<domain>/serve/state.json.

A foreground serve ties its children to itself (they get SIGTERM when it dies, even by SIGKILL); a detached one
leaves them running, and `python -m serve stop` finds them again through state.json (checking that each pid
still runs the command we started, since pids are reused).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
ARENA_MODULE = "serve.arena"


@dataclass
class Child:
    """One process we started (in its own process group, so stopping it also stops vLLM's engine core)."""

    role: str  # tuned | base | arena
    proc: subprocess.Popen
    url: str
    log: Path
    models: list[str] = field(default_factory=list)


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


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


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
        try:  # reap it when it is our child: a zombie leader keeps the group "alive"
            os.waitpid(pid, os.WNOHANG)
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


def state_path(serve_dir: Path) -> Path:
    return serve_dir / "state.json"


def alive_children(serve_dir: Path) -> list[dict]:
    """Processes a previous serve of this run started and that are still ours (pid reuse is checked)."""
    path = state_path(serve_dir)
    if not path.is_file():
        return []
    alive = []
    for entry in json.loads(path.read_text()).get("children", []):
        try:
            cmdline = Path(f"/proc/{entry['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry["marker"] in cmdline:
            alive.append(entry)
    return alive


def write_state(serve_dir: Path, children: list[Child], detached: bool) -> None:
    entries = [{"role": c.role, "pid": c.proc.pid, "url": c.url, "log": str(c.log), "models": c.models,
                "marker": VLLM_MODULE if c.role != "arena" else ARENA_MODULE} for c in children]
    tmp = state_path(serve_dir).with_suffix(".tmp")  # written whole, then renamed: never read half-written
    tmp.write_text(json.dumps({"children": entries, "detached": detached, "launcher_pid": os.getpid()},
                              indent=2) + "\n")
    os.replace(tmp, state_path(serve_dir))


def stop_domain(serve_dir: Path, domain: str, say=print) -> int:
    """Stop what a serve of this run started; the number of processes stopped."""
    alive = alive_children(serve_dir)
    state_path(serve_dir).unlink(missing_ok=True)  # first: a foreground serve then knows the stop is wanted
    for entry in alive:
        say(f"[serve] stopping {entry['role']} (pid {entry['pid']}, {entry['url']})")
        stop_pid(entry["pid"])
    if not alive:
        say(f"[serve] nothing is running for '{domain}'")
    return len(alive)
