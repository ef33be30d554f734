"""`key.path=value` overrides and `keys`: walking the pack schema by key path.

    make domain=finance sft sft.learning_rate=1e-4 pref.method=orpo
    python -m pipeline keys        # every key with its type, default and meaning (describe)

An override is checked against the schema before it is applied (unknown keys get a did-you-mean), then its
value is parsed as YAML, so `1e-4`, `false` and `[a, b]` mean what they do in pack.yaml.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any

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


def apply_override(raw: dict, item: str) -> list[str]:
    """Apply one `key.path=value` to the raw pack dict; return problems (empty when it applied)."""
    if "=" not in item:
        return [f"override '{item}': write it as key.path=value, e.g. sft.learning_rate=1e-4"]
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    model: type[BaseModel] | None = Pack
    annotation: Any = None
    for i, part in enumerate(parts):
        if annotation is not None and _is_dict(annotation):
            break  # free-form mapping (merge.config): any sub-key is allowed
        if annotation is not None and _is_list(annotation):
            if not part.isdigit():
                return [f"override '{key}': '{'.'.join(parts[:i])}' is a list; index it with a number"]
            inner = typing.get_args(annotation)
            model = _model_in(annotation)
            annotation = None if model else (inner[0] if inner else None)
            continue
        if model is None:
            return [f"override '{key}': '{'.'.join(parts[:i])}' has no sub-keys"]
        field = model.model_fields.get(part)
        if field is None:
            hint = difflib.get_close_matches(part, list(model.model_fields), n=1)
            where = ".".join(parts[:i]) or "the pack"
            fix = f"did you mean '{hint[0]}'?" if hint else f"keys there: {', '.join(model.model_fields)}"
            return [f"override '{key}': {where} has no key '{part}' ({fix})"]
        annotation = field.annotation
        model = _model_in(annotation) if not (_is_list(annotation) or _is_dict(annotation)) else None
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    target: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(target, list):
            idx = int(part)
            if idx >= len(target):
                return [f"override '{key}': index {idx} is past the end of the list ({len(target)} items)"]
            target = target[idx]
            continue
        if part not in target or target[part] is None:
            target[part] = [] if nxt.isdigit() else {}
        target = target[part]
    last = parts[-1]
    if isinstance(target, list):
        if int(last) >= len(target):
            return [f"override '{key}': index {last} is past the end of the list ({len(target)} items)"]
        target[int(last)] = value
    else:
        target[last] = value
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
