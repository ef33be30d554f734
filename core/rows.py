"""Dataset sources -> rows in our field names, with the checks `validate` and every stage run on them.

Row kinds and their fields (a source's `columns` maps these names to the dataset's own columns):

    text    {"text": str}                                         cpt, eval.text
    chat    {"messages": [{"role", "content"}, ...]}               sft, eval.sft
            (ShareGPT turns {"from": human|gpt, "value"} are converted)
            or {"instruction", "input" (optional), "output"}       (alpaca style, turned into messages)
    pref    {"prompt", "chosen", "rejected"}: strings or message lists     pref, eval.pref
    kto     a pref pair, or {"prompt", "completion", "label": true|false}  pref with method=kto
            (one answer rated thumbs-up (true) or down (false); a pair counts as one of each)
    prompt  {"prompt": str}                                       eval.prompts

Local files are .jsonl (one object a line), .parquet, or .txt (paragraphs split on blank lines).
Every problem names the file and line; hub datasets go through the same column mapping and checks. Nothing
is coerced: a null, a number or a list where text belongs, an unknown role, an empty assistant answer or a
line that is not valid UTF-8 is a problem, never a row trained on or a traceback.
A training stage's row kind is in core/stages.py (`Stage.rows`), except kto for pref.method=kto (`stage_kind`).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import PackError, show_path
from core.schema import Pack, Source
from core.stages import BY_NAME


def stage_kind(pack: Pack, stage: str) -> str:
    """The row kind of a training stage's datasets: the stage table's, but kto rows for pref.method=kto."""
    return "kto" if stage == "pref" and pack.pref.method == "kto" else BY_NAME[stage].rows


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


def _lines(path: Path, where: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(line number, text) of a text file and its problems. Decoded a line at a time, so a stray Latin-1 byte
    is one problem naming its line instead of a UnicodeDecodeError for the whole file."""
    lines, problems = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{where}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                                "the line); save the file as UTF-8")
                continue
            lines.append((n, text.removeprefix("\ufeff") if n == 1 else text))  # the BOM some editors write
    return lines, problems


