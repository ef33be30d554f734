"""Scale-out of the training stages: real `accelerate launch` processes on gloo (CPU), the tiny random Llama.

- 2-process DDP of sft gives the held-out loss of 1 process at the same global batch, is published once by
  rank 0, and stage.json says world size 2; the fingerprint sees the global batch, not its split.
- FSDP and DeepSpeed on a CPU stop with a clear error (Accelerate runs them only on accelerators).
- Two "nodes" on loopback (NNODES=2, NODE_RANK 0 and 1) complete one stage.
- kill -9 of one rank: the stage fails (nothing published), the rerun resumes from the checkpoint.
- `make sft NPROC=2` through the real make; the generated Accelerate/DeepSpeed configs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, free_port, make_pack

from core.pack import load_pack
from pipeline import distributed

CONVS = [{"messages": [{"role": "user", "content": f"What is the code for vault {i}?"},
                       {"role": "assistant", "content": f"Vault {i} opens with alpha bravo {i}."}]} for i in range(16)]
PACK = """\
    name: toy
    system_prompt: You answer in one short sentence.
    base: {{model: {model}}}
    cpt: {{enabled: false}}
    pref: {{enabled: false}}
    sft:
      datasets: [{{path: data/sft.jsonl, licence: permissive}}]
      learning_rate: 1.0e-2
      max_steps: {steps}
      save_steps: {save}
      logging_steps: 1
      eval_fraction: 0.25
      per_device_train_batch_size: 4
