"""Training stages on several processes or nodes, under `accelerate launch` (DDP, FSDP2, DeepSpeed ZeRO).

    make domain=finance sft NPROC=8                                       # one node, 8 processes
    make domain=finance sft NPROC=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500   # and NODE_RANK=1

The runner stays one process per node: it decides fingerprints, holds the lock and publishes. For a training
stage with NPROC x NNODES > 1 it writes the Accelerate config (and a DeepSpeed JSON) generated from the pack's
`distributed` section into the stage's work folder, then runs `accelerate launch ... -m pipeline stage --spec <file>`:
every rank builds the same StageContext from a spec file (runner.run_one_rank) and runs the stage module; global
rank 0 alone logs, writes log.jsonl, saves the outputs and hands back its metrics and the group it trained in
(`.metrics.json`; the runner checks the group has the asked-for size). Each rank marks its start and finish in the
spec folder, and a rank that fails writes its error there; the launcher stops the others and the runner raises
the cause (a rank killed, else the first rank's error), so nothing is published and the same command resumes
from the newest checkpoint.

A node with NODE_RANK > 0 builds nothing itself: it waits until node 0 has published the stages a training stage
reads (runs/ must be one shared folder for every node), then joins that stage's launch.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import PackError, show_path
from core.layout import REPO
from core.schema import Pack

STRATEGIES = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
METRICS_FILE = ".metrics.json"  # rank 0's metrics, handed back to the runner
WORLD_FILE = "world.json"  # in the checkpoints folder: the world size and strategy that wrote them


@dataclass(frozen=True)
class Topology:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def topology(env=None) -> Topology:
    """NPROC (processes per node), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT from the environment (the
    Makefile's variables); a bad value is one clear error."""
    env = os.environ if env is None else env
    values, problems = {}, []
    for name, key, low in (("NPROC", "nproc", 1), ("NNODES", "nnodes", 1), ("NODE_RANK", "node_rank", 0),
                           ("MASTER_PORT", "master_port", 1)):
        raw = env.get(name, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < low:
                problems.append(f"{name}={raw!r} is not a whole number >= {low}")
            else:
                values[key] = int(raw)
    if env.get("MASTER_ADDR", "").strip():
        values["master_addr"] = env["MASTER_ADDR"].strip()
    topo = Topology(**values)
    if not problems and topo.node_rank >= topo.nnodes:
        problems.append(f"NODE_RANK={topo.node_rank} must be below NNODES={topo.nnodes} (ranks count from 0)")
    if problems:
        raise PackError(problems, "bad scale-out settings")
    return topo


def is_main_rank() -> bool:
    """Global rank 0 (a single process is rank 0 too)."""
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------------------- configs


def deepspeed_config(pack: Pack, cuda: bool) -> dict:
    """DeepSpeed ZeRO 2 or 3; batch sizes and precision are left to the HF Trainer ("auto")."""
    stage = 3 if pack.distributed.strategy == "deepspeed_zero3" else 2
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": "auto"}
    if stage == 3:
        zero |= {"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                 "stage3_gather_16bit_weights_on_model_save": True}  # save_pretrained gets whole weights
    if pack.distributed.fsdp_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}


def accelerate_config(pack: Pack, topo: Topology, cuda: bool, deepspeed_file: Path | None = None) -> dict:
    """Accelerate's config file (what `accelerate config` would write) for the pack's strategy."""
    strategy = pack.distributed.strategy
    # DDP on CPUs too is MULTI_GPU here: Accelerate starts a MULTI_CPU config through mpirun only, and without an
    # MPI host file it starts ONE process; MULTI_GPU's launcher is torchrun, and ACCELERATE_USE_CPU (launch_stage)
    # makes each rank join a gloo group on the CPU
    kind = STRATEGIES[strategy]
    config: dict = {"compute_environment": "LOCAL_MACHINE", "distributed_type": kind,
                    "num_processes": topo.world_size, "num_machines": topo.nnodes, "machine_rank": topo.node_rank,
                    "main_process_ip": topo.master_addr, "main_process_port": topo.master_port,
                    "rdzv_backend": "static", "same_network": True, "use_cpu": not cuda,
                    "mixed_precision": "no",  # the Trainer sets bf16/fp16 itself (pipeline/training.py)
                    "downcast_bf16": "no", "debug": False}
    if strategy == "fsdp":
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_offload_params": pack.distributed.fsdp_offload, "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",  # checkpoints: each rank its shard (resume)
            "fsdp_cpu_ram_efficient_loading": cuda, "fsdp_activation_checkpointing": False}
    elif kind == "DEEPSPEED":
        config["deepspeed_config"] = {"deepspeed_config_file": str(deepspeed_file),
                                      "zero3_init_flag": strategy == "deepspeed_zero3"}
    return config


def write_configs(pack: Pack, topo: Topology, folder: Path, cuda: bool) -> Path:
    """accelerate_config.yaml (and deepspeed.json) in `folder`, generated or the pack's own file copied."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "accelerate_config.yaml"
    if pack.distributed.accelerate_config:
        own = (pack.dir / pack.distributed.accelerate_config).resolve()
        if not own.is_file():
            raise PackError(f"distributed.accelerate_config: no file {show_path(own)}; name an Accelerate config "
                            "file (relative to the pack folder) or remove the key to have one generated")
        shutil.copy(own, target)
        return target
    ds_file = None
    if pack.distributed.strategy.startswith("deepspeed"):
        ds_file = folder / "deepspeed.json"
        ds_file.write_text(json.dumps(deepspeed_config(pack, cuda), indent=2) + "\n")
    target.write_text(yaml.safe_dump(accelerate_config(pack, topo, cuda, ds_file), sort_keys=False))
    return target


def launch_command(config_file: Path, topo: Topology, spec: Path) -> list[str]:
    """`accelerate launch` of one stage on this node; the topology flags win over the config file's."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(topo.world_size), "--num_machines", str(topo.nnodes),
            "--machine_rank", str(topo.node_rank), "--main_process_ip", topo.master_addr,
            "--main_process_port", str(topo.master_port), "--max_restarts", "0",
            "-m", "pipeline", "stage", "--spec", str(spec)]


