"""Which vLLM servers a serve starts for the arena's contestants (serve.contestants, core/contestants.py).

The final model is served on serve.port as `<domain>` and the base model on serve.base_port as `<domain>-base`,
as always. Each further contestant is served under `<domain>-<role>`: by an earlier server when its model
folder is the same one (a disabled stage passes its input through, so `pref` may be `sft`'s folder), else by
a server of its own on the next port after serve.base_port. vLLM serves one model per process (several names
for it, but not several models; LoRA adapters would need one base model, and each stage's adapter sits on a
different one), so N distinct folders are N processes, sharing the CPUs or the GPU memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from core import layout
from core.contestants import Contestant, parse
from core.errors import PackError, show_path
from core.schema import Pack


@dataclass
class Server:
    """One vLLM server to start: the model folder, its served names and the contestant role of each."""

    role: str  # the serve child's role (tuned, base, or its first contestant's); also its log's name
    model: Path
    port: int
    fix: str  # how to choose another port
    names: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)


def model_of(pack: Pack, run: Path, c: Contestant) -> Path:
    """A contestant's full-weight model folder: its stage's, or for name=path the folder (a stage folder's
    model/, read from its stage.json), checked to hold a model."""
    if c.stage:
        try:
            return layout.model_dir(run, c.stage)
        except PackError as e:
            if c.role in ("tuned", "base"):
                raise
            raise PackError(f"serve.contestants: {e.problems[0]}") from None
    folder = (pack.dir / c.path).resolve()
    info = folder / layout.STAGE_FILE
    if info.is_file() and json.loads(info.read_text()).get("model"):
        folder = (folder / json.loads(info.read_text())["model"]).resolve()
    if not (folder / "config.json").is_file():
        raise PackError(f"serve.contestants: {c.role}={c.path} is {show_path(folder)}, which holds no model "
                        "(no config.json); point it at an earlier round's stage folder (runs/<domain>/merge) or "
                        "its model/ folder, relative to the pack folder")
    return folder


def plan(pack: Pack, run: Path, ends: dict) -> list[Server]:
    """The servers, tuned first and base second, with the ports of `ends` (launch.endpoints)."""
    found = [parse(e) for e in pack.serve.contestants]
    by_role = {c.role: c for c in found}
    servers = [Server(role, model_of(pack, run, by_role[role]), ends[role][0], ends[role][1])
               for role in ("tuned", "base")]
    for c in [by_role["tuned"], by_role["base"], *(c for c in found if c.role not in ("tuned", "base"))]:
        folder = model_of(pack, run, c) if c.role not in ("tuned", "base") else None
        server = servers[0 if c.role == "tuned" else 1] if folder is None else next(
            (s for s in servers if s.model == folder), None)
        if server is None:
            server = Server(c.role, folder, ends["base"][0] + len(servers) - 1,
                            "BASE_PORT or serve.base_port (further contestants take the ports after it)")
            servers.append(server)
        server.names.append(c.served_name(pack.name))
        server.roles.append(c.role)
    return servers


def arena_args(servers: list[Server], urls: list[str]) -> list[str]:
    """The arena's --contestant arguments for every contestant but tuned and base, given each server's URL."""
    out = []
    for server, url in zip(servers, urls):
        for role, name in zip(server.roles, server.names):
            if role not in ("tuned", "base"):
                out += ["--contestant", role, name, url]
    return out
