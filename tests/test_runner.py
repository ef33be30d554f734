"""Stage contract: fingerprint skip, rerun downstream on changed data, FORCE, atomic publish, passthrough.

The stages here are cheap fakes defined in the test (they copy a counter into their output), so the
runner's semantics are checked in milliseconds; the real stages have their own tests.
"""
from __future__ import annotations

import json
import os
import sys
import types

import pytest
from conftest import make_pack, use_stage_module

from core import stages
from core.errors import PackError
from core.pack import load_pack
from pipeline import runner

PACK = """\
    name: toy
    cpt:
      datasets: [{path: data/cpt.jsonl, licence: permissive}]
    sft:
      datasets: [{path: data/sft.jsonl, licence: permissive}]
"""
FILES = {
    "data/cpt.jsonl": [{"text": "one"}],
    "data/sft.jsonl": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
}


@pytest.fixture
def fake_stages(monkeypatch):
    """base ... merge as fake modules that record each call and write a 'model' folder."""
    calls: list[str] = []
    crash = {"stage": None}

    def make(stage):
        def run(ctx):
            calls.append(stage)
            (ctx.out / "model").mkdir(exist_ok=True)
            (ctx.out / "model" / "weights.txt").write_text(f"{stage} {len(calls)}")
            if crash["stage"] == stage:
                raise RuntimeError("simulated crash mid-training")
            return {"tokens": 10, "loss": 1.0}
        mod = types.ModuleType(f"fake_{stage}")
        mod.run = run
        use_stage_module(monkeypatch, stage, mod)

    for stage in ("base", "cpt", "sft", "pref", "merge"):
        make(stage)
    return calls, crash


def test_skip_rerun_downstream_and_force(workspace, fake_stages, capsys):
    calls, _ = fake_stages
    folder = make_pack(workspace, "toy", PACK, FILES)
    run_dir = workspace / "runs" / "toy"

    runner.run(load_pack("toy"), "sft")
    assert calls == ["base", "cpt", "sft"]
    info = json.loads((run_dir / "sft" / "stage.json").read_text())
    for key in ("fingerprint", "config", "inputs", "metrics", "wall_time_s", "tokens", "packages", "model"):
        assert key in info
    assert info["inputs"]["upstream"]["cpt"] == json.loads((run_dir / "cpt" / "stage.json").read_text())["fingerprint"]
    assert info["config"]["sft"]["learning_rate"] == 2e-4

    capsys.readouterr()
    runner.run(load_pack("toy"), "sft")  # nothing changed: everything skipped
    assert calls == ["base", "cpt", "sft"]
    assert capsys.readouterr().out.splitlines()[-1].endswith("(up to date: base, cpt, sft)")
    assert "skipped" not in json.loads((run_dir / "sft" / "stage.json").read_text())

    (folder / "data/cpt.jsonl").write_text('{"text": "two"}\n')  # cpt data changed: cpt and sft rerun
    runner.run(load_pack("toy"), "sft")
    assert calls == ["base", "cpt", "sft", "cpt", "sft"]
    last = capsys.readouterr().out.splitlines()[-1]  # the total and where it went
    assert last.startswith("[sft] took ") and " in all: cpt " in last and ", sft " in last
    assert last.endswith("(up to date: base)")

    runner.run(load_pack("toy", ["sft.learning_rate=1e-4"]), "sft")  # sft config changed: sft only
    assert calls[-1:] == ["sft"] and len(calls) == 6

    runner.run(load_pack("toy", ["sft.learning_rate=1e-4"]), "cpt", force=True)  # FORCE reruns the target
    assert calls[-1:] == ["cpt"] and len(calls) == 7


def test_tracking_does_not_change_a_fingerprint(workspace, fake_stages):
    """Where the curves are logged does not change the model: no stage reruns when only `tracking` changes."""
    calls, _ = fake_stages
    make_pack(workspace, "toy", PACK, FILES)
    run_dir = workspace / "runs" / "toy"
    runner.run(load_pack("toy"), "merge")
    assert load_pack("toy").tracking == "tensorboard" and calls == ["base", "cpt", "sft", "pref", "merge"]
    for choice in ("none", "wandb", "mlflow"):
        pack = load_pack("toy", [f"tracking={choice}"])
        for stage in stages.STAGES:
            assert runner.fingerprint(pack, stage, run_dir)[0] == runner.fingerprint(load_pack("toy"), stage, run_dir)[0]
    runner.run(load_pack("toy", ["tracking=none"]), "merge")
    assert len(calls) == 5  # every stage up to date


