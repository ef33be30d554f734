"""Stage contract: fingerprint skip, rerun downstream on changed data, FORCE, atomic publish, passthrough.

The stages here are cheap fakes defined in the test (they copy a counter into their output), so the
runner's semantics are checked in milliseconds; the real stages have their own tests.
"""
from __future__ import annotations

import json
import types

import pytest
from conftest import make_pack, use_stage_module

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
    """base, cpt, sft as fake modules that record each call and write a 'model' folder."""
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

    for stage in ("base", "cpt", "sft"):
        make(stage)
    return calls, crash


def test_skip_rerun_downstream_and_force(workspace, fake_stages):
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

    runner.run(load_pack("toy"), "sft")  # nothing changed: everything skipped
    assert calls == ["base", "cpt", "sft"]

    (folder / "data/cpt.jsonl").write_text('{"text": "two"}\n')  # cpt data changed: cpt and sft rerun
    runner.run(load_pack("toy"), "sft")
    assert calls == ["base", "cpt", "sft", "cpt", "sft"]

    runner.run(load_pack("toy", ["sft.learning_rate=1e-4"]), "sft")  # sft config changed: sft only
    assert calls[-1:] == ["sft"] and len(calls) == 6

    runner.run(load_pack("toy", ["sft.learning_rate=1e-4"]), "cpt", force=True)  # FORCE reruns the target
    assert calls[-1:] == ["cpt"] and len(calls) == 7


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
