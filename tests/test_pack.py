"""The pack schema, overrides and `validate`: shipped packs pass, known-bad packs give their exact errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, make_pack

from core.errors import PackError
from core.overrides import describe
from core.pack import load_pack
from core.schema import Pack
from pipeline.validate import validate_data

SHIPPED = sorted(p.parent.name for p in (REPO / "domains").glob("*/pack.yaml"))

GOOD = """\
    name: toy
    system_prompt: You are a toy.
    cpt:
      datasets:
        - {path: data/cpt.jsonl, licence: permissive}
    sft:
      datasets:
        - {path: data/sft.jsonl, licence: permissive, columns: {messages: conversations}}
      learning_rate: 2.0e-4
    pref:
      datasets:
        - {path: data/pref.jsonl, licence: permissive}
      hub_datasets:
        - {hub: someone/prefs, split: train, licence: non-commercial, columns: {prompt: question}}
    eval:
      prompts:
        - {path: data/eval/prompts.jsonl, licence: permissive}
"""
GOOD_FILES = {
    "data/cpt.jsonl": [{"text": "Bonds pay coupons."}, {"text": "Stocks are shares."}],
    "data/sft.jsonl": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                       {"instruction": "Define yield", "input": "", "output": "Income over price."},
                       {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hi!"}]}],
    "data/pref.jsonl": [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}],
    "data/eval/prompts.jsonl": [{"prompt": "What is a bond?"}],
}


def problems_of(domain: str, overrides=()) -> list[str]:
    try:
        pack = load_pack(domain, overrides)
    except PackError as e:
        return e.problems
    return validate_data(pack)


@pytest.mark.parametrize("domain", SHIPPED)
def test_every_shipped_pack_validates(domain, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DOMAINS_DIR", raising=False)
    assert problems_of(domain) == []


def test_good_pack_loads_with_defaults_and_alpaca_rows(workspace):
    make_pack(workspace, "toy", GOOD, GOOD_FILES)
    pack = load_pack("toy")
    assert pack.sft.learning_rate == 2e-4 and pack.pref.method == "dpo" and pack.cpt.tuning == "lora"
    assert pack.merge.config["merge_method"] == "slerp"
    assert validate_data(pack) == []
    from core.rows import load_rows

    rows = load_rows(pack, pack.sources("sft"), "chat", "sft")
    assert rows[1]["messages"] == [{"role": "user", "content": "Define yield"},
                                   {"role": "assistant", "content": "Income over price."}]
    assert rows[2]["messages"] == [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hi!"}]


def test_overrides_reach_nested_keys_lists_and_free_form_mappings(workspace):
    make_pack(workspace, "toy", GOOD, GOOD_FILES)
    pack = load_pack("toy", ["sft.learning_rate=1e-4", "pref.method=orpo", "cpt.enabled=false",
                             "cpt.datasets.0.path=data/other.jsonl", "merge.config.dtype=float32",
                             "cpt.lora.target_modules=[q_proj,v_proj]", "data=hub"])
    assert pack.sft.learning_rate == 1e-4
    assert pack.pref.method == "orpo" and pack.cpt.enabled is False
    assert pack.cpt.datasets[0].path == "data/other.jsonl"
    assert pack.merge.config["dtype"] == "float32"
    assert pack.cpt.lora.target_modules == ["q_proj", "v_proj"]
    assert [s.hub for s in pack.sources("pref")] == ["someone/prefs"]
    assert load_pack("toy", ["data=hub", "licence=permissive"]).sources("pref") == []


@pytest.mark.parametrize("override, expected", [
    ("sft.learnin_rate=1e-4", "override 'sft.learnin_rate': sft has no key 'learnin_rate' (did you mean 'learning_rate'?)"),
    ("sft.learning_rate.x=1", "override 'sft.learning_rate.x': 'sft.learning_rate' has no sub-keys"),
    ("cpt.datasets.x=1", "override 'cpt.datasets.x': 'cpt.datasets' is a list; index it with a number"),
    ("cpt.datasets.5.path=a.jsonl", "override 'cpt.datasets.5.path': index 5 is past the end of the list (1 items)"),
    ("nonsense", "override 'nonsense': write it as key.path=value, e.g. sft.learning_rate=1e-4"),
    ("sft..learning_rate=1", "override 'sft..learning_rate=1': 'sft..learning_rate' is not a key path; write it "
                             "as key.path=value, e.g. sft.learning_rate=1e-4"),
    ("=1", "override '=1': '' is not a key path; write it as key.path=value, e.g. sft.learning_rate=1e-4"),
    # A section the file lacks, started by the override: the override is named, not the file.
    ("eval.judge.model=m", "override 'eval.judge.model=m': eval.judge.base_url: required key is missing"),
    # A value the schema refuses: named by the override that set it, not by a line of the file.
    ("sft.tuning=lorra", "override 'sft.tuning=lorra': sft.tuning: Input should be 'lora', 'qlora' or 'full' (got 'lorra')"),
])
def test_bad_overrides(workspace, override, expected):
    make_pack(workspace, "toy", GOOD, GOOD_FILES)
    assert problems_of("toy", [override]) == [expected]


BAD_PACKS = [
    ("yaml syntax", GOOD.replace("    system_prompt: You are a toy.", "    system_prompt: [unclosed"), {},
     ["domains/toy/pack.yaml:3:4: YAML syntax error: expected ',' or ']', but got ':'. "
      "Fix the indentation or quoting there."]),
    ("unknown key", GOOD.replace("      learning_rate: 2.0e-4", "      learnig_rate: 2.0e-4"), {},
     ["domains/toy/pack.yaml:9: sft.learnig_rate: unknown key (did you mean 'learning_rate'?)"]),
    ("wrong type and bad choice", GOOD.replace("      learning_rate: 2.0e-4", "      learning_rate: fast\n      tuning: lorra"), {},
     ["domains/toy/pack.yaml:9: sft.learning_rate: Input should be a valid number, unable to parse string as a number (got 'fast')",
      "domains/toy/pack.yaml:10: sft.tuning: Input should be 'lora', 'qlora' or 'full' (got 'lorra')"]),
    ("zero learning rate", GOOD.replace("learning_rate: 2.0e-4", "learning_rate: 0"), {},
     ["domains/toy/pack.yaml:9: sft.learning_rate: Input should be greater than 0 (got 0)"]),
    ("missing licence", GOOD.replace("{path: data/cpt.jsonl, licence: permissive}", "{path: data/cpt.jsonl}"), {},
     ["domains/toy/pack.yaml:5: cpt.datasets.0.licence: required key is missing"]),
    ("path and hub", GOOD.replace("{path: data/cpt.jsonl, licence: permissive}", "{path: data/cpt.jsonl, hub: a/b, licence: permissive}"), {},
     ["domains/toy/pack.yaml:5: cpt.datasets.0: give exactly one of 'path' (a local file) or 'hub' (a dataset id) "
      "(got {'path': 'data/cpt.jsonl', 'hub': 'a/b', 'licence': 'permissive'})"]),
    ("data problems, all at once", GOOD, {
        "data/cpt.jsonl": None,
        "data/sft.jsonl": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n{"messages": [oops\n',
        "data/pref.jsonl": '{"prompt": "a", "chosen": "b"}\n{"prompt": "a", "chosen": "same", "rejected": "same"}\n',
        "data/eval/prompts.jsonl": "",
     },
     ["domains/toy/data/cpt.jsonl: file not found (listed as path: data/cpt.jsonl); create it or fix the path",
      "domains/toy/data/sft.jsonl:2: not valid JSON (Expecting value at column 15); one object a line",
      "domains/toy/data/pref.jsonl:1: missing column 'rejected' (present: prompt, chosen); map it with the source's `columns:`",
      "domains/toy/data/pref.jsonl:2: 'chosen' and 'rejected' are identical; a pair must differ",
      "data/eval/prompts.jsonl: the dataset is empty"]),
]


@pytest.mark.parametrize("case, yaml_text, overrides_files, expected", BAD_PACKS, ids=[b[0] for b in BAD_PACKS])
def test_known_bad_packs_give_exact_errors(workspace, case, yaml_text, overrides_files, expected):
    folder = make_pack(workspace, "toy", yaml_text, GOOD_FILES)
    for rel, content in overrides_files.items():
        if content is None:
            (folder / rel).unlink()
        else:
            (folder / rel).write_text(content)
    assert problems_of("toy") == expected


def test_unknown_domain_and_missing_pack(workspace):
    make_pack(workspace, "finance", GOOD, GOOD_FILES)
    assert problems_of("finanse") == ["unknown domain 'finanse' (did you mean 'finance'?): no folder domains/finanse. "
                                      "Known domains: finance. A new domain is a copy of one of them."]
    (workspace / "domains" / "empty").mkdir()
    assert problems_of("empty") == ["domains/empty/pack.yaml is missing: every domain folder needs a pack.yaml (copy one)."]
    for bad in ("", "..", "../domains", "finance/../finance"):  # never a path out of domains/ or runs/
        assert problems_of(bad) == [f"domain {bad!r} is not a plain name (letters, digits, - and _); "
                                    "name a folder of domains/, e.g. --domain finance"]


def test_cli_exits_2_without_traceback_and_leaves_runs_alone(workspace):
    make_pack(workspace, "toy", GOOD.replace("learning_rate: 2.0e-4", "learning_rate: -1"), GOOD_FILES)
    runs = workspace / "runs" / "toy" / "base"
    runs.mkdir(parents=True)
    (runs / "stage.json").write_text('{"fingerprint": "keep"}')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for command in (["validate"], ["run", "base"]):
        proc = subprocess.run([sys.executable, "-m", "pipeline", *command, "--domain", "toy"],
                              capture_output=True, text=True, env=env, cwd=workspace)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert "sft.learning_rate: Input should be greater than 0" in proc.stderr
    assert (runs / "stage.json").read_text() == '{"fingerprint": "keep"}'
    assert sorted(p.name for p in (workspace / "runs" / "toy").iterdir()) == ["base"]


def test_keys_lists_every_section():
    text = "\n".join(describe())
    for key in ("sft.learning_rate", "pref.method", "pref.beta", "cpt.train_embeddings", "serve.port", "base.model"):
        assert key in text
    assert set(Pack.model_fields) >= {"base", "cpt", "sft", "pref", "merge", "eval", "serve"}


def test_cli_run_takes_overrides_after_the_domain(workspace):
    make_pack(workspace, "toy", GOOD, GOOD_FILES)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "sft", "--domain", "toy", "sft.learnin_rate=1"],
                          capture_output=True, text=True, env=env, cwd=workspace)
    assert proc.returncode == 2
    assert "override 'sft.learnin_rate': sft has no key 'learnin_rate' (did you mean 'learning_rate'?)" in proc.stderr


def test_pairs_whose_rejected_side_is_rated_higher_are_dropped(workspace, capsys):
    from core.rows import load_rows

    pairs = [{"question": "q1", "chosen": "c1", "rejected": "r1", "safe_c": 5, "safe_r": 3},
             {"question": "q2", "chosen": "c2", "rejected": "r2", "safe_c": 2, "safe_r": 4},  # rejected is safer
             {"question": "q3", "chosen": "c3", "rejected": "r3", "safe_c": 4, "safe_r": 4}]
    make_pack(workspace, "rated", """
