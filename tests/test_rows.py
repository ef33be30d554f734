"""Bad data files: every problem of every file at once, file:line each, from `validate` and from load_rows.

The files are written byte for byte in the test (invalid UTF-8, nulls, numbers where text belongs, empty
answers, lines that are not objects, a .parquet that is not parquet), and each expected line is exact.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, make_pack

from core.errors import PackError
from core.pack import load_pack
from core.rows import load_rows, load_source
from pipeline.validate import validate_data

PACK = """\
    name: toy
    cpt:
      datasets:
        - {path: data/cpt.jsonl, licence: permissive}
        - {path: data/notes.txt, licence: permissive}
    sft:
      datasets: [{path: data/sft.jsonl, licence: permissive}]
    pref:
      datasets: [{path: data/pref.jsonl, licence: permissive}]
    eval:
      text: [{path: data/eval/text.parquet, licence: permissive}]
      prompts: [{path: data/eval/prompts.jsonl, licence: permissive}]
"""
OK_CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


FILES = {
    "data/cpt.jsonl": lines(
        {"text": "fine"},
        b'{"text": "caf\xe9 au lait"}',  # Latin-1, not UTF-8
        {"text": 5},
        {"text": None},
        [1, 2],
        7,
        {"text": "   "},
    ),
    "data/notes.txt": b"A good paragraph.\n\nna\xefve line\nstill the same paragraph\n",
    "data/sft.jsonl": lines(
        OK_CHAT,
        {"instruction": None, "output": "a"},
        {"instruction": "q", "output": ["a"]},
        {"instruction": "q", "input": 3, "output": " "},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]},
        {"messages": [{"role": "user", "content": "q"}, "a"]},
        {"messages": []},
        {"conversations": "x"},
    ),
    "data/pref.jsonl": lines(
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": "", "rejected": None},
        {"prompt": "p", "chosen": [{"role": "assistant", "content": " "}], "rejected": "r"},
        {"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": 1.5},
        {"prompt": ["p"], "chosen": "c", "rejected": "r"},
    ),
    "data/eval/text.parquet": b"PAR1 this is a renamed CSV, not parquet\n",
    "data/eval/prompts.jsonl": b'{"prompt": "ok"}\n\xff\xfe\n',
}

EXPECTED = [
    "domains/toy/data/cpt.jsonl:2: not valid UTF-8 (byte 0xe9 at byte 14 of the line); save the file as UTF-8",
    "domains/toy/data/cpt.jsonl:3: 'text' must be a non-empty string, got the number 5",
    "domains/toy/data/cpt.jsonl:4: 'text' must be a non-empty string, got null",
    "domains/toy/data/cpt.jsonl:5: expected one JSON object ({...}) a line, got a list",
    "domains/toy/data/cpt.jsonl:6: expected one JSON object ({...}) a line, got the number 7",
    "domains/toy/data/cpt.jsonl:7: 'text' must be a non-empty string, got only whitespace",
    "domains/toy/data/notes.txt:3: not valid UTF-8 (byte 0xef at byte 3 of the line); save the file as UTF-8",
    "domains/toy/data/sft.jsonl:2: 'instruction' must be a non-empty string, got null",
    "domains/toy/data/sft.jsonl:3: 'output' must be a non-empty string, got a list",
    "domains/toy/data/sft.jsonl:4: 'output' must be a non-empty string, got only whitespace",
    "domains/toy/data/sft.jsonl:4: 'input' must be a string, got the number 3",
    "domains/toy/data/sft.jsonl:5: 'messages[0].content' must be a string, got null",
    "domains/toy/data/sft.jsonl:6: 'messages[0].role' must be system, user or assistant, got 'bot'",
    "domains/toy/data/sft.jsonl:7: 'messages[1].content' must be a non-empty string, got only whitespace",
    "domains/toy/data/sft.jsonl:8: 'messages[1]' must be an object {role, content}, got a string",
    "domains/toy/data/sft.jsonl:9: 'messages' must be a non-empty list of {role: system|user|assistant, "
    "content: str}, got an empty list",
    "domains/toy/data/sft.jsonl:10: missing column 'instruction', 'output' (present: conversations); "
    "map it with the source's `columns:`",
    "domains/toy/data/pref.jsonl:2: 'chosen' must be a non-empty string, got an empty string",
    "domains/toy/data/pref.jsonl:2: 'rejected' must be a non-empty string, got null",
    "domains/toy/data/pref.jsonl:3: 'chosen[0].content' must be a non-empty string, got only whitespace",
    "domains/toy/data/pref.jsonl:4: 'chosen' must end with the assistant's answer, got role 'user' last",
    "domains/toy/data/pref.jsonl:4: 'rejected' must be a non-empty string, got the number 1.5",
    "domains/toy/data/pref.jsonl:5: 'prompt[0]' must be an object {role, content}, got a string",
]


@pytest.fixture
def bad_pack(workspace):
    folder = make_pack(workspace, "toy", PACK)
    for rel, content in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    return folder


def test_validate_lists_every_data_problem_with_its_line(bad_pack):
    problems = validate_data(load_pack("toy"))
    parquet = [p for p in problems if "text.parquet" in p]
    assert [p for p in problems if p not in parquet][:len(EXPECTED)] == EXPECTED
    assert len(parquet) == 1 and parquet[0].startswith("domains/toy/data/eval/text.parquet: not a readable parquet "
                                                       "file (") and "use a .jsonl file" in parquet[0]
    assert problems[-1] == ("domains/toy/data/eval/prompts.jsonl:2: not valid UTF-8 (byte 0xff at byte 1 of the "
                            "line); save the file as UTF-8")
    assert len(problems) == len(EXPECTED) + 2


@pytest.mark.parametrize("stage, kind, first", [("cpt", "text", 0), ("sft", "chat", 7), ("pref", "pref", 17)])
def test_the_stages_load_rows_refuses_the_same_rows(bad_pack, stage, kind, first):
    pack = load_pack("toy")
    with pytest.raises(PackError) as err:
        load_rows(pack, pack.sources(stage), kind, f"{stage}.datasets")
    expected = [p for p in EXPECTED if f"data/{stage}." in p or (stage == "cpt" and "notes.txt" in p)]
    assert err.value.problems == expected and expected[0] == EXPECTED[first]


def test_good_rows_still_load_and_bom_is_tolerated(workspace):
    folder = make_pack(workspace, "toy", PACK)
    (folder / "data").mkdir()
    (folder / "data/sft.jsonl").write_bytes(b"\xef\xbb\xbf" + lines(
        OK_CHAT, {"instruction": "q", "input": None, "output": "a"},
        {"prompt": "x", "messages": [{"role": "system", "content": ""}, *OK_CHAT["messages"]]}))
    pack = load_pack("toy")
    rows = load_rows(pack, pack.sources("sft"), "chat", "sft.datasets")
    assert [len(r["messages"]) for r in rows] == [2, 2, 3]


def test_validate_cli_exits_2_without_traceback_on_bad_bytes(bad_pack, workspace):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "validate", "--domain", "toy"],
                          capture_output=True, text=True, env=env, cwd=workspace)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: domain 'toy' has problems ({len(EXPECTED) + 2}):")
    assert EXPECTED[0] in proc.stderr


def test_kto_rows_take_pairs_and_rated_answers_with_one_problem_per_bad_line(workspace):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"},
            {"prompt": "q", "completion": "fine", "label": True},
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "no"}],
             "label": False},
            {"prompt": "q", "completion": "a", "label": "yes"},
            {"prompt": "q", "completion": " ", "label": 1},
            {"prompt": "q", "label": True},
            {"prompt": "q", "chosen": "same", "rejected": "same"}]
    make_pack(workspace, "kto", "name: kto\ncpt: {enabled: false}\nsft: {enabled: false}\npref:\n  method: kto\n"
                                "  datasets: [{path: data/pref.jsonl, licence: permissive}]\n", {"data/pref.jsonl": rows})
    pack = load_pack("kto")
    where = "domains/kto/data/pref.jsonl"
    assert validate_data(pack) == [
        f"{where}:4: 'label' must be true (a good answer) or false (a bad one), got a string",
        f"{where}:5: 'completion' must be a non-empty string, got only whitespace",
        f"{where}:5: 'label' must be true (a good answer) or false (a bad one), got the number 1",
        f"{where}:6: missing column 'completion' (present: prompt, label); map it with the source's `columns:`",
        f"{where}:7: 'chosen' and 'rejected' are identical; a pair must differ",
    ]
    good, _ = load_source(pack.sources("pref")[0], pack.dir, "kto")
    assert good == rows[:3]
    # the same rows are not preference pairs for the other methods
    with pytest.raises(PackError, match=r"pref.jsonl:2: missing column 'chosen', 'rejected'"):
        load_rows(load_pack("kto", ["pref.method=dpo"]), pack.sources("pref"), "pref", "pref.datasets")