def _read_local(path: Path, where: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """(location, record) pairs and problems. Location is 'file:line' or 'file:row N'."""
    records: list[tuple[str, Any]] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # a damaged or mislabelled file is the user's to fix
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return [], [f"{where}: not a readable parquet file ({reason}); write it with pandas' "
                        "DataFrame.to_parquet, or use a .jsonl file"]
        return [(f"{where}:row {i + 1}", r) for i, r in enumerate(rows)], []
    lines, problems = _lines(path, where)
    if path.suffix == ".jsonl":
        for n, line in lines:
            if not line.strip():
                continue
            try:
                records.append((f"{where}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"{where}:{n}: not valid JSON ({e.msg} at column {e.colno}); one object a line")
    else:  # .txt: paragraphs split on blank lines
        start, para = 1, []
        for n, line in lines + [(len(lines) + 1, "")]:
            if line.strip():
                if not para:
                    start = n
                para.append(line.rstrip())
            elif para:
                records.append((f"{where}:{start}", {"text": "\n".join(para)}))
                para = []
    return records, problems


def _read_hub(src: Source) -> list[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(src.hub, src.subset, split=src.split, revision=src.revision)
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


def _kind_of(value: Any) -> str:
    """A JSON value's kind as the user wrote it, for 'got ...' in a problem."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string" if value.strip() else "only whitespace" if value else "an empty string"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _text(value: Any, name: str, empty_ok: bool = False) -> list[str]:
    """Problems of a field that must be a string (non-empty unless empty_ok)."""
    if isinstance(value, str) and (empty_ok or value.strip()):
        return []
    return [f"'{name}' must be a {'' if empty_ok else 'non-empty '}string, got {_kind_of(value)}"]


def _messages(value: Any, name: str) -> list[str]:
    """Problems of an OpenAI message list: objects with a known role and string content; an assistant turn
    (what the model learns to say) must not be empty."""
    if not isinstance(value, list) or not value:
        return [f"'{name}' must be a non-empty list of {{role: system|user|assistant, content: str}}, "
                f"got {_kind_of(value)}"]
    problems = []
    for i, m in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(m, dict):
            problems.append(f"'{at}' must be an object {{role, content}}, got {_kind_of(m)}")
            continue
        if m.get("role") not in ROLES:
            problems.append(f"'{at}.role' must be system, user or assistant, got {m.get('role')!r}")
        problems += _text(m.get("content"), f"{at}.content", empty_ok=m.get("role") != "assistant")
    return problems


def _answer(value: Any, name: str) -> list[str]:
    """A preference side: a non-empty string, or messages ending with a non-empty assistant turn."""
    if not isinstance(value, list):
        return _text(value, name)
    problems = _messages(value, name)
    if not problems and value[-1]["role"] != "assistant":
        problems.append(f"'{name}' must end with the assistant's answer, got role {value[-1]['role']!r} last")
    return problems


def _prompt(value: Any) -> list[str]:
    return _messages(value, "prompt") if isinstance(value, list) else _text(value, "prompt")


def _check(kind: str, row: dict, at: str) -> tuple[dict | None, list[str]]:
    """Normalise one mapped row; return (row or None, problems). Every problem of the row is listed."""
    if kind == "chat" and "messages" in row:
        msgs = _from_sharegpt(row["messages"])
        problems = _messages(msgs, "messages")
        if not problems and msgs[-1]["role"] != "assistant":
            problems.append(f"the last message must be the assistant's answer, got role {msgs[-1]['role']!r}")
        return (None if problems else {"messages": msgs}), [f"{at}: {p}" for p in problems]
    if kind == "kto":  # a pair, or one rated answer
        if "completion" not in row and "label" not in row:
            return _check("pref", row, at)
        kind = "unpaired"
    need = {"text": ["text"], "prompt": ["prompt"], "pref": ["prompt", "chosen", "rejected"],
            "unpaired": ["prompt", "completion", "label"], "chat": ["instruction", "output"],
            "mc": ["question", "choices", "answer"]}[kind]
    missing = [k for k in need if k not in row]
    if missing:
        return None, [f"{at}: missing column {', '.join(repr(m) for m in missing)} (present: {', '.join(row)}); "
                      "map it with the source's `columns:`"]
    if kind == "chat":
        problems = _text(row["instruction"], "instruction") + _text(row["output"], "output")
        if row.get("input") is not None:
            problems += _text(row["input"], "input", empty_ok=True)
    elif kind == "pref":
        problems = _prompt(row["prompt"]) + _answer(row["chosen"], "chosen") + _answer(row["rejected"], "rejected")
        if not problems and row["chosen"] == row["rejected"]:
            problems = ["'chosen' and 'rejected' are identical; a pair must differ"]
    elif kind == "unpaired":
        problems = _prompt(row["prompt"]) + _answer(row["completion"], "completion")
        if not isinstance(row["label"], bool):
            problems.append(f"'label' must be true (a good answer) or false (a bad one), got {_kind_of(row['label'])}")
    elif kind == "mc":  # a benchmark item: lm-evaluation-harness scores each choice after the question
        problems = _text(row["question"], "question")
        choices, answer = row["choices"], row["answer"]
        if not (isinstance(choices, list) and len(choices) == 4
                and all(isinstance(c, str) and c.strip() for c in choices)):
            problems.append(f"'choices' must be a list of 4 non-empty strings, got {_kind_of(choices)}")
        elif len(set(choices)) < 4:
            problems.append("'choices' has duplicates; the 4 choices must differ")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
            problems.append(f"'answer' must be the index 0-3 of the right choice, got {answer!r}")
    else:
        problems = _text(row[need[0]], need[0])
    if problems:
        return None, [f"{at}: {p}" for p in problems]
    if kind == "chat":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}, []
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
        try:
            records, problems = _read_local(path, where)
        except OSError as e:  # unreadable (permissions, a folder named like a file)
            return [], [f"{where}: cannot be read ({e.strerror or e}); check its permissions"]
    else:
        records, problems = _read_hub(src), []
    rows, dropped = [], 0
    inverse = {theirs: ours for ours, theirs in src.columns.items()}
    ratings = src.drop_if_rejected_rated_higher if kind in ("pref", "kto") else None
    for at, rec in records:
        if not isinstance(rec, dict):
            problems.append(f"{at}: expected one JSON object ({{...}}) a line, got {_kind_of(rec)}")
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