name: rated
pref:
  datasets:
    - {path: data/pref.jsonl, licence: permissive, columns: {prompt: question},
       drop_if_rejected_rated_higher: {chosen: safe_c, rejected: safe_r}}
""", {"data/pref.jsonl": pairs})
    pack = load_pack("rated")
    rows = load_rows(pack, pack.sources("pref"), "pref", "pref.datasets")
    assert [r["prompt"] for r in rows] == ["q1", "q3"]
    assert "dropped 1 pair(s)" in capsys.readouterr().err

    pairs[2].pop("safe_r")
    make_pack(workspace, "rated", (workspace / "domains/rated/pack.yaml").read_text(), {"data/pref.jsonl": pairs})
    with pytest.raises(PackError) as err:
        load_rows(load_pack("rated"), load_pack("rated").sources("pref"), "pref", "pref.datasets")
    assert "pref.jsonl:3" in str(err.value) and "'safe_r'" in str(err.value)


DUPLICATES = """\
    name: toy
    sft:
      learning_rate: 1.0e-4
      lora: {r: 8, r: 4}
      learning_rate: 2.0e-4
    cpt:
      datasets:
        - {path: data/cpt.jsonl, licence: permissive, licence: non-commercial}
    3: x
    yes: 1
"""


def test_keys_given_twice_or_not_text_are_refused_with_their_lines(workspace):
    make_pack(workspace, "toy", DUPLICATES, GOOD_FILES)
    assert problems_of("toy") == [
        "domains/toy/pack.yaml:4: sft.lora.r: key given twice (first at line 4); "
        "YAML would keep only this one: delete one of them",
        "domains/toy/pack.yaml:5: sft.learning_rate: key given twice (first at line 3); "
        "YAML would keep only this one: delete one of them",
        "domains/toy/pack.yaml:8: cpt.datasets.0.licence: key given twice (first at line 8); "
        "YAML would keep only this one: delete one of them",
        "domains/toy/pack.yaml:9: 3: YAML reads this key as int, not text; quote it (\"3\":) or fix the line",
        "domains/toy/pack.yaml:10: yes: YAML reads this key as bool, not text; quote it (\"yes\":) or fix the line",
    ]


def test_pack_yaml_that_is_not_utf8(workspace):
    folder = make_pack(workspace, "toy", GOOD, GOOD_FILES)
    (folder / "pack.yaml").write_bytes(GOOD.replace("    ", "", 1).encode().replace(b"a toy", b"a caf\xe9"))
    assert problems_of("toy") == ["domains/toy/pack.yaml:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"]


@pytest.mark.parametrize("yaml_edit, overrides, expected", [
    (("2.0e-4", ".inf"), [], "domains/toy/pack.yaml:9: sft.learning_rate: Input should be a finite number (got inf)"),
    (("2.0e-4", ".nan"), [], "domains/toy/pack.yaml:9: sft.learning_rate: Input should be a finite number (got nan)"),
    (None, ["sft.learning_rate=inf"],
     "override 'sft.learning_rate=inf': sft.learning_rate: Input should be a finite number (got 'inf')"),
    (None, ["sft.learning_rate=nan"],
     "override 'sft.learning_rate=nan': sft.learning_rate: Input should be a finite number (got 'nan')"),
    (None, ["serve.temperature=-.inf"],
     "override 'serve.temperature=-.inf': serve.temperature: Input should be a finite number (got -inf)"),
    (None, ["cpt.lora.lora_dropout=.nan"],
     "override 'cpt.lora.lora_dropout=.nan': cpt.lora.lora_dropout: Input should be a finite number (got nan)"),
    (None, ["pref.num_train_epochs=Infinity"],
     "override 'pref.num_train_epochs=Infinity': pref.num_train_epochs: Input should be a finite number "
     "(got 'Infinity')"),
    (None, ["merge.config.parameters.t=nan"],
     "override 'merge.config.parameters.t=nan': merge.config: parameters.t is nan; a merge parameter must be a "
     "finite number (got {'parameters': {'t': 'nan'}})"),
])
def test_inf_and_nan_are_refused_for_every_number(workspace, yaml_edit, overrides, expected):
    make_pack(workspace, "toy", GOOD.replace(*yaml_edit) if yaml_edit else GOOD, GOOD_FILES)
    assert problems_of("toy", overrides) == [expected]


PLAIN_SECTIONS = GOOD.replace("""\
    cpt:
      datasets:
        - {path: data/cpt.jsonl, licence: permissive}
