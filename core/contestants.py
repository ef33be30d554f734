"""The arena's contestants (`serve.contestants`): which models battle, and the name each is served under.

    serve:
      contestants: [final, base, sft, round1=../../runs/finance-r1/merge]

An entry is a published model stage of this run (`final` the merged model, `base`, `cpt`, `sft`, `pref`) or
`name=path`, a model folder (or a stage folder with stage.json, as runs/<domain>/merge) of an earlier round,
relative to the pack folder. `final` and `base` are always among them: they are the API's two models
(serve.port, serve.base_port) and the leaderboard's headline pair. A contestant's role is `tuned` for final,
else the stage or the name; its served model name is `<domain>` for final, `<domain>-<role>` for the others.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT = ("final", "base")
STAGE_KEYWORDS = ("final", "base", "cpt", "sft", "pref")  # the model stages, final for merge's
RESERVED = {"tuned", "merge", "eval", "report", "arena", *STAGE_KEYWORDS}  # arena: the serve child of that role
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class Contestant:
    role: str  # tuned, base, cpt, sft, pref or the entry's name
    stage: str | None  # the run's stage whose model it is (merge for final), or None for a path
    path: str | None = None  # name=path: the folder, relative to the pack folder

    def served_name(self, domain: str) -> str:
        return domain if self.role == "tuned" else f"{domain}-{self.role}"


def parse(entry: str) -> Contestant:
    """One entry of serve.contestants; ValueError says what is wrong and what to write (see problems())."""
    entry = entry.strip()
    if entry in STAGE_KEYWORDS:
        return Contestant("tuned", "merge") if entry == "final" else Contestant(entry, entry)
    if entry in ("merge", "tuned"):
        raise ValueError(f"{entry!r}: write final for the merged model")
    name, eq, path = entry.partition("=")
    name, path = name.strip(), path.strip()
    if not eq or not path:
        raise ValueError(f"{entry!r} is neither a model stage ({', '.join(STAGE_KEYWORDS)}) nor name=path of an "
                         "earlier round's model folder, e.g. round1=../../runs/finance-r1/merge")
    if name in RESERVED or not NAME.match(name):
        why = "is reserved" if name in RESERVED else "is not a plain lower-case name (letters, digits, - and _)"
        raise ValueError(f"{entry!r}: the name {name!r} {why}; choose another, e.g. round1={path}")
    return Contestant(name, None, path)


def problems(entries: list[str]) -> list[str]:
    """Everything wrong with a serve.contestants list, for the schema to report at once."""
    found, out = [], []
    for entry in entries:
        try:
            found.append(parse(entry))
        except ValueError as e:
            out.append(str(e))
    roles = [c.role for c in found]
    twice = sorted({r for r in roles if roles.count(r) > 1})
    if twice:
        out.append(f"{', '.join(twice)} given twice; each contestant once")
    missing = [k for k, role in (("final", "tuned"), ("base", "base")) if role not in roles]
    if missing and not out:
        out.append(f"add {' and '.join(missing)}: the arena always has the final and the base model (the API's two "
                   f"models), e.g. [final, base, sft]")
    return out
