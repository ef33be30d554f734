"""Merge stage: combine the base (instruct) model with the tuned stages using mergekit.

    python -m pipeline run merge --domain finance         # or: make domain=finance merge

The recipe is the pack's `merge.config`, a mergekit configuration whose models are stage names (see
merge/recipes.py); by default gradient SLERP from base (t=0) to the tuned model. Steps: validate the
recipe (no weights read), resolve stage names to model folders, pre-merge checks (architecture, vocab,
special tokens, chat template), mergekit's Python API (lazy loading; CUDA when present), the base
model's tokenizer, chat template and generation config copied in, `merge.search: t` if asked, then the
post-merge checks. Every check goes into the metrics, hence into stage.json.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from core.errors import PackError
from core.rows import load_rows
from merge.checks import DEFAULT_PROMPT, post_merge, pre_merge
from merge.execute import copy_base_files, copy_model, mergekit_merge
from merge.recipes import NONE, resolve


def _unique_inputs(folders: dict[str, Path]) -> dict[str, Path]:
    """One entry per model folder, named by every stage name that points to it (e.g. 'pref=tuned')."""
    by_path: dict[Path, list[str]] = {}
    for name, path in folders.items():
        by_path.setdefault(path, []).append(name)
    return {"=".join(names): path for path, names in by_path.items()}


def check_prompt(pack) -> str:
    """The first of the pack's eval prompts, or a generic one when it has none."""
    if pack.eval.prompts:
        try:
            return load_rows(pack, pack.eval.prompts, "prompt", "eval.prompts")[0]["prompt"]
        except PackError:
            pass  # validate reports broken eval data; the merge check falls back to a generic prompt
    return DEFAULT_PROMPT


def run(ctx) -> dict:
    spec = ctx.pack.merge
    config, folders = resolve(ctx.pack, ctx.run_dir)
    base = ctx.model_dir("base")
    method = config["merge_method"]
    recipe_yaml = yaml.safe_dump(spec.config, sort_keys=False)  # mergekit_config.yml, with stage names
    warnings: list[str] = []

    unique = _unique_inputs(folders)
    ctx.log("inputs: " + ", ".join(f"{n} -> {p}" for n, p in unique.items()))
    if 1 < len(unique) < len(folders):
        same = [n for n in unique if "=" in n]
        raise PackError(f"merge.config names one model twice ({', '.join(same)} are the same folder, because "
                        "a stage is disabled or 'tuned' is listed beside pref); list each model once")
    clock = time.time()
    pre = pre_merge(unique if base in unique.values() else {"base": base, **unique})
    seconds = {"pre_checks": round(time.time() - clock, 1)}

    out = ctx.out / "model"
    if out.exists():
        shutil.rmtree(out)  # a half-written merge from a crashed run: merging again is cheap
    search, clock = None, time.time()
    if method == NONE or len(unique) == 1:
        if method != NONE:
            warnings.append(f"every input of the {method} recipe is the same model ({next(iter(unique))}: "
                            "training stages disabled?), so it is passed through unmerged")
        src = next(iter(unique.values()))
        ctx.log(f"pass-through of {src}")
        copy_model(src, out)
        device = None
    elif spec.search == "t":
        from merge.search import search_t

        search = search_t(ctx, config, recipe_yaml, base)
        shutil.move(search.pop("folder"), out)
        device = search.pop("device")
        shutil.rmtree(ctx.out / "search", ignore_errors=True)
    else:
        device = mergekit_merge(config, out, recipe_yaml, ctx.log)
    copied = copy_base_files(base, out)
    seconds["merge"] = round(time.time() - clock, 1)

    ctx.log("post-merge checks: NaN/inf, sizes, load, greedy generation")
    clock = time.time()
    post = post_merge(out, check_prompt(ctx.pack), ctx.pack.system_prompt)
    seconds["post_checks"] = round(time.time() - clock, 1)
    warnings += post.pop("warnings")
    for w in warnings:
        ctx.log(f"warning: {w}")
    ctx.log(f"answer to the check prompt: {post['answer'][:120]!r}")
    metrics = {"method": method, "device": device, "dtype": post["saved_dtype"], "inputs": pre["inputs"],
               "pre_checks": pre, "post_checks": post, "base_files_copied": copied, "warnings": warnings, "seconds": seconds}
    if search is not None:
        metrics["search"] = search
    return metrics
