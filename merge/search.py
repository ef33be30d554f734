"""`merge.search: t`: a light alternative to mergekit-evolve for the SLERP weight.

Merges the pack's recipe and a few uniform SLERP weights, scores each on the pack's held-out data (mean
token loss on the assistant turns of eval.sft conversations, else on eval.text, with the eval stage's scorer),
and keeps the lowest. Every candidate's score is
recorded in stage.json. Candidates stay strictly between 0 and 1: the ends are the unmerged parents.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import yaml

from core.chat import with_system
from core.errors import PackError
from core.rows import load_rows
from core.scoring import Scorer
from merge.execute import copy_base_files, mergekit_merge

GRID = (0.3, 0.5, 0.7)
MAX_ROWS = 32


def heldout_rows(pack) -> tuple[str, list]:
    """('eval.sft' or 'eval.text', its first MAX_ROWS rows: conversations with the system prompt, or texts)."""
    if pack.eval.sft:
        rows = load_rows(pack, pack.eval.sft, "chat", "eval.sft")[:MAX_ROWS]
        return "eval.sft", [with_system(r["messages"], pack.system_prompt) for r in rows]
    if pack.eval.text:
        rows = load_rows(pack, pack.eval.text, "text", "eval.text")[:MAX_ROWS]
        return "eval.text", [r["text"] for r in rows]
    raise PackError("merge.search: t scores candidates on held-out data, but the pack lists no eval.sft or "
                    "eval.text; add one, or set merge.search: none")


def held_out_loss(folder: Path, source: str, items: list) -> float:
    """Mean token loss of a candidate, scored as the eval stage scores (core/scoring.py): the assistant tokens
    of eval.sft conversations, or every token of eval.text."""
    scorer = Scorer(folder)
    nll, n = scorer.conversation_nll(items) if source == "eval.sft" else scorer.text_nll(items)
    return nll / max(n, 1)


def search_t(ctx, config: dict, recipe_yaml: str, base: Path) -> dict:
    """Merge every candidate into ctx.out/search/, score it, return the best folder and every score."""
    source, items = heldout_rows(ctx.pack)
    candidates = {"recipe": (config, recipe_yaml)}
    for t in GRID:
        cand, named = copy.deepcopy(config), copy.deepcopy(ctx.pack.merge.config)
        for c in (cand, named):
            c["parameters"] = {**(c.get("parameters") or {}), "t": t}
        candidates[f"t={t}"] = (cand, yaml.safe_dump(named, sort_keys=False))
    scores, device = [], None
    for name, (cand, cand_yaml) in candidates.items():
        folder = ctx.out / "search" / name
        if folder.exists():
            shutil.rmtree(folder)
        device = mergekit_merge(cand, folder, cand_yaml, ctx.log)
        copy_base_files(base, folder)
        loss = held_out_loss(folder, source, items)
        ctx.log(f"search {name}: held-out loss {loss:.4f} on {len(items)} {source} rows")
        scores.append({"candidate": name, "t": cand["parameters"]["t"], "loss": round(loss, 5)})
    best = min(scores, key=lambda s: s["loss"])
    return {"folder": ctx.out / "search" / best["candidate"], "device": device, "scored_on": source,
            "rows": len(items), "candidates": scores, "chosen": best["candidate"]}
