"""Training stages cpt, sft, pref (DPO, IPO, ORPO, CPO, SimPO, KTO) on a tiny random Llama, through the real runner, TRL and PEFT.

Each stage trains a few steps on a small memorisable set; the tests check the output contract (merged
model with the base's tokenizer, chat template and EOS ids, adapter, log.jsonl, loss.png, stage.json
metrics), that the LoRA weights moved and the loss fell, resume after a crash, pass-through of a disabled
stage, the assistant-only loss mask, and the clear errors for bad input.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, make_pack, write_jsonl

from core.errors import PackError
from core.pack import load_pack
from pipeline import runner

SYSTEM = "You answer in one short sentence."
CONVS = [{"messages": [{"role": "user", "content": f"What is the code for vault {i}?"},
                       {"role": "assistant", "content": f"Vault {i} opens with alpha bravo {i}."}]} for i in range(8)]
TEXT = [{"text": f"Quarterly report {i}: revenue grew {i} percent, margins stayed stable."} for i in range(10)]
PAIRS = [{"prompt": f"Is bond {i} safe?", "chosen": f"Bond {i} carries credit risk; check its rating.",
          "rejected": "yes totally safe"} for i in range(8)]
PAIRS.append({"prompt": "long " * 200, "chosen": "a", "rejected": "b"})  # over max_length: dropped, counted

TRAIN = """\
      max_steps: 4
      logging_steps: 3
      save_steps: 2
      eval_fraction: 0.25
      per_device_train_batch_size: 2
