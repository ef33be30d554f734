"""Merge stage: mergekit recipes on tiny models, the checks before and after, and the errors.

The training stages' outputs are tiny random Llamas (different seeds) registered as stage outputs by
hand (stage.json pointing at the model folder), so the merge runs through the real runner and mergekit.
"""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import build_tiny_model, make_pack
from safetensors.torch import load_file

from core.errors import PackError
from core.layout import domains_dir
from core.pack import load_pack
from merge.recipes import check_recipe
from pipeline import runner

SEEDS = {"base": 0, "cpt": 1, "sft": 2, "pref": 3}


@pytest.fixture(scope="module")
def stage_models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("stages")
    return {stage: build_tiny_model(root / stage, tokenizer_dir, seed=seed) for stage, seed in SEEDS.items()}


def publish(run_dir, stage_models, **replace):
    """Write runs/toy/<stage>/stage.json for base..pref, pointing at the tiny models (or `replace`)."""
    for stage, folder in {**stage_models, **replace}.items():
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        (run_dir / stage / "stage.json").write_text(json.dumps({"fingerprint": f"fp-{stage}", "model": str(folder)}))


def merge(workspace, stage_models, merge_yaml: str, overrides=(), files=None, **replace):
    make_pack(workspace, "toy", "name: toy\n" + merge_yaml, files)
    run_dir = workspace / "runs" / "toy"
    publish(run_dir, stage_models, **replace)
    info = runner.run_stage(load_pack("toy", list(overrides)), "merge", run_dir)
    return info, run_dir / "merge" / "model"


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def assert_same(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].float().allclose(wb[name].float(), atol=1e-6), name


SLERP_T = """\
merge:
  config:
    merge_method: slerp
    base_model: base
    models: [{model: base}, {model: tuned}]
    parameters: {t: %s}
    dtype: float32
"""


@pytest.mark.parametrize("t,expected", [(0, "base"), (1, "pref")])
def test_slerp_ends_reproduce_the_parents(workspace, stage_models, t, expected):
    info, out = merge(workspace, stage_models, SLERP_T % t)
    assert_same(out, stage_models[expected])
    other = "pref" if expected == "base" else "base"
    assert not weights(out)["model.embed_tokens.weight"].equal(weights(stage_models[other])["model.embed_tokens.weight"])
    m = info["metrics"]
    assert m["method"] == "slerp" and m["pre_checks"]["same_vocab"] and m["post_checks"]["finite"]


def test_default_recipe_is_a_real_merge_that_loads(workspace, stage_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info, out = merge(workspace, stage_models, "")
    assert info["config"]["merge"]["config"]["merge_method"] == "slerp"
    merged, base, tuned = weights(out), weights(stage_models["base"]), weights(stage_models["pref"])
    assert all(w.dtype == torch.float32 for w in merged.values())  # base.dtype, as no dtype is given
    # gradient t: layer 0 attention is base (t=0), the last layer's attention is tuned (t=1)
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert merged[q0].allclose(base[q0], atol=1e-6) and merged[q1].allclose(tuned[q1], atol=1e-6)
    emb = "model.embed_tokens.weight"  # t=0.5 elsewhere: neither parent
    assert not merged[emb].allclose(base[emb]) and not merged[emb].allclose(tuned[emb])

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok) and tok.chat_template
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_text() == (stage_models["base"] / name).read_text()

    stage = json.loads((workspace / "runs/toy/merge/stage.json").read_text())
    post = stage["metrics"]["post_checks"]
    assert post["loads"] and post["finite"] and post["vocab_size"] == post["embedding_rows"]
    assert post["stops_at_eos"] is False and stage["metrics"]["warnings"]  # random weights ramble
    assert stage["inputs"]["upstream"] == {"base": "fp-base", "pref": "fp-pref"}


def test_bfloat16_when_the_recipe_asks(workspace, stage_models):
    import torch

    info, out = merge(workspace, stage_models, "", overrides=["merge.config.dtype=bfloat16"])
    assert all(w.dtype == torch.bfloat16 for w in weights(out).values())
    assert info["metrics"]["dtype"] == "bfloat16" and info["metrics"]["post_checks"]["loads"]


def test_linear_weights_one_zero_reproduce_the_first(workspace, stage_models):
    _, out = merge(workspace, stage_models, """\
merge:
  config:
    merge_method: linear
    models:
      - {model: sft, parameters: {weight: 1.0}}
      - {model: pref, parameters: {weight: 0.0}}
    dtype: float32
""")
    assert_same(out, stage_models["sft"])


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", "{weight: 0.5}"),
    ("ties", "{weight: 0.5, density: 0.5}"),
    ("dare_ties", "{weight: 0.5, density: 0.5}"),
])
def test_task_vector_methods_merge_several_stages(workspace, stage_models, method, params):
    info, out = merge(workspace, stage_models, f"""\
merge:
  config:
    merge_method: {method}
    base_model: base
    models:
      - {{model: cpt, parameters: {params}}}
      - {{model: sft, parameters: {params}}}
      - {{model: pref, parameters: {params}}}
    parameters: {{random_seed: 0}}
    dtype: float32
""")
    merged = weights(out)
    for stage in SEEDS:
        assert not merged["model.layers.0.mlp.up_proj.weight"].equal(weights(stage_models[stage])["model.layers.0.mlp.up_proj.weight"])
    assert info["metrics"]["post_checks"]["loads"]
    assert set(info["metrics"]["inputs"]) == {"base", "cpt", "sft", "pref"}


