"""Base stage: the embedded SmolLM2 GGUF becomes a plain HF folder that loads and chats to EOS."""
from __future__ import annotations

import json

import pytest
from conftest import make_pack

from core.pack import load_pack
from pipeline import runner


@pytest.mark.slow
def test_embedded_base_loads_and_generates_to_eos(workspace):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_pack(workspace, "toy", "name: toy\nsystem_prompt: You are a concise assistant.\n")
    runner.run(load_pack("toy"), "base")
    out = workspace / "runs" / "toy" / "base" / "model"
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    info = json.loads((out.parent / "stage.json").read_text())
    assert info["metrics"]["parameters"] > 100e6

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos])
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=48, do_sample=False)
    new = gen[0, ids["input_ids"].shape[1]:].tolist()
    assert new[-1] == im_end, tok.decode(new)
    assert "Paris" in tok.decode(new, skip_special_tokens=True)


def test_local_base_model_is_copied_with_its_template(workspace, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_pack(workspace, "toy", f"name: toy\nbase:\n  model: {tiny_model_dir}\n  chat_template: chatml\n")
    runner.run(load_pack("toy"), "base")
    out = workspace / "runs" / "toy" / "base" / "model"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
