"""Loading a domain pack: read `domains/<name>/pack.yaml`, apply overrides, validate against core/schema.py.

Every problem is reported at once with the file, the line and the key path (or the command-line override that
set the value), as one PackError. Beyond the schema, the YAML itself is checked for what it would otherwise
read silently wrong: a key given twice (the last would win), a key that is not text (`3:`, `yes:`), bytes
that are not UTF-8.

    python -m pipeline validate --domain finance sft.learning_rate=1e-4
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from core.errors import PackError, show_path
from core.layout import check_domain, domains_dir
from core.overrides import apply_override, model_at
from core.schema import Pack


def pack_path(domain: str) -> Path:
    path = domains_dir() / check_domain(domain) / "pack.yaml"
    if not (domains_dir() / domain).is_dir():
        known = sorted(p.parent.name for p in domains_dir().glob("*/pack.yaml"))
        hint = difflib.get_close_matches(domain, known, n=1)
        fix = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise PackError(
            f"unknown domain '{domain}'{fix}: no folder {show_path(domains_dir() / domain)}. "
            f"Known domains: {', '.join(known) or 'none'}. A new domain is a copy of one of them."
        )
    if not path.is_file():
        raise PackError(f"{show_path(path)} is missing: every domain folder needs a pack.yaml (copy one).")
    return path


def load_pack(domain: str, overrides: list[str] | tuple[str, ...] = ()) -> Pack:
    """Read, override and validate `domains/<domain>/pack.yaml`; raise PackError listing every problem."""
    path = pack_path(domain)
    where = show_path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PackError(f"{where}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8")
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PackError(f"{where}{at}: YAML syntax error: {problem}. Fix the indentation or quoting there.")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PackError(f"{where}:1: the pack must be a mapping of keys (name:, base:, sft: ...)")
    raw.setdefault("name", domain)
    problems = _key_problems(node, where)
    applied: list[str] = []

    def locate(parts: list[str]) -> str:
        """Where the value at a key path came from: the last override that set it or a parent, else its line."""
        key = ".".join(parts)
        by = [item for item in applied if (key + ".").startswith(item.split("=", 1)[0].strip() + ".")]
        return f"override {by[-1]!r}" if by else f"{where}:{_line_of(node, parts) or 1}"

    refused = []
    for item in overrides:
        problem = apply_override(raw, item, locate)
        refused += problem
        applied += [] if problem else [item]
    if refused:
        raise PackError(problems + refused, "bad overrides")
    try:
        pack = Pack.model_validate(raw)
    except ValidationError as e:
        given = {item.split("=", 1)[0].strip(): item for item in overrides}
        problems += [_explain(err, where, node, raw, given) for err in e.errors()
                     if err["type"] != "invalid_key" and err["loc"][-1] != "[key]"]  # _key_problems has them
    if problems:
        raise PackError(sorted(problems, key=_line_number), f"{where} is not valid")
    pack._dir = path.parent
    return pack


def _key_problems(node: Any, where: str) -> list[str]:
    """Keys YAML would read wrongly, with their lines: a key given twice in one mapping (YAML keeps the last
    silently, so an edit to the first does nothing) and a key that is not text (`3:`, `yes:`, `~:`)."""
    problems, seen, todo = [], set(), [(node, [])]
    while todo:
        node, loc = todo.pop()
        if id(node) in seen:  # an alias points back to a node already checked
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if k.value in first:
                        key = ".".join([*loc, k.value])
                        problems.append(f"{where}:{line}: {key}: key given twice (first at line {first[k.value]}); "
                                        "YAML would keep only this one: delete one of them")
                    first.setdefault(k.value, line)
                    if k.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"):  # merge: `<<: *anchor`
                        key = ".".join([*loc, k.value])
                        as_what = k.tag.rsplit(":", 1)[-1]
                        problems.append(f"{where}:{line}: {key}: YAML reads this key as {as_what}, not text; "
                                        f"quote it (\"{k.value}\":) or fix the line")
                todo.append((v, [*loc, str(k.value)]))
        elif isinstance(node, yaml.SequenceNode):
            todo += [(v, [*loc, str(i)]) for i, v in enumerate(node.value)]
    return sorted(problems, key=_line_number)


def _explain(err: dict, where: str, node: Any, raw: dict, given: dict[str, str] | None = None) -> str:
    loc = _clean_loc(raw, err["loc"])
    key = ".".join(loc) or "(top level)"
    line = _line_of(node, loc)
    at = f"{where}:{line}" if line else where
    given = given or {}
    set_by = [item for path, item in given.items() if key == path or key.startswith(path + ".")]
    in_file = _depth_in_file(node, loc)
    created = [item for path, item in given.items() if _shared(path.split("."), loc) > in_file]
    inside = [item for path, item in given.items() if path.startswith(key + ".")]
    if set_by:  # the value came from the command line, not from the file
        at = f"override {set_by[0]!r}"
    elif created:  # a section the file lacks, which an override started (eval.judge.model=x: base_url missing)
        at = f"override {created[0]!r}"
    elif inside:  # a check of a whole section, which an override changed part of
        at = f"{at} with override {inside[0]!r}"
    if err["type"] == "extra_forbidden":
        parent_model = model_at(loc[:-1])
        choices = list(parent_model.model_fields) if parent_model else []
        hint = difflib.get_close_matches(loc[-1], choices, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys: {', '.join(choices)}"
        return f"{at}: {key}: unknown key ({fix})"
    if err["type"] == "missing":
        return f"{at}: {key}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = repr(err.get("input"))
    return f"{at}: {key}: {msg} (got {got if len(got) <= 100 else got[:97] + '...'})"


def _line_number(problem: str) -> int:
    head = problem.split(": ", 1)[0]
    return int(head.rsplit(":", 1)[1]) if head.rsplit(":", 1)[-1].isdigit() else 0


def _clean_loc(raw: Any, loc: tuple) -> list[str]:
    """pydantic's error location without the union-member tags it adds (e.g. 'list[str]')."""
    out, cur = [], raw
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            out.append(str(part))
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            out.append(str(part))
            cur = cur[part]
        elif isinstance(cur, dict) and isinstance(part, str) and not any(c in part for c in "[]-"):
            out.append(part)  # a key that is missing from the YAML
            cur = None
    return out


def _shared(a: list[str], b: list[str]) -> int:
    """How many leading parts two key paths share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _depth_in_file(node: Any, loc: list[str]) -> int:
    """How many leading parts of a key path the YAML file itself has."""
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            node = None
        if node is None:
            return depth
    return len(loc)


def _line_of(node: Any, loc: list[str]) -> int | None:
    """The 1-based line in the YAML file of a key path, or of its nearest existing parent."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == part:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line

