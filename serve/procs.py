"""The processes a serve starts: each in its own process group, tracked in runs/<domain>/serve/state.json.

A foreground serve ties its children to itself (they get SIGTERM when it dies, even by SIGKILL); a detached one
leaves them running, and `python -m serve stop` finds them again through state.json (checking that each pid
still runs the command we started, since pids are reused).

Every child, and everything it starts (vLLM's engine-core processes), carries SERVE_OWNER=<the serve folder>
in its environment. Stopping signals each recorded process group, then walks /proc for any process still
carrying the marker: an engine core whose API-server parent died (the group leader gone, state.json's pid
dead), or one that left the group, is found and stopped all the same.

serve_lock: one serve of a domain at a time. An exclusive fcntl lock on runs/<domain>/serve/.lock is held
while a serve starts (and for a foreground serve its whole life), so two `make serve DETACH=1` cannot both
start and overwrite each other's state.json.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from core.errors import PackError, show_path

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
ARENA_MODULE = "serve.arena"
OWNER_VAR = "SERVE_OWNER"


def owner_tag(serve_dir: Path) -> str:
    return str(Path(serve_dir).resolve())


@contextmanager
def serve_lock(serve_dir: Path, domain: str) -> Iterator[None]:
    """Hold runs/<domain>/serve/.lock exclusively, or raise PackError naming the holder. The descriptor is
    not inherited (Python opens files close-on-exec), so a detached child never keeps the lock."""
    serve_dir.mkdir(parents=True, exist_ok=True)
    path = serve_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise PackError(f"another serve of '{domain}' (pid {holder}) holds {show_path(path)}: it is starting "
                            f"or running in the foreground; wait for it, or stop it with "
                            f"`make domain={domain} stop`") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class Child:
    """One process we started (in its own process group, so stopping it also stops vLLM's engine core)."""

    role: str  # tuned | base | arena
    proc: subprocess.Popen
    url: str
    log: Path
    models: list[str] = field(default_factory=list)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # spawn makes each child the leader of its own group (setsid)


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
    """Start cmd in a new process group, marked as owned by the folder of its log (runs/<domain>/serve)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(env, **{OWNER_VAR: owner_tag(log.parent)})
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


def marked(owner: str) -> dict[int, int]:
    """{pid: process group} of every live process whose environment carries SERVE_OWNER=owner."""
    needle, found = f"{OWNER_VAR}={owner}".encode(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] not in ("Z", "X"):  # a zombie has no environment and is already dead
            found[int(entry)] = int(fields[2])
    return found


def stop_groups(pgids: list[int], owner: str, grace: float = 20) -> None:
    """SIGTERM `pgids` (groups known to be ours), every other process group that holds a process carrying our
    marker (a group id can be reused, so only those), and each such process itself (one that left its
    group); wait up to `grace` s for all of them to end and be reaped; SIGKILL what is left."""
    def signal_all(sig: int) -> None:
        live = marked(owner)
        # pgids were checked as ours by the caller (our children; state.json entries that alive_children
        # found): signal them even if a member lacks the marker
        for g in set(live.values()) | {g for g in pgids if not _group_gone(g)}:
            try:
                os.killpg(g, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in live:  # one that left its group
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def gone_within(seconds: float) -> bool:
        deadline = time.time() + seconds
        while True:
            for g in pgids:
                try:  # reap it when it is our child: a zombie leader keeps the group "alive"
                    os.waitpid(g, os.WNOHANG)
                except ChildProcessError:
                    pass
            # gone when no process of ours runs and the recorded groups are gone: their killed members are
            # reaped (by us, or by init for orphans), so the group id is free and nothing looks alive
            if not marked(owner) and all(_group_gone(g) for g in pgids):
                return True
            if time.time() >= deadline:
                return False
            time.sleep(0.2)

    signal_all(signal.SIGTERM)
    if not gone_within(grace):
        signal_all(signal.SIGKILL)
        gone_within(10)  # a killed process still has to exit and be reaped before it is gone


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # the id now belongs to someone else's group: ours is gone
        return True
    return False


def stop(children: list[Child]) -> None:
    """Stop every process the children's serve folders own, also when a leader itself already exited (its
    engine core may live on in the group)."""
    for owner in dict.fromkeys(owner_tag(c.log.parent) for c in children):
        stop_groups([c.pgid for c in children if owner_tag(c.log.parent) == owner], owner)
    for child in children:
        try:
            child.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def state_path(serve_dir: Path) -> Path:
    return serve_dir / "state.json"


def alive_children(serve_dir: Path) -> list[dict]:
    """Entries of state.json whose process group still holds a process of ours (the leader, checked by its
    command line since pids are reused, or any process carrying our SERVE_OWNER marker)."""
    path = state_path(serve_dir)
    if not path.is_file():
        return []
    groups = set(marked(owner_tag(serve_dir)).values())
    alive = []
    for entry in json.loads(path.read_text()).get("children", []):
        try:
            cmdline = Path(f"/proc/{entry['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmdline = ""
        if entry["marker"] in cmdline or entry.get("pgid", entry["pid"]) in groups:
            alive.append(entry)
    return alive


def read_state(serve_dir: Path) -> dict | None:
    try:
        return json.loads(state_path(serve_dir).read_text())
    except (OSError, ValueError):
        return None


def write_state(serve_dir: Path, children: list[Child], detached: bool, signature: str = "") -> None:
    entries = [{"role": c.role, "pid": c.proc.pid, "pgid": c.pgid, "url": c.url, "log": str(c.log),
                "models": c.models, "marker": VLLM_MODULE if c.role != "arena" else ARENA_MODULE}
               for c in children]
    tmp = state_path(serve_dir).with_suffix(".tmp")  # written whole, then renamed: never read half-written
    tmp.write_text(json.dumps({"children": entries, "detached": detached, "launcher_pid": os.getpid(),
                               "signature": signature},
                              indent=2) + "\n")
    os.replace(tmp, state_path(serve_dir))


def stop_domain(serve_dir: Path, domain: str, say=print) -> int:
    """Stop what a serve of this run started; the number of processes stopped."""
    alive = alive_children(serve_dir)
    owner = owner_tag(serve_dir)
    strays = [pid for pid, g in marked(owner).items() if g not in {e.get("pgid", e["pid"]) for e in alive}]
    state_path(serve_dir).unlink(missing_ok=True)  # first: a foreground serve then knows the stop is wanted
    for entry in alive:
        say(f"[serve] stopping {entry['role']} (process group {entry.get('pgid', entry['pid'])}, {entry['url']})")
    if strays:
        say(f"[serve] stopping {len(strays)} other process(es) of this serve (pids {', '.join(map(str, strays))})")
    stop_groups([e.get("pgid", e["pid"]) for e in alive], owner)
    if not alive and not strays:
        say(f"[serve] nothing is running for '{domain}'")
    return len(alive) + len(strays)
