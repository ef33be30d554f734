"""`merge.search: t`: a light alternative to mergekit-evolve for the SLERP weight.

Merges the pack's recipe and a few uniform SLERP weights, scores each on the pack's held-out data (mean
token loss on eval.sft conversations, else eval.text), and keeps the lowest. Every candidate's score is
recorded in stage.json. Candidates stay strictly between 0 and 1: the ends are the unmerged parents.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import yaml

from pipeline.pack import PackError

GRID = (0.3, 0.5, 0.7)
MAX_ROWS = 32
MAX_LENGTH = 512


def heldout_texts(pack) -> tuple[str, list[str]]:
    """('eval.sft' or 'eval.text', texts rendered as the model sees them)."""
    from pipeline.data import load_rows

    if pack.eval.sft:
        rows = load_rows(pack, pack.eval.sft, "chat", "eval.sft")[:MAX_ROWS]
        return "eval.sft", [r["messages"] for r in rows]
    if pack.eval.text:
        rows = load_rows(pack, pack.eval.text, "text", "eval.text")[:MAX_ROWS]
        return "eval.text", [r["text"] for r in rows]
    raise PackError("merge.search: t scores candidates on held-out data, but the pack lists no eval.sft or "
                    "eval.text; add one, or set merge.search: none")


def held_out_loss(folder: Path, items: list, system_prompt: str) -> float:
    """Mean next-token loss over every token of the held-out items (conversations or plain text)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            if isinstance(item, list):
                msgs = ([{"role": "system", "content": system_prompt}] if system_prompt
                        and item[0]["role"] != "system" else []) + item
                text = tok.apply_chat_template(msgs, tokenize=False)
            else:
                text = item
            ids = tok(text, return_tensors="pt", truncation=True, max_length=MAX_LENGTH)["input_ids"].to(device)
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / max(count, 1)


def search_t(ctx, config: dict, recipe_yaml: str, base: Path) -> dict:
    """Merge every candidate into ctx.out/search/, score it, return the best folder and every score."""
    from pipeline.merge import copy_base_files, mergekit_merge

    source, items = heldout_texts(ctx.pack)
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
        loss = held_out_loss(folder, items, ctx.pack.system_prompt)
        ctx.log(f"search {name}: held-out loss {loss:.4f} on {len(items)} {source} rows")
        scores.append({"candidate": name, "t": cand["parameters"]["t"], "loss": round(loss, 5)})
    best = min(scores, key=lambda s: s["loss"])
    return {"folder": ctx.out / "search" / best["candidate"], "device": device, "scored_on": source,
            "rows": len(items), "candidates": scores, "chosen": best["candidate"]}
