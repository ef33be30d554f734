"""`key.path=value` overrides and `keys`: walking the pack schema by key path.

    make domain=finance sft sft.learning_rate=1e-4 pref.method=orpo
    python -m pipeline keys        # every key with its type, default and meaning (describe)

An override is checked against the schema before it is applied (unknown keys get a did-you-mean). Its value
is parsed as YAML, so `1e-4`, `false` and `[a, b]` mean what they do in pack.yaml, except for a text key
(system_prompt, a path ...), which takes the text literally; a value that is not valid YAML is refused.
A key path that runs into a plain value where it needs a mapping or a list is refused with the line of the
file (or the earlier override) that set it.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Callable

import yaml
from pydantic import BaseModel

from core.schema import Judge, Pack


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def _is_dict(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict or annotation is dict


def model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Pack
    for part in loc:
        if model is None or part.isdigit():
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return model


def _is_text(annotation: Any) -> bool:
    """A field that holds text (str or str | None): its override value is taken literally, not as YAML."""
    return annotation is str or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                 and set(typing.get_args(annotation)) == {str, type(None)})


def _schema_walk(key: str, parts: list[str]) -> tuple[str | None, Any]:
    """(problem or None, the annotation of the value the key path sets; None inside a free-form value)."""
    model: type[BaseModel] | None = Pack
    annotation: Any = None
    for i, part in enumerate(parts):
        if annotation is not None and _is_dict(annotation):
            args = typing.get_args(annotation)  # free-form mapping (merge.config): any sub-key is allowed
            return None, (args[1] if len(args) == 2 and i == len(parts) - 1 else None)
        if annotation is not None and _is_list(annotation):
            if not part.isdigit():
                return f"override '{key}': '{'.'.join(parts[:i])}' is a list; index it with a number", None
            inner = typing.get_args(annotation)
            model = _model_in(annotation)
            annotation = None if model else (inner[0] if inner else None)
            continue
        if model is None:
            return f"override '{key}': '{'.'.join(parts[:i])}' has no sub-keys", None
        field = model.model_fields.get(part)
        if field is None:
            hint = difflib.get_close_matches(part, list(model.model_fields), n=1)
            where = ".".join(parts[:i]) or "the pack"
            fix = f"did you mean '{hint[0]}'?" if hint else f"keys there: {', '.join(model.model_fields)}"
            return f"override '{key}': {where} has no key '{part}' ({fix})", None
        annotation = field.annotation
        model = _model_in(annotation) if not (_is_list(annotation) or _is_dict(annotation)) else None
    return None, annotation


def parse_value(item: str, text: str, annotation: Any) -> tuple[Any, str | None]:
    """(value, problem) of an override's text: literal for a text field (a system prompt may hold ': ', '#' or
    quotes), YAML otherwise, so `1e-4`, `false` and `[a, b]` mean what they do in pack.yaml."""
    if _is_text(annotation):
        return (None if annotation is not str and text in ("null", "~") else text), None
    if not text.strip():
        return "", None
    try:
        return yaml.safe_load(text), None
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        return None, f"override {item!r}: the value is not valid YAML ({why}); fix its brackets or quotes"


def apply_override(raw: dict, item: str, locate: Callable[[list[str]], str] = lambda parts: "pack.yaml") -> list[str]:
    """Apply one `key.path=value` to the raw pack dict; return problems (empty when it applied).

    `locate(key path)` says where an existing value came from ('domains/x/pack.yaml:12' or an earlier
    override), for the problem when the path runs into a plain value where it needs a mapping or a list."""
    if "=" not in item:
        return [f"override '{item}': write it as key.path=value, e.g. sft.learning_rate=1e-4"]
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        return [f"override {item!r}: {key.strip()!r} is not a key path; write it as key.path=value, "
                "e.g. sft.learning_rate=1e-4"]
    problem, annotation = _schema_walk(key, parts)
    if problem:
        return [problem]
    value, problem = parse_value(item, text, annotation)
    if problem:
        return [problem]
    target: Any = raw
    for i, part in enumerate(parts):
        here, last = ".".join(parts[:i]), i == len(parts) - 1
        if isinstance(target, list):
            if not part.isdigit():
                return [f"override '{key}': '{here}' is a list ({locate(parts[:i])}); index it with a number"]
            if int(part) >= len(target):
                return [f"override '{key}': index {part} is past the end of the list ({len(target)} items)"]
            part = int(part)
        if last:
            target[part] = value
            break
        child = target[part] if isinstance(target, list) else target.get(part)
        if child is None:  # missing or `key:` with nothing: start an empty container
            child = target[part] = [] if parts[i + 1].isdigit() else {}
        want = "a list" if parts[i + 1].isdigit() else "a mapping"
        if not isinstance(child, (dict, list)) or (want == "a list") != isinstance(child, list):
            path = ".".join(parts[:i + 1])
            shown = repr(child) if len(repr(child)) <= 40 else repr(child)[:37] + "..."
            return [f"override '{item}': {path} is {shown} in {locate(parts[:i + 1])}, not {want}, so "
                    f"'{key}' cannot be set inside it; write {path} as {want} there, or override {path} whole"]
        target = child
    return []


def describe(model: type[BaseModel] = Pack, prefix: str = "") -> list[str]:
    """Every key of the schema with its type, default and doc: the text of `python -m pipeline keys`."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_in(field.annotation)
        if sub is not None and not _is_list(field.annotation) and sub is not Judge:
            lines += describe(sub, key + ".")
            continue
        default = "" if field.is_required() else f" = {field.get_default(call_default_factory=True)!r}"
        doc = f"  # {field.description}" if field.description else ""
        tname = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        lines.append(f"{key}: {tname}{default}{doc}")
    return lines
