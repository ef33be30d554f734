"""serve.quantization=int8: SmoothQuant's rewrite is exact in float, the int8 emulation stays close and
undoes cleanly, the copy is a compressed-tensors W8A8 checkpoint made once, and a real vLLM server loads
and answers with it.

    .venv/bin/python -m pytest -q tests/test_quantize.py
"""
from __future__ import annotations

import json

import pytest

PACK = """\
name: finance
system_prompt: You are a careful financial education assistant.
sft:
  datasets: [{path: data/sft.jsonl, licence: permissive}]
eval:
  text: [{path: data/eval/text.jsonl, licence: permissive}]
"""
CHATS = [{"messages": [{"role": "user", "content": f"What is a bond, question {i}?"},
                       {"role": "assistant", "content": f"A bond is a loan to an issuer, answer {i}."}]}
         for i in range(6)]
TEXTS = [{"text": "Interest rates and bond prices move in opposite directions. " * 8},
         {"text": "An index fund holds every stock of an index at its weight. " * 8}]


def batches(vocab: int, n: int = 4, length: int = 48):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def test_smoothing_keeps_float_outputs_and_int8_emulation_is_close_and_undoes(tmp_path, tokenizer_dir):
    import torch
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    from serve.quantize import emulate_int8, input_maxima, smooth

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m", tokenizer_dir, hidden=128),
                                                 dtype=torch.float32).eval()
    data = batches(model.config.vocab_size)
    # An outlier channel, as trained models have: SmoothQuant exists for these.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[7] = 40.0
    with torch.inference_mode():
        before = model(data[0]).logits
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()

    smooth(model, input_maxima(model, data), alpha=0.5)
    with torch.inference_mode():
        after = model(data[0]).logits
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)  # it did rewrite
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # and the float model is the same

    q_weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    undo = emulate_int8(model)
    with torch.inference_mode():
        emulated = model(data[0]).logits
    assert not torch.equal(emulated, after)
    assert (emulated - after).norm() / after.norm() < 0.05  # int8 rounding, not a different model
    undo()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_weight)
    with torch.inference_mode():
        torch.testing.assert_close(model(data[0]).logits, after)


def test_an_architecture_without_llama_blocks_gets_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.errors import PackError
    from serve.quantize import blocks

    with pytest.raises(PackError) as e:
        blocks(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)))
    assert "Llama-family" in str(e.value) and "serve.quantization=none" in str(e.value)


def sharpen(folder):
    """Larger embeddings, so the random model's next-token log-probabilities differ by several nats and a
    wrongly stored int8 checkpoint could not pass for the float model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40)
    model.save_pretrained(folder)
    return folder


def float_logprobs(folder, ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.mark.slow
def test_int8_copies_are_compressed_tensors_made_once_and_vllm_serves_them(workspace, tokenizer_dir):
    import openai
    import torch
    from conftest import build_tiny_model, free_port, make_pack
    from safetensors.torch import load_file

    from core.pack import load_pack
    from core.schema import ServeStage
    from serve.engine import start_vllm, stop, wait_ready
    from serve.quantize import served_copies

    make_pack(workspace, "finance", PACK, {"data/sft.jsonl": CHATS, "data/eval/text.jsonl": TEXTS})
    run = workspace / "runs" / "finance"
    # head_dim 64 (4 heads of 64): vLLM's CPU attention kernels need it.
    tuned = sharpen(build_tiny_model(run / "merge" / "model", tokenizer_dir, hidden=256, seed=1))
    base = build_tiny_model(run / "base" / "model", tokenizer_dir, hidden=256, seed=2)
    pack = load_pack("finance")
    said = []
    t8, b8 = served_copies(pack, run, tuned, base, say=said.append)
    assert (t8, b8) == (run / "serve" / "int8" / "tuned", run / "serve" / "int8" / "base")
    assert sum("making an int8 copy" in m for m in said) == 2

    config = json.loads((t8 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    state = load_file(t8 / "model.safetensors")
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert state["model.layers.0.self_attn.q_proj.weight_scale"].shape == (q.shape[0], 1)
    assert state["model.embed_tokens.weight"].dtype == torch.float32  # what is not quantized stays as it was
    assert (t8 / "tokenizer_config.json").read_bytes() == (tuned / "tokenizer_config.json").read_bytes()
    info = json.loads((t8 / "quantization.json").read_text())
    assert info["calibration_texts"] == len(CHATS) and info["held_out_texts"] == len(TEXTS)
    assert info["perplexity_int8_emulated"] == pytest.approx(info["perplexity_float"], rel=0.05)

    stamp = (t8 / "model.safetensors").stat().st_mtime_ns
    said.clear()
    served_copies(pack, run, tuned, base, say=said.append)
    assert said == [] and (t8 / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not remade

    port = free_port()
    child = start_vllm("tuned", t8, ["finance"], "127.0.0.1", port, "sk-q", ServeStage(max_model_len=512),
                       workspace / "vllm.log", cuda=False)
    try:
        wait_ready([child], "sk-q", timeout=300, say=lambda m: None)
        client = openai.OpenAI(base_url=child.url, api_key="sk-q")
        reply = client.chat.completions.create(model="finance", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, temperature=0)
        assert reply.usage.completion_tokens > 0
        # The served int8 model scores a text like the float model it came from.
        scored = client.completions.create(model="finance", prompt=TEXTS[0]["text"], max_tokens=1,
                                           extra_body={"prompt_logprobs": 0})
        rows = scored.choices[0].model_extra["prompt_logprobs"]  # vLLM's field: None, then {id: {logprob}}
        served_ids = [int(next(iter(r))) for r in rows[1:]]
        served = [r[str(i)]["logprob"] for r, i in zip(rows[1:], served_ids)]
    finally:
        stop([child])
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tuned)(TEXTS[0]["text"])["input_ids"]
    assert ids[1:] == served_ids
    expected = float_logprobs(tuned, ids)
    spread = torch.tensor(expected).std().item()
    gap = (torch.tensor(served) - torch.tensor(expected)).abs().mean().item()
    print(f"log-prob spread {spread:.2f}, int8 gap {gap:.3f}")
    # The folder holds only int8 weights and their scales, so a server that answers this closely to the float
    # model read them as W8A8 (a 1.5x error in the scales gives a gap of 3.6 nats here).
    assert spread > 1.0 and gap < 0.1 * spread
