"""The pack's `merge.config`: a mergekit configuration whose model names are stage names.

    python -m pipeline validate --domain finance      # checks the recipe with mergekit, reads no weights

Model references (`model:` and `base_model:` anywhere in the config) are stage names: base, cpt, sft,
pref, or tuned (the last enabled training stage). `check_recipe` validates the recipe with mergekit's
own `MergeConfiguration` and the merge method's input contract before any weight is read; `resolve`
turns the stage names into the run's model folders. `merge_method: none` passes one model through
unchanged (the model that is not the base: `tuned` unless the recipe names another).
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

from core.errors import PackError, show_path
from core.layout import model_dir
from core.schema import Pack
from core.stages import MERGE_REFS, stage_of_ref

REF_KEYS = ("model", "base_model")
# Keys that would give the output another tokenizer than the base model's; the stage always keeps the
# base tokenizer, chat template and generation config (what the serving parity check relies on).
TOKENIZER_KEYS = ("tokenizer", "tokenizer_source", "chat_template")
NONE = "none"


def _refs(node: Any, path: str = "merge.config"):
    """(key path, stage name) of every model reference in the config."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}"
            if key in REF_KEYS and isinstance(value, str):
                yield here, value
            else:
                yield from _refs(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _refs(item, f"{path}.{i}")


def _replace_refs(node: Any, paths: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (paths[v] if k in REF_KEYS and isinstance(v, str) else _replace_refs(v, paths))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_refs(item, paths) for item in node]
    return node


def passthrough_ref(config: dict) -> list[str]:
    """For `merge_method: none`: the stage names that pass through (exactly one is valid)."""
    base = config.get("base_model")
    listed = [m.get("model") for m in config.get("models") or [] if isinstance(m, dict)]
    others = [m for m in listed if m != base]
    return others if listed else ["tuned"]


def method_names() -> list[str]:
    from mergekit.merge_methods import registered_methods

    return sorted(m.spec.name for m in registered_methods())


def check_recipe(pack: Pack) -> list[str]:
    """Every problem of merge.config (empty when valid). Imports mergekit, reads no weights."""
    where = show_path(pack.dir / "pack.yaml") if pack._dir else "pack.yaml"
    config = pack.merge.config
    method = config.get("merge_method")
    problems = []
    for key in TOKENIZER_KEYS:
        if key in config:
            problems.append(f"{where}: merge.config.{key}: not supported; the merged model always keeps the "
                            "base model's tokenizer, chat template and generation config. Remove the key.")
    refs = list(_refs(config))
    for key, ref in refs:
        if ref not in MERGE_REFS:
            hint = difflib.get_close_matches(ref, MERGE_REFS, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"use one of {', '.join(MERGE_REFS)}"
            problems.append(f"{where}: {key}: '{ref}' is not a stage ({fix}); models are named by the "
                            "stage that produced them, 'tuned' being the last enabled training stage")
    if method == NONE:
        through = passthrough_ref(config)
        if len(through) != 1:
            problems.append(f"{where}: merge.config: merge_method none passes exactly one model through, "
                            f"but the recipe lists {', '.join(map(str, through)) or 'only the base'}; "
                            "list one model under models (or none, for 'tuned')")
        if pack.merge.search != "none":
            problems.append(f"{where}: merge.search: '{pack.merge.search}' needs a slerp recipe, not merge_method none")
        return problems
    if problems:
        return problems  # mergekit's own errors would only repeat these

    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    if not isinstance(method, str):
        return [f"{where}: merge.config.merge_method: required (e.g. slerp, linear, ties) or 'none'"]
    known = method_names()
    if method not in known:
        hint = difflib.get_close_matches(method, known, n=1)
        fix = f"did you mean '{hint[0]}'? " if hint else ""
        return [f"{where}: merge.config.merge_method: unknown merge method '{method}'; {fix}"
                f"mergekit knows: {', '.join(known)}, and 'none' passes the tuned model through"]
    try:
        parsed = MergeConfiguration.model_validate(config)
    except (ValidationError, RuntimeError, ValueError) as e:
        hint = ("" if any(k in config for k in ("models", "slices", "modules")) else
                "; a config with merge_method replaces the default recipe, so list the models too, e.g. "
                "models: [{model: base}, {model: tuned}]")
        return [f"{where}: merge.config: not a valid mergekit configuration: {_first_lines(e)}{hint}"]
    problems += _check_contract(parsed, method, where)
    if pack.merge.search == "t" and method != "slerp":
        problems.append(f"{where}: merge.search: 't' grid-searches the SLERP weight; it needs "
                        f"merge_method slerp (the recipe uses {method}). Set merge.search: none.")
    if pack.merge.search == "t" and not (pack.eval.sft or pack.eval.text):
        problems.append(f"{where}: merge.search: 't' scores candidates on held-out data, but the pack lists "
                        "no eval.sft or eval.text; add one, or set merge.search: none")
    return problems


def _check_contract(parsed, method: str, where: str) -> list[str]:
    """The method's input rules (base model required, number of inputs), checked on stage names."""
    from mergekit.merge_methods import get

    contract = get(method).spec.contract
    base = str(parsed.base_model) if parsed.base_model else None
    inputs = sorted({str(m) for m in parsed.referenced_models()})
    policy = contract.base.value
    if policy == "required" and base is None:
        return [f"{where}: merge.config.base_model: {method} needs a base model, e.g. base_model: base"]
    if policy == "forbidden" and base is not None:
        return [f"{where}: merge.config.base_model: {method} takes no base model; remove base_model"]
    count = len(inputs)
    if count < contract.min_inputs or (contract.max_inputs is not None and count > contract.max_inputs):
        want = (f"exactly {contract.min_inputs}" if contract.min_inputs == contract.max_inputs
                else f"at least {contract.min_inputs}" + (f" and at most {contract.max_inputs}"
                                                          if contract.max_inputs else ""))
        return [f"{where}: merge.config: {method} takes {want} models (base included), "
                f"the recipe names {count}: {', '.join(inputs)}"]
    return []


def _first_lines(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return " ".join(line.strip() for line in text[:4])


def validate_merge(pack: Pack) -> list[str]:
    """What `make validate` reports about the merge section."""
    if not pack.merge.enabled:
        return []
    return check_recipe(pack)


def resolve(pack: Pack, run_dir: Path) -> tuple[dict, dict[str, Path]]:
    """(the config with stage names replaced by model folders, {stage name: model folder}).

    Raises PackError for an invalid recipe or a stage without a model."""
    problems = check_recipe(pack)
    if problems:
        raise PackError(problems, "merge.config has problems")
    config = copy.deepcopy(pack.merge.config)
    config.setdefault("dtype", pack.base.dtype)  # the base model's precision unless the recipe says otherwise
    if config.get("merge_method") == NONE:
        names = passthrough_ref(config)
    else:
        names = sorted({ref for _, ref in _refs(config)}, key=MERGE_REFS.index)
    folders = {name: model_dir(run_dir, stage_of_ref(name)) for name in names}
    return _replace_refs(config, {k: str(v) for k, v in folders.items()}), folders