"""
PACK = """\
    name: toy
    system_prompt: {system}
    base: {{model: {model}}}
    cpt:
      datasets: [{{path: data/cpt.jsonl, licence: permissive}}]
      learning_rate: 1.0e-2
      max_length: 64
{train}    sft:
      datasets: [{{path: data/sft.jsonl, licence: permissive}}]
      learning_rate: 1.0e-2
{train}    pref:
      datasets: [{{path: data/pref.jsonl, licence: permissive}}]
      learning_rate: 1.0e-3
      max_length: 128
{train}"""
FILES = {"data/cpt.jsonl": TEXT, "data/sft.jsonl": CONVS, "data/pref.jsonl": PAIRS}


@pytest.fixture
def toy(workspace, tiny_model_dir):
    make_pack(workspace, "toy", PACK.format(system=SYSTEM, model=tiny_model_dir, train=TRAIN), FILES)
    return workspace / "runs" / "toy"


def stage_info(run_dir, stage):
    return json.loads((run_dir / stage / "stage.json").read_text())


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def check_outputs(run_dir, stage, adapter=True, steps=4):
    """The output contract every training stage follows."""
    from transformers import AutoTokenizer

    out = run_dir / stage
    info = stage_info(run_dir, stage)
    assert info["model"] == "model" and (out / "model" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file() == adapter
    base_tok = AutoTokenizer.from_pretrained(run_dir / "base" / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template == base_tok.chat_template  # preserved, never replaced
    base_gen = json.loads((run_dir / "base" / "model" / "generation_config.json").read_text())
    gen = json.loads((out / "model" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == base_gen["eos_token_id"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoints").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if "loss" in r]
    assert train_rows and all({"step", "loss", "lr"} <= r.keys() for r in train_rows)
    assert any("eval_loss" in r for r in log)
    m = info["metrics"]
    for key in ("tokens", "tokens_per_s", "train_loss", "eval_loss", "steps"):
        assert key in m, key
    assert m["steps"] == steps and m["tokens"] > 0 and m["tokens_per_s"] > 0 and info["tokens"] == m["tokens"]
    return m, train_rows


@pytest.mark.slow
def test_cpt_sft_dpo_chain(toy):
    runner.run(load_pack("toy"), "pref")

    cpt, _ = check_outputs(toy, "cpt")
    assert cpt["eval_loss"] < cpt["eval_loss_before"]
    # the base model scored apart gives the same held-out loss as the LoRA model before its first step
    assert cpt["eval_loss_base"] == pytest.approx(cpt["eval_loss_before"], abs=1e-4)

    sft, sft_log = check_outputs(toy, "sft")
    assert sft["eval_loss"] < sft["eval_loss_before"] and sft["eval_loss"] < sft["eval_loss_base"]
    assert sft_log[-1]["loss"] < sft_log[0]["loss"]
    assert '"heldout_loss"' in (toy / "sft" / "log.jsonl").read_text()
    # LoRA B matrices start at zero: non-zero means the adapter trained; merged weights differ from the input
    from safetensors.torch import load_file

    adapter = load_file(toy / "sft" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)
    before, after = weights(toy / "cpt" / "model"), weights(toy / "sft" / "model")
    key = next(k for k in after if "q_proj" in k)
    assert not after[key].equal(before[key]) and after[key].dtype == before[key].dtype

    pref, _ = check_outputs(toy, "pref")
    assert pref["method"] == "dpo" and pref["dropped_too_long"] == 1
    # the policy started equal to its reference (DPO loss ln 2, margin 0) and moved towards the chosen answers
    assert pref["rewards/margins"] > 0 and pref["train_loss"] < math.log(2)
    assert pref["train_rows"] + pref["eval_rows"] == len(PAIRS) - 1
    log = (toy / "pref" / "log.jsonl").read_text()
    assert '"dropped_too_long": 1' in log and "rewards/margins" in log

    # bad input later: a clear error, and the earlier stages' outputs are untouched
    published = stage_info(toy, "pref")["fingerprint"]
    with pytest.raises(PackError, match="all 9 pairs are longer than pref.max_length=16"):
        runner.run(load_pack("toy", ["pref.max_length=16"]), "pref")
    assert stage_info(toy, "pref")["fingerprint"] == published
    assert (toy / "sft" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_orpo_with_disabled_stages(toy):
    runner.run(load_pack("toy", ["cpt.enabled=false", "sft.enabled=false", "pref.method=orpo"]), "pref")
    for stage in ("cpt", "sft"):
        info = stage_info(toy, stage)
        assert info["disabled"] is True
        assert runner.model_dir(toy, stage) == (toy / "base" / "model").resolve()  # input passed through
    pref, log = check_outputs(toy, "pref")
    assert pref["method"] == "orpo" and "rewards/accuracies" in pref and "rewards/margins" in pref
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint(toy):
    """kill -9 of a real `python -m pipeline run sft` once a checkpoint is on disk; the same command resumes."""
    over = ["cpt.enabled=false", "sft.max_steps=40", "sft.save_steps=4"]
    checkpoints = toy / ".work" / "sft" / "checkpoints"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "sft", "--domain", "toy", *over], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the kill comes as checkpoint-8 appears: most likely while it is still being written, the case that
        # must not break the resume (a whole checkpoint-4 is there by then)
        deadline = time.time() + 300
        while not (checkpoints / "checkpoint-8").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the stage ended before its second checkpoint"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind
        proc.wait()
    assert not (toy / "sft").exists()  # nothing half-written was published
    pack = load_pack("toy", over)

    runner.run(pack, "sft")  # the same command again
    m, log = check_outputs(toy, "sft", steps=40)
    assert m["resumed_from_step"] in (4, 8) and m["steps"] == 40 and m["eval_loss"] < m["eval_loss_before"]
    steps = [r["step"] for r in log]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # steps the killed run logged are not logged twice


def test_bad_pairs_and_options(toy, tokenizer_dir):
    from transformers import AutoTokenizer

    from pipeline.pref import prepare_pairs

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    same = [{"prompt": "q", "chosen": "same", "rejected": [{"role": "assistant", "content": "same"}]}]
    with pytest.raises(PackError, match="chosen identical to rejected"):
        prepare_pairs(same, tok, SYSTEM, 128, "data/pref.jsonl")
    with pytest.raises(PackError, match="learning_rate"):
        load_pack("toy", ["sft.learning_rate=0"])
    with pytest.raises(PackError, match="pref.method=kto needs pref.per_device_train_batch_size of at least 2"):
        runner.run(load_pack("toy", ["cpt.enabled=false", "sft.enabled=false", "pref.method=kto",
                                     "pref.per_device_train_batch_size=1"]), "pref")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(PackError, match="unsloth needs a CUDA GPU"):
            runner.run(load_pack("toy", ["cpt.backend=unsloth"]), "cpt")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
    reason="QLoRA is allowed on CUDA")
@pytest.mark.slow
def test_qlora_on_cpu_is_a_clear_error(toy):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # overrides before --domain: `run STAGE --domain D key=value` trips argparse (see the report)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "cpt", "cpt.tuning=qlora", "--domain", "toy"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "qlora needs a CUDA GPU" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (toy / "base" / "model").is_dir()  # the earlier stage was published and is intact


RATED = [{"prompt": f"Is fund {i} insured?", "completion": f"Fund {i} is not insured; read its prospectus.",
          "label": True} for i in range(2)] + [{"prompt": "Is fund 9 insured?", "completion": "sure", "label": False}]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simpo", "cpo", "kto", "ipo"])
def test_preference_methods(toy, method):
    """Each method trains through TRL's own trainer, publishes the usual outputs, and learns the preference:
    the training loss falls and the reward margin (chosen minus rejected) rises."""
    over = ["cpt.enabled=false", "sft.enabled=false", "pref.max_steps=6"]
    over += ["pref.method=dpo", "pref.loss_type=ipo"] if method == "ipo" else [f"pref.method={method}"]
    if method == "kto":  # pairs and single rated answers (what the arena's thumbs-up/down would give) together
        write_jsonl(toy.parent.parent / "domains" / "toy" / "data" / "rated.jsonl", RATED)
        over.append("pref.datasets=[{path: data/pref.jsonl, licence: permissive}, "
                    "{path: data/rated.jsonl, licence: permissive}]")
    runner.run(load_pack("toy", over), "pref")
    pref, log = check_outputs(toy, "pref", steps=6)
    assert pref["method"] == ("dpo" if method == "ipo" else method)
    margins = [r["rewards/margins"] for r in log if "rewards/margins" in r]
    assert log[-1]["loss"] < log[0]["loss"] and margins[-1] > margins[0]
    # SimPO's and CPO's rewards are the model's own log-probabilities: the held-out pairs are scored before too
    reference_free = method in ("simpo", "cpo")
    assert ("eval_rewards/margins_before" in pref) == reference_free
    if reference_free:
        assert pref["eval_rewards/margins"] > pref["eval_rewards/margins_before"]
    if method == "kto":
        assert pref["train_rows"] + pref["eval_rows"] == 2 * (len(PAIRS) - 1) + len(RATED)


@pytest.mark.slow
def test_tensorboard_events_by_default_and_none_with_tracking_none(toy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner.run(load_pack("toy"), "cpt")
    events = toy / "cpt" / "tensorboard"
    assert list(events.glob("events.out.tfevents.*"))  # published with the stage
    acc = EventAccumulator(str(events))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    logged = [r["loss"] for r in map(json.loads, (toy / "cpt" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses == pytest.approx(logged, rel=1e-5) and losses[-1] < losses[0]  # the curves of log.jsonl
    fingerprint = stage_info(toy, "cpt")["fingerprint"]

    runner.run(load_pack("toy", ["tracking=none"]), "cpt", force=True)
    assert not (toy / "cpt" / "tensorboard").exists() and not list(toy.rglob("events.out.tfevents.*"))
    assert stage_info(toy, "cpt")["fingerprint"] == fingerprint


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_asked_for_but_not_installed_is_one_clear_error(toy, tracker):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(PackError, match=rf"tracking={tracker} needs the {tracker} package, which is not installed: "
                                        rf"\.venv/bin/pip install {tracker}"):
        runner.run(load_pack("toy", [f"tracking={tracker}"]), "sft")
    assert not toy.exists()  # said before any stage ran