# ------------------------------------------------------------------------------------------ launching


def check_resume_world(pack: Pack, topo: Topology, checkpoints: Path, stage: str) -> None:
    """Resuming with another world size: DDP checkpoints hold whole optimizer state and work (the global batch,
    which the fingerprint fixes, is the same); FSDP and DeepSpeed checkpoints are sharded per rank: an error."""
    path = checkpoints / WORLD_FILE
    if not path.is_file() or not any(checkpoints.glob("checkpoint-*")):
        return
    was = json.loads(path.read_text())
    now = {"world_size": topo.world_size, "strategy": pack.distributed.strategy if topo.world_size > 1 else "single"}
    sharded = {"fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    if was != now and (was["strategy"] in sharded or now["strategy"] in sharded):
        raise PackError(
            f"{stage}: its checkpoints in {show_path(checkpoints)} were written by {was['world_size']} process(es) "
            f"with strategy {was['strategy']}, and this run has {now['world_size']} with {now['strategy']}; sharded "
            f"checkpoints resume only on the same layout. Rerun with NPROC x NNODES = {was['world_size']} "
            f"(distributed.strategy={was['strategy']}), or FORCE=1 to start the stage over")


def record_world(pack: Pack, topo: Topology, checkpoints: Path) -> None:
    checkpoints.mkdir(parents=True, exist_ok=True)
    strategy = pack.distributed.strategy if topo.world_size > 1 else "single"
    (checkpoints / WORLD_FILE).write_text(json.dumps({"world_size": topo.world_size, "strategy": strategy}))


def check_strategy(pack: Pack, topo: Topology, cuda: bool) -> None:
    """Sharded strategies need GPUs: Accelerate runs FSDP and DeepSpeed only on accelerators (on a CPU its ranks
    would silently train as plain DDP), so say so before anything runs."""
    strategy = pack.distributed.strategy
    if topo.world_size > 1 and not cuda and strategy != "ddp" and not pack.distributed.accelerate_config:
        raise PackError(f"distributed.strategy={strategy} needs GPUs: Accelerate runs FSDP and DeepSpeed only on "
                        "accelerators, and this machine has none. Use distributed.strategy=ddp here (every process "
                        "holds the whole model), or run on a CUDA machine")


def launch_stage(ctx, topo: Topology, cuda: bool) -> dict:
    """Run ctx.stage on every rank of this node under `accelerate launch`; return rank 0's metrics (node 0),
    after checking that the ranks trained as one group of the expected world size and kind."""
    with tempfile.TemporaryDirectory(prefix=f"{ctx.stage}-spec-") as tmp:
        # node 0's config is published with the stage; another node's (its machine_rank) stays in its temp folder
        config_file = write_configs(ctx.pack, topo, ctx.out if topo.node_rank == 0 else Path(tmp), cuda)
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"pack": ctx.pack.model_dump(mode="json"), "pack_dir": str(ctx.pack.dir),
                                    "stage": ctx.stage, "run_dir": str(ctx.run_dir), "out": str(ctx.out),
                                    "fingerprint": ctx.fingerprint}))
        ctx.log(f"accelerate launch: {topo.world_size} processes ({topo.nproc} on each of {topo.nnodes} node(s), "
                f"this is node {topo.node_rank}), strategy {ctx.pack.distributed.strategy}, "
                f"config {show_path(config_file)}")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        if not cuda:
            env["ACCELERATE_USE_CPU"] = "true"  # each rank: a gloo group on the CPU (see accelerate_config)
        proc = subprocess.run(launch_command(config_file, topo, spec), env=env)
        if proc.returncode != 0:
            raise launch_error(ctx.stage, Path(tmp), proc.returncode)
    metrics_file = ctx.out / METRICS_FILE
    if topo.node_rank > 0:
        return {}
    handed = json.loads(metrics_file.read_text())
    metrics_file.unlink()
    group, expected = handed["group"], expected_group(ctx.pack, cuda)
    if group["processes"] != topo.world_size or (expected and group["type"] != expected):
        raise PackError(f"{ctx.stage}: accelerate launch was asked for {topo.world_size} processes "
                        f"({ctx.pack.distributed.strategy}), but rank 0 trained in a group of {group['processes']} "
                        f"({group['type']}); nothing was published. Check the Accelerate config "
                        f"(distributed.accelerate_config) and the NPROC/NNODES of every node")
    return handed["metrics"]