def test_crash_leaves_previous_output_intact_and_work_for_resume(workspace, fake_stages):
    calls, crash = fake_stages
    folder = make_pack(workspace, "toy", PACK, FILES)
    run_dir = workspace / "runs" / "toy"
    runner.run(load_pack("toy"), "sft")
    before = (run_dir / "sft" / "model" / "weights.txt").read_text()
    stage_json = (run_dir / "sft" / "stage.json").read_text()

    (folder / "data/sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                                                     {"role": "assistant", "content": "y"}]}) + "\n")
    crash["stage"] = "sft"
    with pytest.raises(RuntimeError):
        runner.run(load_pack("toy"), "sft")
    # The published stage is untouched; the half-written one sits in .work, stamped for resume.
    assert (run_dir / "sft" / "model" / "weights.txt").read_text() == before
    assert (run_dir / "sft" / "stage.json").read_text() == stage_json
    assert (run_dir / ".work" / "sft" / "model" / "weights.txt").exists()
    assert (run_dir / ".work" / "sft" / ".fingerprint").exists()
    assert (run_dir / "cpt" / "stage.json").exists()

    crash["stage"] = None
    runner.run(load_pack("toy"), "sft")
    assert (run_dir / "sft" / "model" / "weights.txt").read_text() != before
    assert not (run_dir / ".work" / "sft").exists()


def test_work_folder_is_kept_for_same_fingerprint_and_wiped_for_another(workspace, fake_stages):
    _, crash = fake_stages
    make_pack(workspace, "toy", PACK, FILES)
    run_dir = workspace / "runs" / "toy"
    crash["stage"] = "cpt"
    with pytest.raises(RuntimeError):
        runner.run(load_pack("toy"), "cpt")
    marker = run_dir / ".work" / "cpt" / "checkpoint-5"
    marker.mkdir()
    with pytest.raises(RuntimeError):
        runner.run(load_pack("toy"), "cpt")  # same fingerprint: the checkpoint survives (resume)
    assert marker.exists()
    with pytest.raises(RuntimeError):
        runner.run(load_pack("toy", ["cpt.learning_rate=1e-3"]), "cpt")  # other config: fresh start
    assert not marker.exists()


def test_disabled_stage_passes_its_input_through(workspace, fake_stages):
    calls, _ = fake_stages
    make_pack(workspace, "toy", PACK, FILES)
    run_dir = workspace / "runs" / "toy"
    runner.run(load_pack("toy", ["cpt.enabled=false"]), "sft")
    assert calls == ["base", "sft"]
    info = json.loads((run_dir / "cpt" / "stage.json").read_text())
    assert info["disabled"] is True
    assert runner.model_dir(run_dir, "cpt") == (run_dir / "base" / "model").resolve()


def test_unknown_stage_and_concurrent_run_are_clear_errors(workspace, fake_stages):
    make_pack(workspace, "toy", PACK, FILES)
    with pytest.raises(PackError, match="unknown stage 'merj'; the stages are base, cpt, sft, pref, merge"):
        runner.run(load_pack("toy"), "merj")
    run_dir = workspace / "runs" / "toy"
    with runner.RunLock(run_dir):
        with pytest.raises(PackError, match="another run of 'toy' is in progress"):
            runner.run(load_pack("toy"), "base")


def test_a_changed_jinja_chat_template_reruns_base_and_what_follows(workspace, fake_stages):
    calls, _ = fake_stages
    folder = make_pack(workspace, "toy", PACK + "    base: {chat_template: chat.jinja}\n", FILES)
    (folder / "chat.jinja").write_text("{{ messages }}")
    runner.run(load_pack("toy"), "sft")
    runner.run(load_pack("toy"), "sft")
    assert calls == ["base", "cpt", "sft"]
    (folder / "chat.jinja").write_text("{{ messages }}\n")  # same name, other content
    runner.run(load_pack("toy"), "sft")
    assert calls == ["base", "cpt", "sft"] * 2
    info = json.loads((workspace / "runs/toy/base/stage.json").read_text())
    assert list(info["inputs"]["data"]) == ["chat.jinja"]


def test_a_changed_local_base_model_reruns_base(workspace, fake_stages):
    calls, _ = fake_stages
    make_pack(workspace, "toy", PACK + "    base: {model: ../../models/tiny}\n", FILES)
    model = workspace / "models" / "tiny"
    model.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (model / name).write_text(name)
    (model / ".git").mkdir()
    runner.run(load_pack("toy"), "base")
    (model / ".git" / "HEAD").write_text("not the model")
    runner.run(load_pack("toy"), "base")
    assert calls == ["base"]
    (model / "tokenizer.json").write_text("another vocabulary")  # tokenizer files: by content
    runner.run(load_pack("toy"), "base")
    assert calls == ["base"] * 2
    weights = model / "model.safetensors"  # weights: by size and mtime (named in stage.json)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    runner.run(load_pack("toy"), "base")
    assert calls == ["base"] * 3
    identity = json.loads((workspace / "runs/toy/base/stage.json").read_text())["inputs"]["model"]["folder"]
    assert identity["model.safetensors"].startswith("size 17 mtime ") and identity["config.json"].startswith("sha256 ")


def test_a_new_hub_revision_reruns_base_and_a_first_download_does_not(workspace, fake_stages, monkeypatch):
    from huggingface_hub import constants

    calls, _ = fake_stages
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workspace / "hub"))
    ref = workspace / "hub" / "models--org--model" / "refs" / "main"
    base_run = sys.modules[stages.BY_NAME["base"].module].run

    def downloading_base(ctx):  # the first run fetches the model into the cache
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.exists() or ref.write_text("aaa")
        return base_run(ctx)
    monkeypatch.setattr(sys.modules[stages.BY_NAME["base"].module], "run", downloading_base)
    make_pack(workspace, "toy", PACK + "    base: {model: org/model}\n", FILES)
    runner.run(load_pack("toy"), "base")
    runner.run(load_pack("toy"), "base")
    assert calls == ["base"]
    ref.write_text("bbb")  # the cache now holds another revision of the same id
    runner.run(load_pack("toy"), "base")
    assert calls == ["base"] * 2
    assert json.loads((workspace / "runs/toy/base/stage.json").read_text())["inputs"]["model"] == {"hub_revision": "bbb"}


