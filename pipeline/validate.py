"""`make validate`: every problem of a pack's data and merge recipe at once, before any weight is read.

    python -m pipeline validate --domain finance
"""
from __future__ import annotations

from core.errors import PackError, show_path
from core.rows import EVAL_KIND, load_source, stage_kind
from core.schema import Pack
from core.stages import TRAIN_STAGES
from merge.recipes import validate_merge
from pipeline.base import read_chat_template


def validate_data(pack: Pack) -> list[str]:
    """Every data problem of the pack at once: what `make validate` prints."""
    problems: list[str] = []
    where = show_path(pack.dir / "pack.yaml")
    for stage in TRAIN_STAGES:
        kind = stage_kind(pack, stage)
        section = getattr(pack, stage)
        if not section.enabled:
            continue
        sources = pack.sources(stage)
        if not sources:
            key = "hub_datasets" if pack.data == "hub" else "datasets"
            dropped = len(getattr(section, key))
            why = f" (licence=permissive dropped {dropped} non-commercial source(s))" if dropped else ""
            problems.append(f"{where}: {stage}.{key}: no dataset for an enabled stage{why}; "
                            f"add one or set {stage}.enabled: false")
        for src in sources:
            if src.hub and pack.data != "hub":
                continue
            try:
                problems += load_source(src, pack.dir, kind)[1]
            except PackError as e:
                problems += e.problems
    if pack.eval.enabled:
        for key, kind in EVAL_KIND.items():
            for src in getattr(pack.eval, key):
                try:
                    problems += load_source(src, pack.dir, kind)[1]
                except PackError as e:
                    problems += e.problems
    base = pack.base
    if base.model.startswith((".", "/")) and not (pack.dir / base.model).is_dir():
        problems.append(f"{where}: base.model: folder {base.model} not found (relative to the pack folder)")
    if base.chat_template not in ("model", "chatml"):
        try:
            read_chat_template(pack.dir, base.chat_template)
        except PackError as e:
            problems.append(f"{where}: {e.problems[0]}" if e.problems[0].startswith("base.") else e.problems[0])
    problems += validate_merge(pack)
    return problems
