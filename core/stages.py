"""The one table of stages: their order, the module that runs each, and what each reads.

    base -> cpt -> sft -> pref -> merge -> eval -> report      (then serve, which is not a stage)

Everything that names stages (the runner, the CLI's choices, the report, eval's list of models, the merge
recipe's model names, the Makefile's targets, which tests/test_layers.py compares) reads them from here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # imported by the runner; has run(ctx) -> metrics
    upstream: tuple[str, ...]  # stages it reads; their fingerprints are part of its own, the last is its input
    rows: str | None = None  # training stages: the row kind of their datasets (see core/rows.py)
    has_model: bool = False  # publishes a full-weight model/ folder


TABLE = (
    Stage("base", "pipeline.base", (), has_model=True),
    Stage("cpt", "pipeline.cpt", ("base",), rows="text", has_model=True),
    Stage("sft", "pipeline.sft", ("cpt",), rows="chat", has_model=True),
    Stage("pref", "pipeline.pref", ("sft",), rows="pref", has_model=True),
    Stage("merge", "pipeline.merge", ("base", "pref"), has_model=True),
    Stage("eval", "pipeline.evaluate", ("merge",)),
    Stage("report", "pipeline.report", ("eval",)),
)
BY_NAME = {s.name: s for s in TABLE}
STAGES = tuple(s.name for s in TABLE)
TRAIN_STAGES = tuple(s.name for s in TABLE if s.rows)  # cpt, sft, pref
MODEL_STAGES = tuple(s.name for s in TABLE if s.has_model)  # base, cpt, sft, pref, merge
# The merge recipe names its models by stage; 'tuned' is the last training stage's output.
TUNED = "tuned"
MERGE_REFS = ("base", *TRAIN_STAGES, TUNED)


def upstream(stage: str) -> tuple[str, ...]:
    return BY_NAME[stage].upstream


def up_to(stage: str) -> tuple[str, ...]:
    """Every stage from the first to `stage`, in order."""
    return STAGES[: STAGES.index(stage) + 1]


def stage_of_ref(ref: str) -> str:
    """The stage behind a merge recipe's model name: 'tuned' is the last training stage's output (which
    follows disabled stages through)."""
    return TRAIN_STAGES[-1] if ref == TUNED else ref