SEARCH = PACK + """\
    merge: {search: t}
    eval:
      sft: [{path: data/eval/sft.jsonl, licence: permissive}]
      text: [{path: data/eval/text.jsonl, licence: permissive}]
"""


@pytest.mark.parametrize("search, reruns", [("t", True), ("none", False)])
def test_merge_search_reruns_when_its_held_out_data_changes(workspace, fake_stages, search, reruns):
    calls, _ = fake_stages
    files = {**FILES, "data/eval/sft.jsonl": FILES["data/sft.jsonl"], "data/eval/text.jsonl": [{"text": "held"}]}
    folder = make_pack(workspace, "toy", SEARCH.replace("search: t", f"search: {search}"), files)
    runner.run(load_pack("toy"), "merge")
    assert calls == ["base", "cpt", "sft", "pref", "merge"]
    (folder / "data/eval/text.jsonl").write_text('{"text": "other"}\n')
    runner.run(load_pack("toy"), "merge")
    assert calls[5:] == (["merge"] if reruns else [])
    runner.run(load_pack("toy", ["eval.sft.0.columns={messages: turns}"]), "merge")  # how rows are read, too
    assert calls[5:] == (["merge"] * 2 if reruns else [])


def test_other_package_versions_warn_once_per_stage_without_rerunning(workspace, fake_stages, monkeypatch, capsys):
    calls, _ = fake_stages
    make_pack(workspace, "toy", PACK, FILES)
    runner.run(load_pack("toy"), "sft")
    built = runner.package_versions()
    runner.run(load_pack("toy"), "sft")
    assert "warning" not in capsys.readouterr().out
    monkeypatch.setattr(runner, "package_versions", lambda: {**built, "transformers": "99.0", "trl": "0.0.1"})
    runner.run(load_pack("toy"), "sft")
    assert calls == ["base", "cpt", "sft"]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 3
    old = built.get("transformers", "not installed")
    old_trl = built.get("trl", "not installed")
    assert warnings[2] == (f"[sft] warning: built with other package versions (transformers {old} -> 99.0, trl "
                           f"{old_trl} -> 0.0.1); kept as it is, `make domain=toy sft FORCE=1` rebuilds it")


def test_a_new_hub_dataset_revision_changes_its_stage_fingerprint(workspace, fake_stages, monkeypatch):
    """data=hub: the same dataset id can hold other rows tomorrow; the cached revision decides."""
    from huggingface_hub import constants

    calls, _ = fake_stages
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workspace / "hub"))
    ref = workspace / "hub" / "datasets--org--text" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("aaa")
    hub = PACK + "    data: hub\n" + "    cpt: {hub_datasets: [{hub: org/text, licence: permissive}]}\n"
    make_pack(workspace, "toy", hub.replace("    cpt:\n      datasets: [{path: data/cpt.jsonl, licence: permissive}]\n",
                                             ""), FILES)
    pack = load_pack("toy")
    first = runner.fingerprint(pack, "cpt", workspace / "runs" / "toy")
    assert first[1]["hub_data"] == {"org/text[train]": "aaa"}
    ref.write_text("bbb")
    assert runner.fingerprint(pack, "cpt", workspace / "runs" / "toy")[0] != first[0]
    pinned = load_pack("toy", ["cpt.hub_datasets.0.revision=" + "c" * 40])
    assert runner.fingerprint(pinned, "cpt", workspace / "runs" / "toy")[1]["hub_data"] == {"org/text[train]": "c" * 40}


def test_the_shipped_benchmark_file_counts_in_the_eval_fingerprint(workspace, fake_stages):
    """A pack's default data/eval/mc.jsonl (no eval.benchmarks key) is eval data: editing it reruns eval."""
    folder = make_pack(workspace, "toy", PACK, FILES)
    run_dir = workspace / "runs" / "toy"
    without = runner.fingerprint(load_pack("toy"), "eval", run_dir)[0]
    bench = folder / "data" / "eval" / "mc.jsonl"
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text('{"question": "1 + 1?", "choices": ["1", "2"], "answer": 1}\n')
    shipped = runner.fingerprint(load_pack("toy"), "eval", run_dir)[0]
    bench.write_text('{"question": "2 + 2?", "choices": ["4", "5"], "answer": 0}\n')
    assert len({without, shipped, runner.fingerprint(load_pack("toy"), "eval", run_dir)[0]}) == 3
