"""Running mergekit and keeping the base model's tokenizer: what the merge stage and the t search share.

mergekit's Python API merges lazily (CUDA when present); afterwards the base model's tokenizer, chat template
and generation config replace whatever an input brought, which is what the serving parity check relies on.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from core.errors import PackError

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