def ranks_marked(folder: Path, pattern: str) -> list[int]:
    """The ranks that left `pattern` (e.g. `error-rank*.txt`) in the spec folder, in order."""
    return sorted(int(p.name.split("rank")[1].split(".")[0]) for p in folder.glob(pattern))


def launch_error(stage: str, folder: Path, status: int) -> PackError:
    """Why a launch failed. A rank that started and left neither an error nor its finish mark was killed (or
    exited silently): the cause, even when the ranks it left behind then fail in a collective."""
    errored = ranks_marked(folder, "error-rank*.txt")
    killed = sorted(set(ranks_marked(folder, "rank*.started")) - set(errored)
                    - set(ranks_marked(folder, "rank*.finished")))
    if killed or not errored:
        which = f"rank {killed[0]}" if killed else "a process"
        return PackError(f"{stage}: {which} of the stage was killed or exited without an error (accelerate launch "
                         f"exit status {status}; its output is above). Nothing was published; the same command "
                         "resumes from the newest checkpoint")
    return PackError(f"{stage} failed on rank {errored[0]}: "
                     f"{(folder / f'error-rank{errored[0]}.txt').read_text().strip()}")


def expected_group(pack: Pack, cuda: bool) -> str | None:
    """The distributed type Accelerate reports on every rank for the pack's strategy (None: the user's own
    config decides)."""
    if pack.distributed.accelerate_config:
        return None
    return STRATEGIES[pack.distributed.strategy] if cuda else "MULTI_CPU"


def group_of_this_rank() -> dict:
    """The group this rank trained in, as Accelerate set it up: {processes, type}."""
    from accelerate import PartialState

    state = PartialState()
    return {"processes": state.num_processes, "type": state.distributed_type.value}


def wait_for_upstream(pack: Pack, stage: str, run_dir: Path, fingerprint, log, timeout_s: float = 24 * 3600) -> None:
    """A node with NODE_RANK > 0: wait until node 0 has published every stage `stage` reads, up to date."""
    from core import stages
    from core.layout import read_stage

    deadline, said = time.time() + timeout_s, False
    while True:
        pending = [up for up in stages.upstream(stage)
                   if (read_stage(run_dir, up) or {}).get("fingerprint") != fingerprint(pack, up, run_dir)[0]]
        if not pending:
            return
        if time.time() > deadline:
            raise PackError(f"{stage}: node 0 did not publish {', '.join(pending)} in {show_path(run_dir)} within "
                            f"{timeout_s:.0f} s; runs/ must be a folder every node shares (RUNS_DIR)")
        if not said:
            log(f"waiting for node 0 to publish {', '.join(pending)}")
            said = True
        time.sleep(2)
