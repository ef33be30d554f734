"""Dataset sources -> rows in our field names, with the checks `validate` and every stage run on them.

Row kinds and their fields (a source's `columns` maps these names to the dataset's own columns):

    text    {"text": str}                                         cpt, eval.text
    chat    {"messages": [{"role", "content"}, ...]}               sft, eval.sft
            (ShareGPT turns {"from": human|gpt, "value"} are converted)
            or {"instruction", "input" (optional), "output"}       (alpaca style, turned into messages)
    pref    {"prompt", "chosen", "rejected"}: strings or message lists     pref, eval.pref
    prompt  {"prompt": str}                                       eval.prompts

Local files are .jsonl (one object a line), .parquet, or .txt (paragraphs split on blank lines).
Every problem names the file and line; hub datasets go through the same column mapping and checks.
A training stage's row kind is in core/stages.py (`Stage.rows`).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import PackError, show_path
from core.schema import Pack, Source

EVAL_KIND = {"text": "text", "sft": "chat", "pref": "pref", "prompts": "prompt"}
ROLES = ("system", "user", "assistant")


def source_file(src: Source, pack_dir: Path) -> Path | None:
    return (pack_dir / src.path) if src.path else None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_local(path: Path, where: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """(location, record) pairs and problems. Location is 'file:line' or 'file:row N'."""
    records: list[tuple[str, Any]] = []
    problems: list[str] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{where}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    problems.append(f"{where}:{n}: not valid JSON ({e.msg} at column {e.colno}); one object a line")
    elif path.suffix == ".txt":
        start, para = 1, []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], 1):
            if line.strip():
                if not para:
                    start = n
                para.append(line.rstrip())
            elif para:
                records.append((f"{where}:{start}", {"text": "\n".join(para)}))
                para = []
    else:  # .parquet
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # a damaged file is the user's to fix
            return [], [f"{where}: cannot read parquet ({e})"]
        records = [(f"{where}:row {i + 1}", r) for i, r in enumerate(rows)]
    return records, problems


def _read_hub(src: Source) -> list[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(src.hub, src.subset, split=src.split)
    except Exception as e:
        raise PackError(
            f"hub dataset '{src.hub}' (split {src.split}) could not be loaded: {str(e).splitlines()[0]}. "
            "Offline runs need it in the local cache; run with OFFLINE=0 to download it."
        )
    if src.max_rows:
        ds = ds.select(range(min(src.max_rows, len(ds))))
    return [(f"{src.hub}[{src.split}] row {i + 1}", r) for i, r in enumerate(ds)]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _from_sharegpt(value: Any) -> Any:
    """ShareGPT turns ({from: human|gpt, value}) as OpenAI messages; anything else unchanged."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "from" in m and "value" in m for m in value):
        return [{"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]} for m in value]
    return value


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value
    )


def _check(kind: str, row: dict, at: str) -> tuple[dict | None, list[str]]:
    """Normalise one mapped row; return (row or None, problems)."""
    need = {"text": ["text"], "prompt": ["prompt"], "pref": ["prompt", "chosen", "rejected"]}.get(kind)
    if kind == "chat":
        if "messages" not in row:
            need = ["instruction", "output"]
        else:
            msgs = _from_sharegpt(row["messages"])
            if not _is_messages(msgs) or not msgs:
                return None, [f"{at}: 'messages' must be a list of {{role: system|user|assistant, content: str}}"]
            if msgs[-1]["role"] != "assistant":
                return None, [f"{at}: the last message must be the assistant's answer"]
            return {"messages": msgs}, []
    missing = [k for k in need if k not in row]
    if missing:
        return None, [f"{at}: missing column {', '.join(repr(m) for m in missing)} (present: {', '.join(row)}); "
                      "map it with the source's `columns:`"]
    if kind == "chat":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}, []
    problems = []
    for k in need:
        v = row[k]
        ok = bool(v.strip()) if isinstance(v, str) else kind == "pref" and _is_messages(v) and len(v) > 0
        if not ok:
            problems.append(f"{at}: '{k}' must be a non-empty string" + (" or message list" if kind == "pref" else ""))
    if problems:
        return None, problems
    if kind == "pref" and row["chosen"] == row["rejected"]:
        return None, [f"{at}: 'chosen' and 'rejected' are identical; a pair must differ"]
    return {k: row[k] for k in need}, []


def _rejected_rated_higher(rec: dict, ratings: dict[str, str], at: str) -> tuple[bool, str | None]:
    """(drop?, problem) for one pair under drop_if_rejected_rated_higher."""
    values = {}
    for side, column in ratings.items():
        value = rec.get(column)
        try:
            values[side] = float(value)
        except (TypeError, ValueError):
            present = ", ".join(rec)
            return False, (f"{at}: rating column {column!r} ({side}) is missing or not a number (got {value!r}; "
                           f"present: {present}); fix drop_if_rejected_rated_higher")
    return values["rejected"] > values["chosen"], None


def load_source(src: Source, pack_dir: Path, kind: str) -> tuple[list[dict], list[str]]:
    """Rows of one source in our field names, and the problems found (file:line each)."""
    if src.path:
        path = pack_dir / src.path
        where = show_path(path)
        if not path.is_file():
            return [], [f"{where}: file not found (listed as path: {src.path}); create it or fix the path"]
        records, problems = _read_local(path, where)
    else:
        records, problems = _read_hub(src), []
    rows, dropped = [], 0
    inverse = {theirs: ours for ours, theirs in src.columns.items()}
    ratings = src.drop_if_rejected_rated_higher if kind == "pref" else None
    for at, rec in records:
        if not isinstance(rec, dict):
            problems.append(f"{at}: expected a JSON object, got {type(rec).__name__}")
            continue
        if ratings:
            rated, rating_problem = _rejected_rated_higher(rec, ratings, at)
            if rating_problem:
                problems.append(rating_problem)
                continue
            if rated:
                dropped += 1
                continue
        mapped = {inverse.get(k, k): v for k, v in rec.items()}
        row, row_problems = _check(kind, mapped, at)
        problems += row_problems
        if row is not None:
            rows.append(row)
    if src.path and src.max_rows:
        rows = rows[: src.max_rows]
    if dropped:
        print(f"{src.label}: dropped {dropped} pair(s) whose rejected answer is rated higher "
              f"({ratings['rejected']} > {ratings['chosen']})", file=sys.stderr)
    if not rows and not problems:
        problems.append(f"{src.label}: the dataset is empty")
    return rows, problems


def load_rows(pack: Pack, sources: list[Source], kind: str, what: str) -> list[dict]:
    """All rows of a list of sources; PackError listing every problem, or when there are none."""
    rows, problems = [], []
    for src in sources:
        r, p = load_source(src, pack.dir, kind)
        rows += r
        problems += p
    if problems:
        raise PackError(problems, f"the data of {what} has problems")
    if not rows:
        raise PackError(f"{what}: no data. List a dataset under it in {show_path(pack.dir / 'pack.yaml')}, "
                        f"or disable it with {what.split('.')[0]}.enabled=false")
    return rows