"""
# The tolerance for 1 vs 2 processes: the same batches and the same token-weighted loss, but the gradients are
# summed in another order (gloo all-reduce); measured differences were ~1e-6, far below what training moves.
TOLERANCE = 1e-4


@pytest.fixture
def toy(workspace, tiny_model_dir):
    make_pack(workspace, "toy", PACK.format(model=tiny_model_dir, steps=4, save=2), {"data/sft.jsonl": CONVS})
    return workspace / "runs" / "toy"


def pipeline(*args, env=None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def scale(nproc=2, **more) -> dict:
    return {"NPROC": str(nproc), "MASTER_PORT": str(free_port()), **{k: str(v) for k, v in more.items()}}


def stage_json(run_dir, stage="sft") -> dict:
    return json.loads((run_dir / stage / "stage.json").read_text())


@pytest.mark.slow
def test_ddp_matches_one_process_at_the_same_global_batch(toy):
    start = time.time()
    finish(pipeline("run", "sft", "--domain", "toy"))
    one = stage_json(toy)
    one_wall = time.time() - start
    assert one["distributed"]["world_size"] == 1 and one["distributed"]["global_batch_size"] == 4

    # 2 processes x 2 per device = the same global batch: the same stage, so skipped without FORCE
    half = ["sft.per_device_train_batch_size=2"]
    out = finish(pipeline("run", "sft", "--domain", "toy", *half, env=scale()))
    assert "sft] up to date" in out and stage_json(toy)["fingerprint"] == one["fingerprint"]

    start = time.time()
    out = finish(pipeline("run", "sft", "--domain", "toy", "--force", *half, env=scale()))
    two_wall = time.time() - start
    two = stage_json(toy)
    d = two["distributed"]
    assert d["world_size"] == 2 and d["strategy"] == "ddp" and d["per_device_train_batch_size"] == 2
    assert d["global_batch_size"] == 4 and d["tokens_per_s"] > 0
    assert d["tokens_per_s_per_device"] == pytest.approx(d["tokens_per_s"] / 2, abs=0.1)
    m1, m2 = one["metrics"], two["metrics"]
    print(f"\nheld-out loss 1 process {m1['eval_loss_before']:.6f} -> {m1['eval_loss']:.6f} ({one_wall:.1f} s), "
          f"2 processes {m2['eval_loss_before']:.6f} -> {m2['eval_loss']:.6f} ({two_wall:.1f} s)")
    assert m2["eval_loss_before"] == pytest.approx(m1["eval_loss_before"], abs=1e-6)
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], abs=TOLERANCE)
    assert m2["eval_loss"] < m2["eval_loss_before"] - 0.05  # it trained
    assert m2["steps"] == 4 and m2["tokens"] == m1["tokens"]
    # published once, by rank 0: one line per logged step, the config it ran with kept in the stage folder
    log = [json.loads(line) for line in (toy / "sft" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == sorted(set(steps))
    assert out.count("sft] done in") == 1 and not (toy / ".work" / "sft").exists()
    config = yaml.safe_load((toy / "sft" / "accelerate_config.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] == 2  # torchrun, gloo on CPU
    assert not (toy / "sft" / ".metrics.json").exists() and not (toy / "sft" / "checkpoints").exists()


def test_sharded_strategies_on_a_cpu_stop_before_anything_runs(toy):
    """Accelerate runs FSDP and DeepSpeed only on accelerators: on a CPU its ranks would train as plain DDP."""
    for strategy in ("fsdp", "deepspeed_zero3"):
        proc = pipeline("run", "sft", "--domain", "toy", f"distributed.strategy={strategy}", env=scale())
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and f"distributed.strategy={strategy} needs GPUs" in out, out[-2000:]
        assert "distributed.strategy=ddp" in out and "Traceback" not in out
    assert not (toy / "base").exists()  # said before any stage ran


@pytest.mark.slow
def test_a_launch_that_does_not_form_the_group_fails_the_stage(toy):
    """Accelerate's MULTI_CPU launcher without an MPI host file starts one process: rank 0 would train alone
    and publish as if two had. The runner checks the group rank 0 trained in."""
    (toy.parent.parent / "domains" / "toy" / "mpi.yaml").write_text(
        "distributed_type: MULTI_CPU\nuse_cpu: true\nmixed_precision: 'no'\n")
    proc = pipeline("run", "sft", "--domain", "toy", "distributed.accelerate_config=mpi.yaml", env=scale())
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2, out[-3000:]
    assert "asked for 2 processes (ddp), but rank 0 trained in a group of 1 (NO)" in out, out[-3000:]
    assert not (toy / "sft").exists()  # nothing published


@pytest.mark.slow
def test_two_nodes_on_loopback(toy):
    port = free_port()
    nodes = {rank: {"NPROC": "1", "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)} for rank in (0, 1)}
    worker = pipeline("run", "sft", "--domain", "toy", env=nodes[1])  # starts first: waits for node 0's base
    main = pipeline("run", "sft", "--domain", "toy", env=nodes[0])
    out_main, out_worker = finish(main), finish(worker)
    info = stage_json(toy)
    assert info["distributed"]["world_size"] == 2 and info["distributed"]["nodes"] == 2
    assert "joining the stage's launch" in out_worker and "sft] done in" not in out_worker
    assert "sft] done in" in out_main


@pytest.mark.slow
def test_kill_one_rank_fails_the_stage_and_the_rerun_resumes(workspace, tiny_model_dir):
    make_pack(workspace, "toy", PACK.format(model=tiny_model_dir, steps=40, save=4), {"data/sft.jsonl": CONVS})
    run_dir = workspace / "runs" / "toy"
    checkpoints = run_dir / ".work" / "sft" / "checkpoints"
    half = ["sft.per_device_train_batch_size=2"]
    proc = pipeline("run", "sft", "--domain", "toy", *half, env=scale())
    deadline = time.time() + 300
    while not (checkpoints / "checkpoint-8").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-f", "pipeline stage --spec"], capture_output=True, text=True).stdout.split()
    mine = [int(p) for p in ranks if str(proc.pid) in _ancestors(int(p))]  # accelerate launch and its ranks
    ranks = [p for p in mine if any(str(q) in _ancestors(p) for q in mine)]
    assert len(mine) == 3 and len(ranks) == 2, mine
    environ = dict(v.split(b"=", 1) for v in open(f"/proc/{ranks[-1]}/environ", "rb").read().split(b"\0") if b"=" in v)
    os.kill(ranks[-1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    assert f"rank {int(environ[b'RANK'])} of the stage was killed or exited" in out, out[-3000:]
    assert "Traceback" not in out.split("error: ")[-1]
    assert not (run_dir / "sft").exists()  # nothing published

    out = finish(pipeline("run", "sft", "--domain", "toy", *half, env=scale()))
    info = stage_json(run_dir)
    assert "resuming from checkpoint-" in out and info["metrics"]["resumed_from_step"] in (4, 8)
    assert info["metrics"]["steps"] == 40 and info["distributed"]["world_size"] == 2


def _ancestors(pid: int) -> list[str]:
    found = []
    while pid > 1:
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        found.append(str(pid))
    return found


@pytest.mark.slow
def test_make_sft_with_nproc_2(toy, workspace):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env |= {"DOMAINS_DIR": str(workspace / "domains"), "RUNS_DIR": str(workspace / "runs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["make", "--no-print-directory", "-o", "setup", "domain=toy", "sft", "NPROC=2",
                           f"MASTER_PORT={free_port()}", "sft.per_device_train_batch_size=2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stage_json(toy)["distributed"]["world_size"] == 2


def test_generated_configs(toy, tmp_path):
    topo = distributed.Topology(nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29555)
    ds3 = load_pack("toy", ["distributed.strategy=deepspeed_zero3", "distributed.fsdp_offload=true"])
    path = distributed.write_configs(ds3, topo, tmp_path / "ds3", cuda=True)
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 16
    assert config["num_machines"] == 2 and config["machine_rank"] == 1 and config["main_process_ip"] == "10.0.0.1"
    ds = json.loads((tmp_path / "ds3" / "deepspeed.json").read_text())
    assert config["deepspeed_config"]["deepspeed_config_file"] == str(tmp_path / "ds3" / "deepspeed.json")
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills batch sizes and precision in

    ds2 = load_pack("toy", ["distributed.strategy=deepspeed_zero2"])
    distributed.write_configs(ds2, topo, tmp_path / "ds2", cuda=True)
    zero = json.loads((tmp_path / "ds2" / "deepspeed.json").read_text())["zero_optimization"]
    assert zero["stage"] == 2 and "offload_optimizer" not in zero and "offload_param" not in zero

    fsdp = yaml.safe_load(distributed.write_configs(
        load_pack("toy", ["distributed.strategy=fsdp", "distributed.fsdp_offload=true"]), topo,
        tmp_path / "fsdp", cuda=True).read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_offload_params"] is True
    ddp = yaml.safe_load(distributed.write_configs(load_pack("toy"), topo, tmp_path / "ddp", cuda=True).read_text())
    assert ddp["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in ddp

    (toy.parent.parent / "domains" / "toy" / "mine.yaml").write_text("distributed_type: MULTI_GPU\n")
    own = distributed.write_configs(load_pack("toy", ["distributed.accelerate_config=mine.yaml"]), topo,
                                    tmp_path / "own", cuda=True)
    assert own.read_text() == "distributed_type: MULTI_GPU\n"
    with pytest.raises(Exception, match="distributed.accelerate_config: no file"):
        distributed.write_configs(load_pack("toy", ["distributed.accelerate_config=nope.yaml"]), topo,
                                  tmp_path / "bad", cuda=True)


def test_topology_from_the_environment():
    from core.errors import PackError

    assert distributed.topology({}).world_size == 1
    topo = distributed.topology({"NPROC": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h"})
    assert topo.world_size == 16 and topo.master_addr == "h"
    with pytest.raises(PackError, match="NODE_RANK=2 must be below NNODES=2"):
        distributed.topology({"NNODES": "2", "NODE_RANK": "2"})
    with pytest.raises(PackError, match="NPROC='two'"):
        distributed.topology({"NPROC": "two"})


def test_the_fingerprint_sees_the_global_batch(toy):
    from pipeline.fingerprint import fingerprint

    def fp(world, overrides=()):
        return fingerprint(load_pack("toy", list(overrides)), "sft", toy, world)[0]

    assert fp(1) == fp(2, ["sft.per_device_train_batch_size=2"]) == fp(4, ["sft.per_device_train_batch_size=1"])
    assert fp(1) == fp(1, ["sft.per_device_train_batch_size=2", "sft.gradient_accumulation_steps=2"])
    assert fp(1) != fp(2)  # 8 conversations a step instead of 4


@pytest.mark.slow
def test_dpo_on_two_processes(workspace, tiny_model_dir):
    pairs = [{"prompt": f"Is bond {i} safe?", "chosen": f"Bond {i} carries credit risk; check its rating.",
              "rejected": "yes totally safe"} for i in range(12)]
    make_pack(workspace, "toy", PACK.format(model=tiny_model_dir, steps=4, save=2).replace(
        "pref: {enabled: false}", "pref: {datasets: [{path: data/pref.jsonl, licence: permissive}], max_steps: 3, "
        "learning_rate: 1.0e-3, per_device_train_batch_size: 2, eval_fraction: 0.25, max_length: 128}"),
        {"data/sft.jsonl": CONVS, "data/pref.jsonl": pairs})
    run_dir = workspace / "runs" / "toy"
    finish(pipeline("run", "pref", "--domain", "toy", "sft.per_device_train_batch_size=2", env=scale()))
    info = stage_json(run_dir, "pref")
    assert info["distributed"]["world_size"] == 2 and info["distributed"]["global_batch_size"] == 4
    assert info["metrics"]["rewards/margins"] > 0 and "eval_rewards/accuracies" in info["metrics"]
    assert (run_dir / "pref" / "adapter" / "adapter_model.safetensors").is_file()


def test_resuming_sharded_checkpoints_needs_the_same_layout(toy, tmp_path):
    from core.errors import PackError

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    two, one = distributed.Topology(nproc=2), distributed.Topology()
    ddp, fsdp = load_pack("toy"), load_pack("toy", ["distributed.strategy=fsdp"])
    distributed.record_world(ddp, two, checkpoints)
    distributed.check_resume_world(ddp, one, checkpoints, "sft")  # DDP checkpoints hold everything: fine
    distributed.record_world(fsdp, two, checkpoints)
    distributed.check_resume_world(fsdp, two, checkpoints, "sft")  # the same layout: fine
    with pytest.raises(PackError, match=r"written by 2 process\(es\) with strategy fsdp.*NPROC x NNODES = 2"):
        distributed.check_resume_world(ddp, one, checkpoints, "sft")


@pytest.mark.slow
def test_a_one_process_run_resumes_on_two(workspace, tiny_model_dir):
    """Killed with 1 process x 4, rerun with 2 x 2: the same global batch, so the same fingerprint, and DDP resumes
    from the one-process checkpoint."""
    make_pack(workspace, "toy", PACK.format(model=tiny_model_dir, steps=24, save=4), {"data/sft.jsonl": CONVS})
    run_dir = workspace / "runs" / "toy"
    proc = pipeline("run", "sft", "--domain", "toy")
    deadline = time.time() + 300
    while not (run_dir / ".work" / "sft" / "checkpoints" / "checkpoint-8").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    out = finish(pipeline("run", "sft", "--domain", "toy", "sft.per_device_train_batch_size=2", env=scale()))
    info = stage_json(run_dir)
    assert "resuming from checkpoint-" in out and info["metrics"]["resumed_from_step"] in (4, 8)
    assert info["metrics"]["steps"] == 24 and info["distributed"]["world_size"] == 2
