"""The stage runner: order, fingerprints, skip, atomic publish and stage.json.

    python -m pipeline run sft --domain finance        # builds base, cpt, sft as needed

Each stage is a module with `run(ctx) -> metrics` that writes into `ctx.out`, a work folder under
`runs/<domain>/.work/<stage>/`. Only when it returns is the folder renamed to `runs/<domain>/<stage>/`,
so a crash never leaves a half-written stage behind and never touches an earlier stage's output. A rerun
with the same fingerprint keeps the work folder, so training resumes from its checkpoints.

Fingerprint = sha256 of the stage's resolved config + the content of its data files (for base also a .jinja
chat template's, for merge with `search: t` the held-out data it picks by) + the fingerprints of the stages
it reads; for base also the model's identity (pipeline/base.py `base_identity`). Unchanged -> skipped with
one log line (and one warning when it was built with other package versions); changed -> that stage and
(through the chain of fingerprints) everything downstream reruns; FORCE=1 reruns the stage asked for.
"""
from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core import layout, stages
from core.errors import PackError, show_path
from core.layout import model_dir, read_stage
from core.schema import Pack
from core.stages import TRAIN_STAGES
from pipeline import distributed
from pipeline.fingerprint import fingerprint, package_versions


def log(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", flush=True)


@dataclass
class StageContext:
    """What a stage module gets: its pack, its output folder and the way to earlier stages' models."""

    pack: Pack
    stage: str
    run_dir: Path
    out: Path
    fingerprint: str
    log: Callable[[str], None] = field(repr=False, default=print)

    def model_dir(self, stage: str) -> Path:
        return model_dir(self.run_dir, stage)

    def input_model(self) -> Path:
        """The model this stage starts from: the previous stage's (following disabled stages)."""
        return self.model_dir(stages.upstream(self.stage)[-1])


def warn_packages(pack: Pack, stage: str, info: dict) -> None:
    """One line when an up-to-date stage was built with other package versions. Not a rerun: a patch release
    rarely changes a model, and retraining is the user's call."""
    built, now = info.get("packages") or {}, package_versions()
    changed = [f"{name} {built.get(name, 'not installed')} -> {now.get(name, 'not installed')}"
               for name in sorted(set(built) | set(now)) if built.get(name) != now.get(name)]
    if built and changed:
        log(stage, f"warning: built with other package versions ({', '.join(changed)}); kept as it is, "
                   f"`make domain={pack.name} {stage} FORCE=1` rebuilds it")


def _publish(work: Path, final: Path) -> None:
    """Rename the finished work folder into place, replacing an older output of the same stage."""
    old = work.with_name(work.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    work.rename(final)
    if old.exists():
        shutil.rmtree(old)


def run_stage(pack: Pack, stage: str, run_dir: Path, force: bool = False,
              topo: distributed.Topology | None = None) -> dict:
    """Run one stage if its fingerprint changed (or force); return its stage.json content. A training stage
    with NPROC x NNODES > 1 runs under `accelerate launch` (pipeline/distributed.py); this process publishes."""
    topo = topo or distributed.topology()
    fp, inputs = fingerprint(pack, stage, run_dir, topo.world_size)
    current = read_stage(run_dir, stage)
    if current and current.get("fingerprint") == fp and not force:
        log(stage, f"up to date (fingerprint {fp}), skipped; FORCE=1 reruns it")
        warn_packages(pack, stage, current)
        return {**current, "skipped": True}  # "skipped" is for the caller; stage.json stays as it is

    work = layout.work_dir(run_dir, stage)
    stamp = work / ".fingerprint"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != fp or force):
        shutil.rmtree(work)  # leftovers of a different config: no resuming from those
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp)

    section = getattr(pack, stage, None)
    start = time.time()
    if section is not None and hasattr(section, "enabled") and not section.enabled:
        log(stage, "disabled in the pack: passing its input through")
        upstream = stages.upstream(stage)[-1]
        metrics: dict = {}
        model = os.path.relpath(model_dir(run_dir, upstream), run_dir / stage) if stage != "eval" else None
        extra = {"disabled": True}
    else:
        before = f"; its last build took {current['wall_time_s']:.0f}s" if (current or {}).get("wall_time_s") else ""
        log(stage, f"running (fingerprint {fp}{before})")
        module = importlib.import_module(stages.BY_NAME[stage].module)
        ctx = StageContext(pack=pack, stage=stage, run_dir=run_dir, out=work, fingerprint=fp,
                           log=lambda m: log(stage, m))
        extra = {}
        if stage in TRAIN_STAGES:
            metrics = _train(ctx, module, topo)
            extra["distributed"] = _scale_summary(pack, stage, topo, metrics)
        else:
            metrics = module.run(ctx) or {}
        model = "model" if (work / "model").is_dir() else None
        if inputs.get("model") == {"hub_revision": None}:
            # a hub model this run downloaded: record the revision it got, or the next run sees a new one
            fp, inputs = fingerprint(pack, stage, run_dir, topo.world_size)
    wall = time.time() - start
    info = {
        "stage": stage,
        "domain": pack.name,
        "fingerprint": fp,
        "inputs": {k: inputs[k] for k in ("upstream", "data", "model") if k in inputs},
        "config": inputs["config"],
        "model": model,
        "metrics": metrics,
        "tokens": metrics.get("tokens"),
        "wall_time_s": round(wall, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "packages": package_versions(),
        **extra,
    }
    layout.write_stage(work, info)
    stamp.unlink()
    _publish(work, layout.stage_dir(run_dir, stage))
    log(stage, f"done in {wall:.1f}s -> {show_path(layout.stage_dir(run_dir, stage))}")
    return info


def _train(ctx: StageContext, module, topo: distributed.Topology) -> dict:
    """A training stage in this process, or under `accelerate launch` when NPROC x NNODES > 1."""
    from pipeline.backend import cuda_available
    from pipeline.training import last_checkpoint

    checkpoints = ctx.out / "checkpoints"
    last_checkpoint(ctx, delete_cut_short=True)  # a checkpoint a kill cut short goes, before any rank runs
    distributed.check_resume_world(ctx.pack, topo, checkpoints, ctx.stage)
    distributed.record_world(ctx.pack, topo, checkpoints)
    if topo.world_size == 1:
        return module.run(ctx) or {}
    return distributed.launch_stage(ctx, topo, cuda_available())


def run_one_rank(spec_path: str) -> None:
    """`python -m pipeline stage --spec FILE`, what each rank of a launched stage runs (pipeline/distributed.py):
    the stage module on the runner's StageContext. Global rank 0 alone logs and hands its metrics back; a rank
    that fails leaves its error beside the spec for the runner to report."""
    import traceback

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    marks = Path(spec_path).parent  # started, finished or an error: what the runner reads if the launch fails
    (marks / f"rank{rank}.started").touch()
    try:
        pack = Pack.model_validate(spec["pack"])
        pack._dir = Path(spec["pack_dir"])
        stage = spec["stage"]
        ctx = StageContext(pack=pack, stage=stage, run_dir=Path(spec["run_dir"]), out=Path(spec["out"]),
                           fingerprint=spec["fingerprint"],
                           log=(lambda m: log(stage, m)) if rank == 0 else (lambda m: None))
        metrics = importlib.import_module(stages.BY_NAME[stage].module).run(ctx) or {}
    except BaseException as e:
        text = e.render().removeprefix("error: ") if isinstance(e, PackError) else traceback.format_exc(limit=-8)
        (marks / f"error-rank{rank}.txt").write_text(text)
        raise
    if rank == 0:
        tmp = ctx.out / ".metrics.json.tmp"
        tmp.write_text(json.dumps({"metrics": metrics, "group": distributed.group_of_this_rank()}, default=float))
        os.replace(tmp, ctx.out / distributed.METRICS_FILE)
    (marks / f"rank{rank}.finished").touch()


def _scale_summary(pack: Pack, stage: str, topo: distributed.Topology, metrics: dict) -> dict:
    section = getattr(pack, stage)
    per_device = section.per_device_train_batch_size
    total = metrics.get("tokens_per_s")
    return {"world_size": topo.world_size, "nodes": topo.nnodes, "processes_per_node": topo.nproc,
            "strategy": pack.distributed.strategy if topo.world_size > 1 else "single",
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": section.gradient_accumulation_steps,
            "global_batch_size": per_device * section.gradient_accumulation_steps * topo.world_size,
            "tokens_per_s": total,
            "tokens_per_s_per_device": round(total / topo.world_size, 1) if total is not None else None}


def run_worker_node(pack: Pack, order, run_dir: Path, topo: distributed.Topology, forced: set) -> list[dict]:
    """NODE_RANK > 0: join the launch of every training stage node 0 runs; node 0 alone builds and publishes.
    No lock: node 0 holds it, and this node writes nothing under runs/ itself."""
    from pipeline.backend import cuda_available

    done = []
    for stage in order:
        if stage not in TRAIN_STAGES or not getattr(pack, stage).enabled:
            continue
        distributed.wait_for_upstream(pack, stage, run_dir, fingerprint, lambda m: log(stage, m))
        fp, _ = fingerprint(pack, stage, run_dir, topo.world_size)
        current = read_stage(run_dir, stage)
        if current and current.get("fingerprint") == fp and stage not in forced:
            log(stage, f"up to date (fingerprint {fp}), skipped")
            continue
        log(stage, f"node {topo.node_rank}: joining the stage's launch (fingerprint {fp})")
        ctx = StageContext(pack=pack, stage=stage, run_dir=run_dir, out=layout.work_dir(run_dir, stage),
                           fingerprint=fp, log=lambda m: log(stage, m))
        distributed.launch_stage(ctx, topo, cuda_available())
        done.append({"stage": stage, "fingerprint": fp, "node_rank": topo.node_rank})
    return done


class RunLock:
    """One run per domain at a time: a second `make` on the same domain gets a clear error."""

    def __init__(self, run_dir: Path):
        self.path = layout.lock_path(run_dir)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PackError(f"another run of '{self.path.parent.name}' is in progress "
                            f"(lock {show_path(self.path)}); wait for it or stop it")
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def run(pack: Pack, target: str, force: bool = False, run_dir: Path | None = None) -> list[dict]:
    """Run every stage up to `target` ('all' = every stage) in order; FORCE reruns `target` (every one for 'all')."""
    run_dir = run_dir or layout.run_dir(pack.name)
    if target == "all":
        order, forced = stages.STAGES, set(stages.STAGES) if force else set()
    else:
        if target not in stages.BY_NAME:
            raise PackError(f"unknown stage '{target}'; the stages are {', '.join(stages.STAGES)}")
        order, forced = stages.up_to(target), {target} if force else set()
    from pipeline.backend import import_unsloth_first

    import_unsloth_first([getattr(pack, s) for s in order if s in stages.TRAIN_STAGES])
    topo = distributed.topology()
    if any(s in stages.TRAIN_STAGES for s in order):
        from pipeline.backend import cuda_available

        distributed.check_strategy(pack, topo, cuda_available())
    if topo.node_rank > 0:
        return run_worker_node(pack, order, run_dir, topo, forced)
    if any(getattr(pack, s).enabled for s in order if s in stages.TRAIN_STAGES):
        from pipeline.tracking import tracking

        tracking(pack, run_dir)  # a tracker asked for but not installed: said before any stage runs
    with RunLock(run_dir):
        start, done, walls = time.time(), [], {}
        for s in order:
            t = time.time()
            info = run_stage(pack, s, run_dir, force=s in forced, topo=topo)
            done.append(info)
            walls[s] = None if info.get("skipped") else time.time() - t
        log(target, summary_line(walls, time.time() - start))
        return done


def summary_line(walls: dict[str, float | None], total: float) -> str:
    """`took 612s in all: cpt 170s, sft 198s, ... (up to date: base)`: where a run's time went (None: skipped)."""
    ran = [f"{s} {w:.1f}s" for s, w in walls.items() if w is not None]
    kept = [s for s, w in walls.items() if w is None]
    return (f"took {total:.0f}s in all" + (f": {', '.join(ran)}" if ran else "")
            + (f" (up to date: {', '.join(kept)})" if kept else ""))