def test_method_none_passes_the_tuned_model_through(workspace, stage_models):
    info, out = merge(workspace, stage_models, "", overrides=["merge.config.merge_method=none"])
    assert_same(out, stage_models["pref"])
    assert info["metrics"]["method"] == "none"


def test_invalid_method_and_missing_stage_are_clear_errors(workspace, stage_models):
    with pytest.raises(PackError) as e:
        merge(workspace, stage_models, "", overrides=["merge.config.merge_method=slurp"])
    assert "unknown merge method 'slurp'" in str(e.value) and "did you mean 'slerp'" in str(e.value)

    make_pack(workspace, "toy", "name: toy\nmerge:\n  config: {merge_method: slerp, base_model: base, "
                                "models: [{model: base}, {model: tunde}]}\n")
    problems = check_recipe(load_pack("toy"))
    assert len(problems) == 1 and "merge.config.models.1.model: 'tunde' is not a stage" in problems[0]
    assert "did you mean 'tuned'" in problems[0]
    assert not (workspace / "runs/toy/merge").exists()

    # a referenced stage that was never run: the error says which command builds it
    shutil.rmtree(workspace / "runs/toy/sft")
    make_pack(workspace, "toy", "name: toy\nmerge:\n  config: {merge_method: linear, "
                                "models: [{model: sft, parameters: {weight: 1}}, {model: base, parameters: {weight: 1}}]}\n")
    with pytest.raises(PackError, match=r"stage 'sft' has no model .* run `make domain=toy sft` first"):
        runner.run_stage(load_pack("toy"), "merge", workspace / "runs/toy")


def test_recipe_rules_are_checked_before_any_weight(workspace):
    make_pack(workspace, "toy", "name: toy\nmerge:\n  config: {merge_method: slerp, "
                                "models: [{model: base}, {model: sft}, {model: pref}]}\n")
    [problem] = check_recipe(load_pack("toy"))
    assert "slerp needs a base model" in problem
    make_pack(workspace, "toy", "name: toy\nmerge:\n  search: t\n  config: {dtype: float32}\n")
    [problem] = check_recipe(load_pack("toy"))  # the default recipe, adjusted; no eval data to search on
    assert "merge.search: 't' scores candidates on held-out data" in problem
    assert load_pack("toy").merge.config["merge_method"] == "slerp"
    make_pack(workspace, "toy", "name: toy\nmerge:\n  config: {merge_method: ties, base_model: base, "
                                "models: [{model: sft}, {model: tuned}], tokenizer_source: union}\n")
    [problem] = check_recipe(load_pack("toy"))
    assert "merge.config.tokenizer_source: not supported" in problem


def test_one_model_listed_twice_is_an_error(workspace, stage_models):
    # pref disabled: its stage.json points to sft's model, so ties over sft and pref would merge sft with itself
    with pytest.raises(PackError, match=r"names one model twice \(sft=pref are the same folder"):
        merge(workspace, stage_models, "merge:\n  config: {merge_method: ties, base_model: base, models: "
              "[{model: sft, parameters: {weight: 1}}, {model: pref, parameters: {weight: 1}}]}\n",
              pref=stage_models["sft"])


def test_vocab_mismatch_names_the_models(workspace, stage_models, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens(["<ticker>"])
    tok.save_pretrained(tmp_path / "tok")
    bigger = build_tiny_model(tmp_path / "bigger", tmp_path / "tok", seed=5)
    with pytest.raises(PackError) as e:
        merge(workspace, stage_models, "", pref=bigger)
    text = str(e.value)
    assert "vocabulary size (config vocab_size) differs between 'base'" in text
    assert "'tuned'" in text and "49152 vs 49153" in text
    assert not (workspace / "runs/toy/merge").exists()


@pytest.mark.slow
def test_search_t_keeps_the_lowest_heldout_loss(workspace, stage_models):
    convo = {"messages": [{"role": "user", "content": "What is a bond?"},
                          {"role": "assistant", "content": "A loan to an issuer that pays interest."}]}
    info, out = merge(workspace, stage_models, """\
merge:
  search: t
eval:
  sft: [{path: data/eval/sft.jsonl, licence: permissive}]
""", files={"data/eval/sft.jsonl": [convo] * 3})
    search = info["metrics"]["search"]
    assert [c["candidate"] for c in search["candidates"]] == ["recipe", "t=0.3", "t=0.5", "t=0.7"]
    best = min(search["candidates"], key=lambda c: c["loss"])
    assert search["chosen"] == best["candidate"] and search["rows"] == 3
    assert (out / "model.safetensors").is_file() and not (workspace / "runs/toy/merge/search").exists()


def test_shipped_packs_have_valid_merge_recipes():
    packs = sorted(p.parent.name for p in domains_dir().glob("*/pack.yaml"))
    assert packs
    for name in packs:
        assert check_recipe(load_pack(name)) == [], name
