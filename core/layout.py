"""Where everything lives: the domain packs and every path under `runs/<domain>/`.

    domains/<domain>/pack.yaml                 the pack (DOMAINS_DIR moves the folder)
    runs/<domain>/                             a run (RUNS_DIR moves the folder)
        <stage>/stage.json                     config, fingerprint, inputs, metrics, wall time, versions
        <stage>/model/                         the full-weight model of a model stage
        .work/<stage>/                         a stage while it runs (renamed into place when done)
        .cache/eval/                           eval scores per model fingerprint
        .lock                                  one run of a domain at a time
        serve/                                 api_key, state.json, logs, int8/ copies of served models
        arena.sqlite                           the arena's votes (SQLite, WAL)
        votes/                                 exported battles.jsonl and pairs.jsonl
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from core.errors import PackError, show_path

REPO = Path(__file__).resolve().parent.parent
STAGE_FILE = "stage.json"


def domains_dir() -> Path:
    return Path(os.environ.get("DOMAINS_DIR", REPO / "domains"))


def runs_dir() -> Path:
    return Path(os.environ.get("RUNS_DIR", REPO / "runs"))


def check_domain(domain: str) -> str:
    """A domain is a plain folder name: '', '..' or 'a/b' would read or delete outside domains/<name>."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", domain):
        raise PackError(f"domain {domain!r} is not a plain name (letters, digits, - and _); "
                        "name a folder of domains/, e.g. --domain finance")
    return domain


def run_dir(domain: str) -> Path:
    return runs_dir() / check_domain(domain)


def stage_dir(run: Path, stage: str) -> Path:
    return run / stage


def work_dir(run: Path, stage: str) -> Path:
    return run / ".work" / stage


def lock_path(run: Path) -> Path:
    return run / ".lock"


def eval_cache(run: Path) -> Path:
    return run / ".cache" / "eval"


def serve_dir(run: Path) -> Path:
    return run / "serve"


def arena_db(run: Path) -> Path:
    return run / "arena.sqlite"


def votes_dir(run: Path) -> Path:
    return run / "votes"


def read_stage(run: Path, stage: str) -> dict | None:
    """A published stage's stage.json, or None when the stage has not been built."""
    path = stage_dir(run, stage) / STAGE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_stage(folder: Path, info: dict) -> None:
    (folder / STAGE_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def model_dir(run: Path, stage: str) -> Path:
    """The full-weight model folder a stage published; a disabled stage points to its input's."""
    info = read_stage(run, stage)
    if info is None or not info.get("model"):
        raise PackError(f"stage '{stage}' has no model in {show_path(stage_dir(run, stage))}; "
                        f"run `make domain={run.name} {stage}` first")
    return (stage_dir(run, stage) / info["model"]).resolve()
