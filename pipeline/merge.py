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

from pipeline.pack import PackError

# What "keeps the base tokenizer" copies: every tokenizer file transformers or mergekit may write, and
# the generation config (its EOS ids include the chat template's end-of-turn token).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json")


def copy_base_files(base: Path, out: Path) -> list[str]:
    for name in TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)  # a tokenizer file the base lacks must not survive from an input
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
            copied.append(name)
    return copied


def copy_model(src: Path, out: Path) -> None:
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.bin", "optimizer*", "checkpoint-*"))


def mergekit_merge(config: dict, out: Path, recipe_yaml: str, log) -> str:
    """Run mergekit's Python API into `out`; returns the device used."""
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = MergeOptions(cuda=device == "cuda", device=device, lazy_unpickle=True, copy_tokenizer=False,
                           write_model_card=True, safe_serialization=True, quiet=False)
    log(f"mergekit {config['merge_method']} on {device}")
    try:
        run_merge(MergeConfiguration.model_validate(config), str(out), options, config_source=recipe_yaml)
    except (RuntimeError, ValueError, KeyError) as e:
        # mergekit reports recipe problems it can only see with the weights (e.g. a parameter a method
        # needs) as exceptions; they are the recipe's to fix, so show them without a traceback.
        raise PackError(f"mergekit could not merge with merge.config: {type(e).__name__}: {e}") from e
    return device


def _unique_inputs(folders: dict[str, Path]) -> dict[str, Path]:
    """One entry per model folder, named by every stage name that points to it (e.g. 'pref=tuned')."""
    by_path: dict[Path, list[str]] = {}
    for name, path in folders.items():
        by_path.setdefault(path, []).append(name)
    return {"=".join(names): path for path, names in by_path.items()}


def check_prompt(pack) -> str:
    """The first of the pack's eval prompts, or a generic one when it has none."""
    from pipeline.data import load_rows

    if pack.eval.prompts:
        try:
            return load_rows(pack, pack.eval.prompts, "prompt", "eval.prompts")[0]["prompt"]
        except PackError:
            pass  # validate reports broken eval data; the merge check falls back to a generic prompt
    from merge.checks import DEFAULT_PROMPT

    return DEFAULT_PROMPT


def run(ctx) -> dict:
    from merge.checks import post_merge, pre_merge
    from merge.recipes import NONE, resolve

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
