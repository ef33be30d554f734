"""The processes a serve starts (serve/procs.py): the serve lock against two starts of one domain, and stop
reaching every process of a serve, with real process trees started the way procs.spawn starts vLLM.

    .venv/bin/python -m pytest -q tests/test_procs.py
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# A stand-in for vLLM's API server: it starts an "engine core" in its own group (as vLLM's multiprocessing
# child is) and one that leaves the group (setsid), writes their pids, then sleeps.
TREE = textwrap.dedent("""
    import os, subprocess, sys, time
    core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    escaped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    open(sys.argv[1], "w").write(f"{core.pid} {escaped.pid}")
    time.sleep(600)
""")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # an orphan killed but not yet reaped by init is dead


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise TimeoutError(path)


def test_stop_reaches_engine_cores_whose_leader_died_first(tmp_path):
    from serve.procs import VLLM_MODULE, alive_children, spawn, stop_domain, write_state

    serve_dir = tmp_path / "runs" / "finance" / "serve"
    pids_file = tmp_path / "pids"
    # detached, as `make serve DETACH=1` starts it; the module name is in argv so the pid check of state.json
    # recognises it
    child = spawn("tuned", [sys.executable, "-c", TREE, str(pids_file), VLLM_MODULE], dict(os.environ),
                  serve_dir / "tuned.log", "http://127.0.0.1:1/v1", ["finance"], tie_to_parent=False)
    core, escaped = map(int, wait_for(pids_file).split())
    write_state(serve_dir, [child], detached=True)
    os.kill(child.proc.pid, signal.SIGKILL)  # the API server dies; its engine cores live on
    child.proc.wait()
    assert alive(core) and alive(escaped)
    assert [e["role"] for e in alive_children(serve_dir)] == ["tuned"]  # its group still holds our process

    said = []
    assert stop_domain(serve_dir, "finance", say=said.append) == 2
    deadline = time.time() + 10
    while (alive(core) or alive(escaped)) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(core) and not alive(escaped), said
    assert "stopping tuned (process group" in said[0] and f"pids {escaped}" in said[1]
    assert not (serve_dir / "state.json").exists()
    assert stop_domain(serve_dir, "finance", say=said.append) == 0 and "nothing is running" in said[-1]


def test_stop_of_one_domain_leaves_another_domains_processes(tmp_path):
    from serve.procs import spawn, stop

    mine = spawn("tuned", [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ),
                 tmp_path / "a" / "serve" / "tuned.log", "", [], tie_to_parent=True)
    other = spawn("tuned", [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ),
                  tmp_path / "b" / "serve" / "tuned.log", "", [], tie_to_parent=True)
    try:
        stop([mine])
        assert mine.proc.poll() is not None and other.proc.poll() is None
    finally:
        stop([other])
    assert other.proc.poll() is not None


def test_a_second_serve_of_a_domain_is_refused_while_one_holds_the_lock(workspace, capsys):
    """Two `make serve DETACH=1` of one domain: the second one finds the first one's lock and stops."""
    from conftest import REPO, make_pack

    from serve.__main__ import main

    make_pack(workspace, "finance", "name: finance\n")
    serve_dir = workspace / "runs" / "finance" / "serve"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from serve.procs import serve_lock\n"
         "with serve_lock(Path(sys.argv[1]), 'finance'):\n    print('locked', flush=True); time.sleep(600)",
         str(serve_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["serve", "--domain", "finance", "--detach"]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and f"another serve of 'finance' (pid {holder.pid}) holds" in err
        assert "runs/finance/serve/.lock" in err and "make domain=finance stop" in err
        assert not (serve_dir / "state.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock goes with its holder: the next serve gets past it (and stops at the missing merge stage)
    assert main(["serve", "--domain", "finance", "--detach"]) == 2
    assert "make domain=finance merge" in capsys.readouterr().err