""", """\
    serve: fast
    cpt:
      datasets: data/cpt.jsonl
    merge:
      config: {dtype: float32}
""")


@pytest.mark.parametrize("overrides, expected", [
    (["serve.max_model_len=1024"],
     "override 'serve.max_model_len=1024': serve is 'fast' in domains/toy/pack.yaml:3, not a mapping, so "
     "'serve.max_model_len' cannot be set inside it; write serve as a mapping there, or override serve whole"),
    (["cpt.datasets.0.path=data/x.jsonl"],
     "override 'cpt.datasets.0.path=data/x.jsonl': cpt.datasets is 'data/cpt.jsonl' in domains/toy/pack.yaml:5, "
     "not a list, so 'cpt.datasets.0.path' cannot be set inside it; write cpt.datasets as a list there, or "
     "override cpt.datasets whole"),
    (["merge.config.dtype.x=1"],
     "override 'merge.config.dtype.x=1': merge.config.dtype is 'float32' in domains/toy/pack.yaml:7, not a "
     "mapping, so 'merge.config.dtype.x' cannot be set inside it; write merge.config.dtype as a mapping there, "
     "or override merge.config.dtype whole"),
    (["pref.datasets={a: 1}", "pref.datasets.0.path=x.jsonl"],
     "override 'pref.datasets.0.path=x.jsonl': pref.datasets is {'a': 1} in override 'pref.datasets={a: 1}', "
     "not a list, so 'pref.datasets.0.path' cannot be set inside it; write pref.datasets as a list there, or "
     "override pref.datasets whole"),
    (["sft.lora.target_modules=[q_proj"],
     "override 'sft.lora.target_modules=[q_proj': the value is not valid YAML (expected ',' or ']', but got "
     "'<stream end>'); fix its brackets or quotes"),
    (["sft.learning_rate=\"1e-4"],
     "override 'sft.learning_rate=\"1e-4': the value is not valid YAML (found unexpected end of stream); "
     "fix its brackets or quotes"),
])
def test_overrides_into_plain_values_or_with_bad_yaml_are_one_error(workspace, overrides, expected):
    make_pack(workspace, "toy", PLAIN_SECTIONS, GOOD_FILES)
    assert problems_of("toy", overrides) == [expected]


def test_text_overrides_are_taken_literally(workspace):
    make_pack(workspace, "toy", GOOD, GOOD_FILES)
    text = "You are: a helper # not a comment; 'quoted' \"too\" $(id) `id` [x"
    pack = load_pack("toy", [f"system_prompt={text}", "cpt.datasets.0.licence_name=CC-BY: 4.0",
                             "cpt.datasets.0.subset=null"])
    assert pack.system_prompt == text and pack.cpt.datasets[0].licence_name == "CC-BY: 4.0"
    assert pack.cpt.datasets[0].subset is None


def test_cli_show_with_an_override_into_a_plain_section_exits_2(workspace):
    make_pack(workspace, "toy", PLAIN_SECTIONS, GOOD_FILES)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "show", "--domain", "toy", "serve.max_model_len=1024"],
                          capture_output=True, text=True, env=env, cwd=workspace)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: override 'serve.max_model_len=1024': serve is 'fast' in "
                                  "domains/toy/pack.yaml:3, not a mapping")


@pytest.mark.parametrize("content, expected", [
    (None, "domains/toy/pack.yaml: base.chat_template: file domains/toy/chat.jinja not found; use 'model', "
           "'chatml' or a .jinja file in the pack folder"),
    (b"{{ caf\xe9 }}", "domains/toy/pack.yaml: base.chat_template: domains/toy/chat.jinja is not valid UTF-8 "
                       "(byte 7); save it as UTF-8"),
    (b"{% for m in messages %}\n{{ m.content }\n{% endfor %}",
     "domains/toy/chat.jinja:2: base.chat_template is not a valid Jinja template (unexpected '}'); fix it or use "
     "'model', 'chatml' or a .jinja file in the pack folder"),
    (b"{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}", None),
])
def test_chat_template_file_is_checked(workspace, content, expected):
    folder = make_pack(workspace, "toy", GOOD + "    base: {chat_template: chat.jinja}\n", GOOD_FILES)
    if content is not None:
        (folder / "chat.jinja").write_bytes(content)
    assert problems_of("toy") == ([expected] if expected else [])


def test_serve_contestants_are_stages_or_earlier_rounds_with_final_and_base(workspace):
    from core import contestants

    make_pack(workspace, "toy", "name: toy\n")
    assert load_pack("toy").serve.contestants == ["final", "base"]  # the two-model arena of before
    pack = load_pack("toy", ["serve.contestants=[final, base, sft, r1=../../runs/toy-r1/merge]"])
    parsed = [contestants.parse(e) for e in pack.serve.contestants]
    assert [(c.role, c.stage, c.path) for c in parsed] == [
        ("tuned", "merge", None), ("base", "base", None), ("sft", "sft", None), ("r1", None, "../../runs/toy-r1/merge")]
    assert [c.served_name("toy") for c in parsed] == ["toy", "toy-base", "toy-sft", "toy-r1"]
    with pytest.raises(PackError) as e:
        load_pack("toy", ["serve.contestants=[final, sft]"])
    assert e.value.problems == [
        "override 'serve.contestants=[final, sft]': serve.contestants: add base: the arena always has the final and "
        "the base model (the API's two models), e.g. [final, base, sft] (got ['final', 'sft'])"]
    make_pack(workspace, "bad", "name: bad\nserve:\n  contestants: [final, base, merge, sft, sft, Old=x, arena=y, z]\n")
    with pytest.raises(PackError) as e:
        load_pack("bad")
    [problem] = e.value.problems
    assert problem.startswith("domains/bad/pack.yaml:3: serve.contestants: 'merge': write final for the merged model; ")
    for part in ("'Old=x': the name 'Old' is not a plain lower-case name", "'arena=y': the name 'arena' is reserved",
                 "'z' is neither a model stage (final, base, cpt, sft, pref) nor name=path", "sft given twice"):
        assert part in problem
